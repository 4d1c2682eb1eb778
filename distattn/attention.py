"""``dist_flash_attn``: the entry point training code calls (README.md; docs/DESIGN.md).

All arguments are checked on every rank before any communication starts, so a bad call raises
the same clear error everywhere instead of leaving other ranks waiting in a collective.
"""
from __future__ import annotations

import functools
import math

import torch

from .agree import check_agreement, fail_everywhere, failure_marks
from .documents import check_cu_seqlens
from .hybrid import USPAttention, usp_backward
from .kernels import backend_key, check_backend, get_backend
from .layout import RingLayout, check_layout, ring_layout, seq_multiple
from .gather_plan import allgather_plan
from .mesh import SPMesh, as_mesh
from .nonfinite import host_readable
from .plan import helper_plan, ring_plan
from .ring import RingConfig
from .segments import check_chunk_origin, check_chunk_size, chunked_layout
from .sinks import sinks_grad
from .ulysses import check_heads, head_split

SCHEDULES = ("auto", "ring", "helper", "allgather")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@functools.lru_cache(maxsize=128)
def _plan(lay: RingLayout, causal: bool, window, schedule: str, chunk_size=None,
          chunk_origin="row"):
    lay = chunked_layout(lay, chunk_size, chunk_origin)
    if schedule == "helper":
        return helper_plan(lay, causal, window)
    if schedule == "allgather":
        return allgather_plan(lay, causal, window)
    return ring_plan(lay, causal, window)


def _check_window(window):
    """(left, right) with -1 = unbounded (flash-attn's convention), or None."""
    if window is None:
        return None
    if (not isinstance(window, (tuple, list)) or len(window) != 2 or
            not all(isinstance(x, int) and not isinstance(x, bool) for x in window)):
        raise ValueError(f"window must be a pair of ints (left, right), e.g. (4095, 0) for "
                         f"transformers' sliding_window=4096 with causal; got {window!r}")
    for side, x in zip(("left", "right"), window):
        if x < -1:
            raise ValueError(f"window {side}={x}: use a distance >= 0, or -1 for unbounded")
    return None if tuple(window) == (-1, -1) else tuple(window)


def _check_softcap(softcap) -> float:
    if softcap is None:
        return 0.0
    if (not isinstance(softcap, (int, float)) or isinstance(softcap, bool)
            or not math.isfinite(softcap) or softcap <= 0):
        raise ValueError(f"softcap must be a positive finite float (scores become "
                         f"softcap * tanh(score / softcap)) or None for off; got {softcap!r}")
    return float(softcap)


def _check_sinks(sinks, q):
    if sinks is None:
        return None
    if not isinstance(sinks, torch.Tensor):
        raise TypeError(f"sinks must be a tensor of shape [Hq], got {type(sinks).__name__}")
    if sinks.shape != (q.shape[2],):
        raise ValueError(f"sinks must have shape [Hq] = [{q.shape[2]}] (one logit per query "
                         f"head), got {tuple(sinks.shape)}")
    if not sinks.dtype.is_floating_point:
        raise TypeError(f"sinks must be a floating tensor, got {sinks.dtype}")
    if sinks.device != q.device:
        raise ValueError(f"sinks must be on q's device {q.device}, got {sinks.device}")
    return sinks


def _check_tensors(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [batch, seq_local, heads, head_dim], got "
                             f"shape {tuple(t.shape)}")
        if t.dtype not in DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; use one of float16, bfloat16, "
                            f"float32, float64")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}; "
                        f"cast them to the same dtype")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, "
                         f"{v.device}")
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"k and v must have the same shape (but for V's head dim, which may "
                         f"differ: MLA), got {tuple(k.shape)} and {tuple(v.shape)}")
    if v.shape[-1] == 0:
        raise ValueError(f"v has an empty head dim (shape {tuple(v.shape)})")
    (b, s, hq, d), (bk, sk, hkv, dk) = q.shape, k.shape
    if b != bk:
        raise ValueError(f"q and k must have the same batch size, got {b} and {bk}")
    if s != sk:
        raise ValueError(f"q and k/v must hold the same local tokens (dimension 1), got {s} and "
                         f"{sk}; shard q, k and v with the same layout")
    if s == 0 or b == 0:
        raise ValueError(f"q is empty (shape {tuple(q.shape)}): batch and seq_local must be > 0")
    if d != dk:
        raise ValueError(f"head_dim of q ({d}) and k/v ({dk}) must match")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"q heads ({hq}) must be a multiple of k/v heads ({hkv}) for GQA/MQA; "
                         f"use a k/v head count that divides {hq}")


def _resolve_schedule(schedule: str, layout: str, causal: bool, part_len: int, R: int,
                      documents: bool, window: bool) -> str:
    """"auto" -> "helper" for contiguous causal attention over a ring without documents or
    window (when the ring part splits in the halves its last step needs), else "ring". With
    documents the helper schedule's balance no longer holds, and with a window the ring stops
    early and sends less, so "auto" keeps the ring. An explicit "helper" is checked;
    "allgather" runs on everything and is never picked by "auto" (not measured on GPUs yet)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    needs_even = R % 2 == 0 and R > 1
    if schedule == "auto":
        usable = (layout == "contiguous" and causal and R > 1 and not documents
                  and not window and not (needs_even and part_len % 2))
        return "helper" if usable else "ring"
    if schedule == "helper":
        if layout != "contiguous" or not causal:
            raise ValueError(
                f"schedule='helper' balances causal attention on the contiguous layout; got "
                f"layout={layout!r}, causal={causal}. Use schedule='ring' (zigzag and stripe "
                f"balance by layout; non-causal work is balanced already)")
        if needs_even and part_len % 2:
            raise ValueError(
                f"schedule='helper' with an even ring_degree={R} splits each ring rank's "
                f"{part_len} tokens in halves: make the local length even, or use "
                f"schedule='ring'")
    return schedule


def _ring_layout(q, mesh, layout: str, cu_seqlens) -> RingLayout:
    """The layout the caller sharded with, checked against q's local length."""
    U, R = mesh.ulysses_degree, mesh.ring_degree
    s_local = q.shape[1]
    if cu_seqlens is None:
        if layout == "packed":
            raise ValueError("layout='packed' places whole documents and needs cu_seqlens "
                             "(the same list shard used)")
        multiple = seq_multiple(layout, R, U)
        if (s_local * U * R) % multiple:
            local_multiple = multiple // math.gcd(multiple, U * R)
            raise ValueError(
                f"q has {s_local} local tokens; layout={layout!r} over ring_degree={R} x "
                f"ulysses_degree={U} needs a multiple of {local_multiple} per rank (a global "
                f"length multiple of {multiple}); shard with cu_seqlens=[0, length] to accept "
                f"any length")
        return ring_layout(layout, s_local * U * R, R, U)
    if q.shape[0] != 1:
        raise ValueError(f"cu_seqlens describes one packed row, but q has batch {q.shape[0]}; "
                         f"pack the batch into one row (batch 1) with its document boundaries")
    lay = ring_layout(layout, cu_seqlens[-1], R, U, cu_seqlens)
    if lay.local_len != s_local:
        raise ValueError(
            f"q has {s_local} local tokens, but layout={layout!r} over ring_degree={R} x "
            f"ulysses_degree={U} with these cu_seqlens (length {cu_seqlens[-1]}) gives every "
            f"rank {lay.local_len}: shard q, k and v with distattn.shard(..., layout="
            f"{layout!r}, cu_seqlens=...) using the same cu_seqlens")
    return lay


def prepare(q, k, v, *, mesh=None, causal=False, softmax_scale=None, layout="contiguous",
            schedule="auto", backend="auto", profiler=None, cu_seqlens=None, window=None,
            softcap=None, sinks=None, chunk_size=None, chunk_origin="row") -> RingConfig:
    """Check every argument of ``dist_flash_attn`` (raising before any communication) and
    return the execution config: mesh, plan, block backend, scale."""
    _check_tensors(q, k, v)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    check_layout(layout)
    check_backend(backend)
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    elif (not isinstance(softmax_scale, (int, float)) or isinstance(softmax_scale, bool)
          or not math.isfinite(softmax_scale) or softmax_scale <= 0):
        raise ValueError(f"softmax_scale must be a positive finite float or None (for "
                         f"1/sqrt(head_dim)), got {softmax_scale!r}")
    if profiler is not None and not callable(getattr(profiler, "span", None)):
        raise TypeError("profiler must be a distattn.profile.StepProfiler (or None)")
    cu_seqlens = check_cu_seqlens(cu_seqlens)
    window = _check_window(window)
    chunk_size = check_chunk_size(chunk_size)
    chunk_origin = check_chunk_origin(chunk_origin)
    softcap = _check_softcap(softcap)
    sinks = _check_sinks(sinks, q)
    mesh = as_mesh(mesh)
    U, R = mesh.ulysses_degree, mesh.ring_degree
    if U > 1:
        check_heads(q.shape[2], k.shape[2], U)
    lay = _ring_layout(q, mesh, layout, cu_seqlens)
    schedule = _resolve_schedule(schedule, layout, causal, lay.part_len, R,
                                 cu_seqlens is not None or chunk_size is not None,
                                 window is not None)
    block_backend = get_backend(backend, q, k, v, window=window is not None,
                                softcap=bool(softcap))
    if sinks is not None and U > 1:        # the executor sees this rank's head shard
        start, stop = head_split(q.shape[2], k.shape[2], U).q_bounds[mesh.ulysses_rank]
        sinks = sinks[start:stop]
    return RingConfig(mesh, _plan(lay, causal, window, schedule, chunk_size, chunk_origin),
                      block_backend,
                      float(softmax_scale), profiler, softcap, sinks)


def dist_flash_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mesh=None,
                    causal: bool = False, softmax_scale: float | None = None,
                    layout: str = "contiguous", schedule: str = "auto",
                    backend: str = "auto", return_lse: bool = False, profiler=None,
                    cu_seqlens=None, window=None, softcap=None, sinks=None,
                    chunk_size=None, chunk_origin="row"):
    """Exact softmax attention over a sequence sharded across the ranks of ``mesh``.

    q [B, S_local, Hq, D]; k [B, S_local, Hkv, D]; v [B, S_local, Hkv, Dv] with Hq % Hkv == 0
    (Dv may differ from D: MLA; the default scale is 1/sqrt(D)): this rank's tokens,
    sharded by ``layout`` ("contiguous", "zigzag", "stripe" or "packed"; see
    ``distattn.shard``).

    ``cu_seqlens``: global document boundaries of one packed row (batch 1), the same list on
    every rank and the one ``shard`` used; the last entry is the true length (any length).
    A query then sees keys of its own document only; padding slots of the layout are inert
    (out 0, lse -inf, zero gradients, whatever they hold).

    ``window=(left, right)``: query i sees key j only if ``i - left <= j <= i + right`` in
    global token positions (-1 = unbounded; transformers' ``sliding_window=W`` is ``(W - 1,
    0)`` with causal). Ring steps and blocks no window reaches are neither computed nor sent.
    ``chunk_size=c`` (chunked attention, Llama 4's ``attention_chunk_size``): query i sees
    key j only if ``i // c == j // c``. With ``chunk_origin="row"`` (default) i and j are
    *global token indices* of the row: with ``cu_seqlens`` the chunks are the global
    multiples of c intersected with the documents (transformers 4.57 on a packed row); with
    ``"document"`` they are positions within the document, so chunks restart at every
    document (transformers 5). Without documents the two agree. Chunks combine with causal,
    windows and documents; ring steps no chunk reaches are neither computed nor sent.
    ``softcap=c``: scores become ``c * tanh(score / c)`` before the softmax (Gemma 2).
    ``sinks`` [Hq] (differentiable): one extra logit per head in the softmax denominator,
    attached to no value (gpt-oss); the returned lse includes it. Its gradient on each rank
    is that rank's share: summed over the SP group it is the single-device gradient.

    ``mesh``: an SPMesh, a ProcessGroup (pure ring) or None (pure ring over the default
    group). Returns out [B, S_local, Hq, Dv] in q's dtype, differentiable in q, k and v, and
    with ``return_lse`` also lse [B, Hq, S_local] (natural log; float32, or float64 for
    float64 inputs; not differentiable).

    ``schedule``: "ring" (the layout's own balance), "helper" (DistFlashAttn's schedule:
    contiguous layout, causal), "allgather" (each ring rank gathers the K/V its queries see,
    computes in one launch and reduce-scatters dK/dV back; any layout) or "auto" (helper
    where it applies, else ring; never allgather).
    ``backend``: "auto", "cuda", "torch", "reference" or "emulate" (this project's CUDA
    kernels built for the CPU, for testing; see ``distattn.kernels``), or a
    ``distattn.kernels.BlockAttention`` object the caller keeps across calls (e.g.
    ``TorchBackend(pick="measure")``: what it measured on the first call per shape is reused).
    ``profiler``: a ``distattn.profile.StepProfiler`` to record per-step compute and
    communication-wait times.
    """
    call = dict(mesh=mesh, causal=causal, softmax_scale=softmax_scale, layout=layout,
                schedule=schedule, backend=backend, return_lse=return_lse, profiler=profiler,
                cu_seqlens=cu_seqlens, window=window, softcap=softcap, chunk_size=chunk_size,
                chunk_origin=chunk_origin)
    if torch.compiler.is_compiling():
        key, world = (int(x) + 0 for x in _register_call(**call))   # plain ints for the graph
        if world > 1:
            return _eager_call(q, k, v, sinks, key)
        return _traced_call(q, k, v, () if sinks is None else (sinks,), key)
    return _dist_flash_attn(q, k, v, sinks=sinks, **call)


# -- torch.compile (docs/DESIGN.md, "Backends": torch.compile) ------------------------------
# The planning above the kernels is host Python over static arguments (mesh, layout,
# documents); Dynamo does not trace it. ``_register_call`` runs at trace time
# (assume_constant_result) and stores the call's static arguments under an int key baked into
# the graph. On one rank, ``_traced_call`` (nonstrict_trace) runs the whole call with the
# traced tensors, so its kernels -- ATen ops and the ``distattn::`` custom ops -- land in the
# graph and autograd traces its backward: no graph break. With communication (world > 1) the
# collectives are in-place c10d calls that do not trace, so the call runs eagerly: one graph
# break per call (``_eager_call``).
_CALLS: dict = {}


@torch.compiler.assume_constant_result
def _register_call(**call) -> tuple:
    """(key, SP world size): this call's static arguments stored under ``key`` in ``_CALLS``."""
    mesh = call["mesh"]
    if isinstance(mesh, SPMesh):
        world = mesh.ulysses_degree * mesh.ring_degree
    else:
        world = torch.distributed.get_world_size(mesh)
    key = len(_CALLS)   # one entry per trace (compile or recompile), not per call
    _CALLS[key] = call
    return key, world


@torch._dynamo.nonstrict_trace
def _traced_call(q, k, v, sinks: tuple, key: int):
    """``sinks``: () or (sinks,) (a nonstrict_trace input cannot be None). The device-keyed
    tensor caches it meets are bypassed while tracing (``kernels/device_cache.py``)."""
    return _dist_flash_attn(q, k, v, sinks=sinks[0] if sinks else None, **_CALLS[key])


@torch.compiler.disable
def _eager_call(q, k, v, sinks, key: int):
    return _dist_flash_attn(q, k, v, sinks=sinks, **_CALLS[key])


def _dist_flash_attn(q, k, v, *, mesh, causal, softmax_scale, layout, schedule, backend,
                     return_lse, profiler, cu_seqlens, window, softcap, sinks, chunk_size,
                     chunk_origin):
    """``dist_flash_attn``, eagerly."""
    try:
        if not isinstance(return_lse, bool):
            raise TypeError(f"return_lse must be a bool, got {return_lse!r}")
        cfg = prepare(q, k, v, mesh=mesh, causal=causal, softmax_scale=softmax_scale,
                      layout=layout, schedule=schedule, backend=backend, profiler=profiler,
                      cu_seqlens=cu_seqlens, window=window, softcap=softcap, sinks=sinks,
                      chunk_size=chunk_size, chunk_origin=chunk_origin)
    except Exception as exc:   # raises it on every rank, at once
        fail_everywhere(mesh, "dist_flash_attn", exc)
    check_agreement(cfg.mesh, "dist_flash_attn", dict(
        q=q, k=k, v=v, causal=causal, softmax_scale=cfg.scale, layout=layout,
        schedule=schedule, backend=backend_key(backend), cu_seqlens=check_cu_seqlens(cu_seqlens),
        window=window, softcap=softcap, sinks=sinks, chunk_size=chunk_size,
        chunk_origin=chunk_origin, requires_grad=torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, k, v, sinks)),
        finite_check_on_host=host_readable(q)))
    with failure_marks(cfg.mesh, "dist_flash_attn"):
        out, lse = USPAttention.apply(q, k, v, sinks, cfg)
    return (out, lse) if return_lse else out


def dist_flash_attn_backward(dout, q, k, v, out, lse, **kwargs):
    """(dq, dk, dv) of ``dist_flash_attn(q, k, v, **kwargs)`` given what it returned (``out``
    and, with ``return_lse=True``, ``lse``) and the gradient ``dout`` of ``out``; with
    ``sinks=`` also this rank's share of dsinks as a fourth element. Runs the backward's
    communication and kernels only, never the forward (rematerialization-aware checkpointing
    uses this). Every rank of the mesh must call it."""
    try:
        cfg = prepare(q, k, v, **kwargs)
    except Exception as exc:   # raises it on every rank, at once
        fail_everywhere(kwargs.get("mesh"), "dist_flash_attn_backward", exc)
    check_agreement(cfg.mesh, "dist_flash_attn_backward", dict(
        dout=dout, q=q, k=k, v=v, out=out, lse=lse, softmax_scale=cfg.scale,
        **{name: value for name, value in kwargs.items()
           if name not in ("mesh", "profiler", "softmax_scale", "cu_seqlens", "backend")},
        backend=backend_key(kwargs.get("backend", "auto")),
        cu_seqlens=check_cu_seqlens(kwargs.get("cu_seqlens")),
        finite_check_on_host=host_readable(q)))
    with failure_marks(cfg.mesh, "dist_flash_attn_backward"):
        grads = usp_backward(dout, q, k, v, out, lse, cfg)
    sinks = kwargs.get("sinks")
    return grads if sinks is None else grads + (sinks_grad(dout, out, lse, sinks),)
