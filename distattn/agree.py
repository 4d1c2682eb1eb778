"""Cross-rank agreement: every rank of a mesh raises the same error, or none does.

Two tools, each one small collective over the mesh's control group (``SPMesh.control_group``,
used by nothing else, so it never pairs up with another collective):

- ``check_agreement(mesh, call, fields)``: all ranks compare digests of ``fields`` (an ordered
  mapping of name -> value: shapes, dtypes, flags, scale, layout, ...). The first field that
  differs raises a ValueError on every rank naming the field, each rank's value and the
  ranks holding it. With ``DISTATTN_CHECK=1`` in the environment (read on every call) this
  runs on every call. Without it, it runs only when this rank's fields changed since the
  last agreed call of ``call`` on the mesh (the first call, a new length): free in steady
  state, and enough that ranks never start communicating with different message sizes (gloo
  would abort the process, NCCL hang). A rank that changed alone waits in the agreement while
  the others wait in the attention's first exchange: every rank raises a distattn error after
  the mesh timeout, instead of at once as with the variable. With the variable, a rank whose
  local argument checks failed passes its error instead (``fail_everywhere``), so every rank
  raises that error at once.
- ``agree_error(mesh, error)``: for checks that depend on one rank's data (its part of a
  padding mask, its values): each rank passes its error or None; if any rank has one, every
  rank raises it (the lowest failing rank's type and message). Call it before any
  communication the error should prevent.

Only digests travel (8 bytes a field); values are gathered, as text, only to write an error.
"""
from __future__ import annotations

import builtins
import dataclasses
import hashlib
import os
from typing import Mapping, Optional

import torch
import torch.distributed as dist

from .comm import wait_all
from .mesh import SPMesh, as_mesh

ENV = "DISTATTN_CHECK"
MAX_FIELDS = 32     # the gathered row has a fixed width so that every rank sends the same size
_ON, _OFF = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def check_enabled() -> bool:
    """Whether ``DISTATTN_CHECK`` asks for the agreement check (read now, never cached)."""
    value = os.environ.get(ENV, "").strip().lower()
    if value in _ON:
        return True
    if value in _OFF:
        return False
    raise ValueError(f"{ENV}={os.environ[ENV]!r} is not understood: set {ENV}=1 to check that "
                     f"all ranks agree on every call, or 0 (or unset it) for no check")


def canonical(value) -> str:
    """Text that is equal on two ranks exactly when the values must be treated as equal.
    Tensors count by shape, dtype and device type (never their data, nor the device index):
    pass a field whose values must agree (like cu_seqlens) as a tuple. Floats count by repr
    (exact). Raises TypeError for a type it cannot compare."""
    if isinstance(value, torch.Tensor):
        return (f"tensor(shape={tuple(value.shape)}, dtype={value.dtype}, "
                f"device={value.device.type})")
    if isinstance(value, (bool, int, float, str, type(None), torch.dtype)):
        return repr(value)
    if isinstance(value, torch.device):
        return repr(value.type)
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(canonical(v) for v in value) + ")"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{canonical(k)}: {canonical(value[k])}"
                               for k in sorted(value, key=repr)) + "}"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return type(value).__name__ + canonical(
            {f.name: getattr(value, f.name) for f in dataclasses.fields(value)})
    raise TypeError(f"distattn.agree cannot compare a {type(value).__name__} across ranks; "
                    f"pass a tensor, number, string, dtype, tuple, dict or dataclass")


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little",
                          signed=True)


def _device(group) -> torch.device:
    """Where the group's collectives take their tensors: CPU for gloo, else the GPU."""
    backend = str(dist.get_backend(group)).lower()
    if "gloo" in backend or "mpi" in backend or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _gather_rows(mesh: SPMesh, row: list, what: str) -> list:
    """Every rank's ``row`` (ints, the same length everywhere), in group-rank order; one
    collective, bounded by the mesh timeout."""
    group = mesh.control_group
    mine = torch.tensor([row], dtype=torch.int64, device=_device(group))
    table = torch.empty((mesh.size, len(row)), dtype=torch.int64, device=mine.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # torch<2.13
    work = gather(table, mine, group=group, async_op=True)
    wait_all([work], lambda: f"{what} over ranks {_ranks(mesh)}")
    return table.tolist()


def _gather_texts(mesh: SPMesh, text) -> list:
    """Every rank's ``text`` (any picklable value); used only to write an error."""
    out = [None] * mesh.size
    dist.all_gather_object(out, text, group=mesh.control_group)
    return out


def _ranks(mesh: SPMesh) -> list:
    return dist.get_process_group_ranks(mesh.control_group)


def _active(mesh: SPMesh) -> bool:
    if mesh.size == 1:
        return False
    if mesh.control_group is None:
        raise ValueError(f"{mesh} has no control group: build it with SPMesh.build, "
                         f"from_group or from_device_mesh, which create it")
    return True


def _raise_agreed(mesh: SPMesh, flags: list, error: Optional[BaseException]) -> None:
    """Raise, on every rank, the error of the lowest rank whose flag is set (all ranks call
    this with the same flags)."""
    infos = _gather_texts(mesh, None if error is None else (type(error).__name__, str(error)))
    ranks = _ranks(mesh)
    failing = [ranks[i] for i, flag in enumerate(flags) if flag]
    name, message = infos[flags.index(1)]
    exc_type = getattr(builtins, name, None)
    if not (isinstance(exc_type, type) and issubclass(exc_type, Exception)):
        exc_type, message = RuntimeError, f"{name}: {message}"
    where = "rank" if len(failing) == 1 else "ranks"
    raise exc_type(f"{message} [raised on {where} {', '.join(map(str, failing))}; distattn "
                   f"raises it on every rank of the mesh]") from error


def agree_error(mesh: SPMesh, error: Optional[BaseException]) -> None:
    """Every rank of ``mesh`` calls this with its locally detected error, or None. Returns
    when no rank has one; otherwise every rank raises the same error (type and message of the
    lowest failing rank, plus the failing ranks). One small collective (a second one only when
    raising). On a one-rank mesh it just raises ``error``."""
    if not _active(mesh):
        if error is not None:
            raise error
        return
    flags = [row[0] for row in _gather_rows(mesh, [int(error is not None)],
                                            "the agreement on an error")]
    if any(flags):
        _raise_agreed(mesh, flags, error)


def _texts(mesh: SPMesh, call: str, fields: Mapping) -> tuple[list, list]:
    """(texts, names): the texts compared (the call with its field names, the mesh, then
    every field) and the names of the fields."""
    if len(fields) + 1 > MAX_FIELDS:
        raise ValueError(f"check_agreement takes at most {MAX_FIELDS - 1} fields, got "
                         f"{len(fields)}; raise distattn.agree.MAX_FIELDS")
    fields = {"mesh": f"SPMesh(ulysses={mesh.ulysses_degree}, ring={mesh.ring_degree}, "
                      f"placement={mesh.placement!r})", **fields}
    return [f"{call}({', '.join(fields)})"] + [canonical(v) for v in fields.values()], \
        list(fields)


def check_agreement(mesh: SPMesh, call: str, fields: Mapping,
                    error: Optional[BaseException] = None) -> None:
    """Verify, with one small collective, that every rank of ``mesh`` called ``call`` with
    equal ``fields`` (name -> value, in a fixed order; ``canonical`` says what equal means);
    raise ValueError on every rank naming the first field that differs, each value and its
    ranks. Runs on every call with ``DISTATTN_CHECK=1``, else only when this rank's fields
    differ from the last ones agreed for ``call`` on ``mesh``. ``error``: this rank's local
    argument error (see ``fail_everywhere``), raised on every rank with the variable, here
    only without it."""
    every_call = check_enabled()
    if not _active(mesh) or (error is not None and not every_call):
        if error is not None:
            raise error
        return
    if error is None:
        texts, names = _texts(mesh, call, fields)
        key = _digest("\n".join(texts))
        if not every_call and mesh.agreed.get(call) == key:
            return
        digests = [_digest(t) for t in texts]
        row = [0] + digests + [0] * (MAX_FIELDS + 1 - len(digests))
    else:
        row = [1] + [0] * (MAX_FIELDS + 1)
    why = (f"the {ENV} collective of {call} (every rank of the mesh must make this call, "
           f"with {ENV} set)" if every_call else
           f"the agreement on the arguments of {call} (it runs when they change on a rank; "
           f"every rank of the mesh must make this call with the same arguments)")
    table = _gather_rows(mesh, row, why)
    flags = [r[0] for r in table]
    if any(flags):
        _raise_agreed(mesh, flags, error)
    for i in range(1, MAX_FIELDS + 2):
        column = [r[i] for r in table]
        if any(c != column[0] for c in column):
            label = "the call itself (function and fields)" if i == 1 else repr(names[i - 2])
            raise ValueError(_disagreement(call, label, _gather_texts(mesh, texts[i - 1]),
                                           _ranks(mesh)))
    mesh.agreed[call] = key


def _shorten(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _disagreement(call: str, label: str, values: list, ranks: list) -> str:
    by_value: dict = {}
    for rank, value in zip(ranks, values):
        by_value.setdefault(value, []).append(rank)
    parts = [f"{'rank' if len(rs) == 1 else 'ranks'} {', '.join(map(str, rs))}: "
             f"{_shorten(value)}" for value, rs in sorted(by_value.items(), key=lambda kv: kv[1])]
    return (f"distattn: the ranks of the mesh disagree on {label} in {call}: "
            f"{'; '.join(parts)}. Every rank of the mesh must call {call} with the same "
            f"arguments, tensor shapes and dtypes")


def fail_everywhere(mesh, call: str, error: BaseException) -> None:
    """Raise ``error`` (this rank's local argument error in ``call``). With ``DISTATTN_CHECK``
    it first takes part in ``check_agreement``'s collective, so every rank raises it at once;
    where ``mesh`` itself is unusable, it raises locally."""
    try:
        mesh = as_mesh(mesh)
    except (TypeError, ValueError, RuntimeError):
        raise error from None
    check_agreement(mesh, call, {}, error=error)
    raise error
