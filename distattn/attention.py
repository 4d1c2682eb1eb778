"""``dist_flash_attn``: the entry point training code calls (DESIGN.md section 1).

All arguments are checked on every rank before any communication starts, so a bad call raises
the same clear error everywhere instead of leaving other ranks waiting in a collective.
"""
from __future__ import annotations

import functools
import math

import torch

from .hybrid import usp_attention
from .kernels import BACKENDS, get_backend
from .layout import LAYOUTS, check_layout, seq_multiple
from .mesh import as_mesh
from .plan import ring_plan
from .ring import RingConfig
from .ulysses import check_heads

SCHEDULES = ("auto", "ring", "helper")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@functools.lru_cache(maxsize=128)
def _plan(world: int, layout: str, causal: bool):
    return ring_plan(world, layout, causal)


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
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
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


def dist_flash_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mesh=None,
                    causal: bool = False, softmax_scale: float | None = None,
                    layout: str = "contiguous", schedule: str = "auto",
                    backend: str = "auto", return_lse: bool = False):
    """Exact softmax attention over a sequence sharded across the ranks of ``mesh``.

    q [B, S_local, Hq, D]; k, v [B, S_local, Hkv, D] with Hq % Hkv == 0: this rank's tokens,
    sharded by ``layout`` ("contiguous", "zigzag" or "stripe"; see ``distattn.shard``).
    ``mesh``: an SPMesh, a ProcessGroup (pure ring) or None (pure ring over the default
    group). Returns out [B, S_local, Hq, D] in q's dtype, differentiable in q, k and v, and
    with ``return_lse`` also lse [B, Hq, S_local] (natural log; float32, or float64 for
    float64 inputs; not differentiable).

    ``schedule``: "auto" or "ring" (the layout's own balance). ``backend``: "auto", "cuda",
    "torch" or "reference" (see ``distattn.kernels``).
    """
    _check_tensors(q, k, v)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {return_lse!r}")
    check_layout(layout)
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if schedule == "helper":
        raise NotImplementedError(
            "schedule='helper' (the DistFlashAttn helper schedule) is not implemented yet; "
            "use schedule='auto' or 'ring', or layout='zigzag'/'stripe' for causal balance")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    elif (not isinstance(softmax_scale, (int, float)) or isinstance(softmax_scale, bool)
          or not math.isfinite(softmax_scale) or softmax_scale <= 0):
        raise ValueError(f"softmax_scale must be a positive finite float or None (for "
                         f"1/sqrt(head_dim)), got {softmax_scale!r}")
    mesh = as_mesh(mesh)
    U, R = mesh.ulysses_degree, mesh.ring_degree
    if U > 1:
        check_heads(q.shape[2], k.shape[2], U)
    s_local = q.shape[1]
    multiple = seq_multiple(layout, R, U)
    if (s_local * U * R) % multiple:
        local_multiple = multiple // math.gcd(multiple, U * R)
        raise ValueError(
            f"q has {s_local} local tokens; layout={layout!r} over ring_degree={R} x "
            f"ulysses_degree={U} needs a multiple of {local_multiple} per rank (a global "
            f"length multiple of {multiple}); pad the sequence")
    block_backend = get_backend(backend, q, k, v)
    cfg = RingConfig(mesh, _plan(R, layout, causal), block_backend, float(softmax_scale))
    out, lse = usp_attention(q, k, v, cfg)
    return (out, lse) if return_lse else out
