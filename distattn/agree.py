"""Cross-rank agreement: every rank of a mesh raises the same error, or none does.

Every distattn call that communicates (``dist_flash_attn`` and its backward,
``ShardedKVCache.attend``, ``unshard``, ``dtf.generate``) and every preparation whose result
must match across ranks (``shard``, ``positions``, ``dtf.shard_batch``) starts with one
agreement over the mesh's control group (``SPMesh.control_group``: gloo, used by nothing else,
so it never pairs up with another collective and never touches a device stream). Each rank
contributes one fixed-size row of int64::

    [local error?, digest of the call's name, digest of its field names, of each field]

One all-gather, and every rank reads the same table, so every rank decides the same way:

1. the ranks are in different calls (a rank skipped or repeated one): every rank raises the
   same RuntimeError naming each rank's call;
2. a rank found a local error in its arguments: every rank raises that error (the lowest
   failing rank's type and message, naming the failing ranks);
3. a field differs (shapes, dtypes, flags, scale, layout, ...): every rank raises a ValueError
   naming the first such field, each rank's value and the ranks holding it.

A failing rank takes part like the others, so the ranks' collectives stay paired: after any of
these errors the mesh is usable for the next call. Only digests travel (8 bytes a field);
values are gathered, as text, only to write an error. A call's field digests are cached by a
cheap key (shapes, dtypes, numbers), so in steady state an agreement costs the latency of one
small host all-gather (``bench/agree.py`` measures it).

``DISTATTN_CHECK=0`` (read on every call) restores the agreement "on change only": a call
whose fields equal the last agreed ones of the same call makes no collective. Faster, but a
rank whose arguments fail locally then raises alone while the others wait in the call's
communication (until the mesh timeout, or, when the failing rank calls again, paired with its
next call: wrong numbers). Use it only where every rank's arguments are known to be equal.

Failure: when a wait of the mesh fails (``CommunicationError``), or a rank fails in the middle
of a call after agreeing, ``mesh.state.failed`` says why, and every later call on the mesh
raises ``MeshFailedError`` at once instead of a backend's message.
"""
from __future__ import annotations

import builtins
import contextlib
import dataclasses
import hashlib
import os
from typing import Mapping, Optional

import torch
import torch.distributed as dist

from .comm import CommunicationError, MeshFailedError, wait_all
from .mesh import SPMesh, as_mesh

ENV = "DISTATTN_CHECK"
MAX_FIELDS = 32     # the gathered row has a fixed width so that every rank sends the same size
_HEAD = 2           # error flag, digest of the call's name
_ON, _OFF = ("", "1", "true", "yes", "on"), ("0", "false", "no", "off")
_CACHE_LIMIT = 512  # digests cached per mesh before the cache starts again


def check_enabled() -> bool:
    """Whether every call agrees (the default, or ``DISTATTN_CHECK=1``); False with
    ``DISTATTN_CHECK=0``: agree only when a call's fields change. Read now, never cached."""
    value = os.environ.get(ENV, "").strip().lower()
    if value in _ON:
        return True
    if value in _OFF:
        return False
    raise ValueError(f"{ENV}={os.environ[ENV]!r} is not understood: leave it unset (or set "
                     f"{ENV}=1) for an agreement on every call, or {ENV}=0 to agree only when "
                     f"a call's arguments change")


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


_PLAIN = frozenset({int, str, bool, type(None)})   # equal values give equal texts


def _key(value):
    """A cheap hashable stand-in for ``canonical(value)`` (equal keys give equal texts);
    raises TypeError where there is none (the caller then digests without caching)."""
    if isinstance(value, torch.Tensor):
        return (torch.Tensor, value.shape, value.dtype, value.device.type)
    if isinstance(value, (tuple, list)):
        kinds = frozenset(map(type, value))
        if kinds <= _PLAIN:         # e.g. cu_seqlens of 10k documents: hashed in C
            return (type(value), kinds, tuple(value))
        return (type(value), tuple(_key(v) for v in value))
    if isinstance(value, Mapping):
        return (Mapping, tuple((k, _key(value[k])) for k in sorted(value, key=repr)))
    if isinstance(value, float) and value == 0.0:
        return (float, repr(value))        # 0.0 and -0.0 are equal keys, not equal texts
    if isinstance(value, (bool, int, float, str, type(None), torch.dtype, torch.device)):
        return (type(value), value)
    raise TypeError(type(value).__name__)


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little",
                          signed=True)


def _device(group) -> torch.device:
    """Where the group's collectives take their tensors: CPU for gloo, else the GPU."""
    backend = str(dist.get_backend(group)).lower()
    if "gloo" in backend or "mpi" in backend or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _ranks(mesh: SPMesh) -> list:
    return dist.get_process_group_ranks(mesh.control_group)


# --- health -----------------------------------------------------------------------------------
def check_healthy(mesh: SPMesh, call: str) -> None:
    """Raise ``MeshFailedError`` if the mesh's communication failed earlier."""
    if mesh.state.failed is not None:
        raise MeshFailedError(
            f"distattn: {call} was called on a mesh whose communication failed earlier "
            f"({mesh.state.failed}). Its process groups cannot be used again: build a new "
            f"SPMesh once every rank is back, or restart the job")


def mark_failed(mesh: SPMesh, call: str, exc: BaseException) -> None:
    """Record that ``call`` failed on ``mesh`` in the middle of its communication (the first
    failure is kept)."""
    if mesh.state.failed is None:
        text = str(exc).split(". ")[0]
        mesh.state.failed = f"{call}: {type(exc).__name__}: {text[:300]}"


@contextlib.contextmanager
def failure_marks(mesh: SPMesh, call: str):
    """Run the communicating part of ``call``: any exception inside (a failed wait, or this
    rank failing between two collectives, which leaves the peers waiting) marks the mesh
    failed before it propagates. A one-rank mesh never fails this way."""
    try:
        yield
    except BaseException as exc:
        if mesh.size > 1:
            mark_failed(mesh, call, exc)
        raise


# --- the collective ---------------------------------------------------------------------------
def _active(mesh: SPMesh) -> bool:
    if mesh.size == 1:
        return False
    if mesh.control_group is None:
        raise ValueError(f"{mesh} has no control group: build it with SPMesh.build, "
                         f"from_group or from_device_mesh, which create it")
    return True


def _gather_rows(mesh: SPMesh, row: list, what: str) -> list:
    """Every rank's ``row`` (ints, the same length everywhere), in group-rank order; one
    collective, bounded by the mesh timeout."""
    group = mesh.control_group
    mine = torch.tensor([row], dtype=torch.int64, device=_device(group))
    table = torch.empty((mesh.size, len(row)), dtype=torch.int64, device=mine.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # torch<2.13
    with failure_marks(mesh, what):
        work = gather(table, mine, group=group, async_op=True)
        wait_all([work], lambda: f"{what} over ranks {_ranks(mesh)}")
    return table.tolist()


def _gather_texts(mesh: SPMesh, text) -> list:
    """Every rank's ``text`` (any picklable value); used only to write an error."""
    out = [None] * mesh.size
    with failure_marks(mesh, "the exchange of an agreement's error"):
        dist.all_gather_object(out, text, group=mesh.control_group)
    return out


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


def _exchange(mesh: SPMesh, call: str, error: Optional[BaseException], digests: list,
              what: str) -> list:
    """One agreement: gather every rank's [error flag, digest of ``call``, digests...]; raise
    on every rank if the ranks are in different calls or a rank has an error; else return
    the table."""
    row = [int(error is not None), _digest(call)] + digests
    row += [0] * (_HEAD + MAX_FIELDS - len(row))
    table = _gather_rows(mesh, row, what)
    if any(r[1] != table[0][1] for r in table):
        calls = _gather_texts(mesh, call)
        raise RuntimeError(
            f"distattn: the ranks of the mesh are in different calls: "
            f"{_by_value(calls, _ranks(mesh))}. A rank skipped or repeated a distattn call "
            f"(every rank of the mesh must make the same calls in the same order); every rank "
            f"raises this") from error
    flags = [r[0] for r in table]
    if any(flags):
        _raise_agreed(mesh, flags, error)
    return table


def agree_error(mesh: SPMesh, error: Optional[BaseException], call: str = "a check") -> None:
    """Every rank of ``mesh`` calls this with its locally detected error, or None (for checks
    that depend on one rank's data: its part of a padding mask, its values). Returns when no
    rank has one; otherwise every rank raises the same error (type and message of the lowest
    failing rank, plus the failing ranks). One small collective (a second one only when
    raising), whatever ``DISTATTN_CHECK`` says. On a one-rank mesh it just raises ``error``."""
    if not _active(mesh):
        if error is not None:
            raise error
        return
    check_healthy(mesh, call)
    _exchange(mesh, call, error, [], f"the agreement on an error in {call}")


def _fields_digests(mesh: SPMesh, call: str, fields: Mapping) -> tuple:
    """(texts, names, digests, key) of ``call`` with ``fields`` and the mesh: the texts compared
    (the call with its field names, then the mesh and every field), cached by a cheap key."""
    if len(fields) + 2 > MAX_FIELDS:       # + the field names and the mesh
        raise ValueError(f"check_agreement takes at most {MAX_FIELDS - 2} fields, got "
                         f"{len(fields)}; raise distattn.agree.MAX_FIELDS")
    cache = mesh.state.digests
    try:
        key = (call, tuple(fields), tuple(_key(v) for v in fields.values()))
        hit = cache.get(key)
    except TypeError:
        key, hit = None, None
    if hit is not None:
        return hit
    fields = {"mesh": f"SPMesh(ulysses={mesh.ulysses_degree}, ring={mesh.ring_degree}, "
                      f"placement={mesh.placement!r})", **fields}
    texts = [f"{call}({', '.join(fields)})"] + [canonical(v) for v in fields.values()]
    digests = [_digest(t) for t in texts]
    entry = (texts, list(fields), digests, _digest("\n".join(texts)))
    if key is not None:
        if len(cache) >= _CACHE_LIMIT:
            cache.clear()
        cache[key] = entry
    return entry


def check_agreement(mesh: SPMesh, call: str, fields: Mapping,
                    error: Optional[BaseException] = None) -> None:
    """Agree, with one small collective, that every rank of ``mesh`` makes this call with
    equal ``fields`` (name -> value, in a fixed order;
    ``canonical`` says what equal means), and that no rank has a local ``error`` (its
    argument check failed: pass it here, see ``fail_everywhere``). Raises on every rank, or
    on none: see the module docstring. With ``DISTATTN_CHECK=0`` it makes the collective only
    when this rank's fields differ from the last ones agreed for ``call``, and raises a local
    ``error`` here only."""
    every_call = check_enabled()
    if not _active(mesh) or (error is not None and not every_call):
        if error is not None:
            raise error
        return
    check_healthy(mesh, call)
    if error is not None:
        _exchange(mesh, call, error, [], f"the agreement on the arguments of {call}")
    try:
        texts, names, digests, key = _fields_digests(mesh, call, fields)
    except (TypeError, ValueError) as exc:    # a field it cannot compare: fail in step
        _exchange(mesh, call, exc, [], f"the agreement on the arguments of {call}")
    if not every_call and mesh.state.agreed.get(call) == key:
        return
    what = (f"the agreement on the arguments of {call} (every rank of the mesh must make this "
            f"call with the same arguments)")
    table = _exchange(mesh, call, None, digests, what)
    for i, name in enumerate(["the call's fields"] + [repr(n) for n in names]):
        column = [r[_HEAD + i] for r in table]
        if any(c != column[0] for c in column):
            raise ValueError(_disagreement(call, name, _gather_texts(mesh, texts[i]),
                                           _ranks(mesh)))
    mesh.state.agreed[call] = key


def _shorten(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _by_value(values: list, ranks: list) -> str:
    """"ranks 0, 1: a; rank 2: b": which ranks hold which value."""
    by_value: dict = {}
    for rank, value in zip(ranks, values):
        by_value.setdefault(value, []).append(rank)
    return "; ".join(f"{'rank' if len(rs) == 1 else 'ranks'} {', '.join(map(str, rs))}: "
                     f"{_shorten(value)}"
                     for value, rs in sorted(by_value.items(), key=lambda kv: kv[1]))


def _disagreement(call: str, label: str, values: list, ranks: list) -> str:
    return (f"distattn: the ranks of the mesh disagree on {label} in {call}: "
            f"{_by_value(values, ranks)}. Every rank of the mesh must call {call} with the same "
            f"arguments, tensor shapes and dtypes")


def fail_everywhere(mesh, call: str, error: BaseException) -> None:
    """Raise ``error`` (this rank's local argument error in ``call``) on every rank: this
    rank takes part in the call's agreement with its error, so the others raise it too and
    the mesh stays in step. Where ``mesh`` itself is unusable, it raises locally."""
    try:
        mesh = as_mesh(mesh)
    except (TypeError, ValueError, RuntimeError):
        raise error from None
    check_agreement(mesh, call, {}, error=error)
    raise error
