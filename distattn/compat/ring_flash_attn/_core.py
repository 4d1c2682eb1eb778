"""The one adapter every ring-flash-attention entry point goes through: the upstream argument
conventions (``dropout_p``, ``window_size``, ``alibi_slopes``, ``return_attn_probs``, ``group``)
translated to one call of ``distattn.dist_flash_attn``. No attention math and no ring loop here.

What differs from upstream 0.1.x, on purpose:

- ``window_size=(left, right)`` is a *global* window: query at global position i sees keys j
  with i - left <= j <= i + right, wherever they live. Upstream hands the window to each
  per-block flash call in local coordinates, which is only right for a single block.
- ``softcap`` (extra keyword, default 0.0 = off) is supported; so are non-causal attention for
  every layout (upstream stripe asserts causal), GQA/MQA with unexpanded K/V, and float16,
  bfloat16, float32 and float64.
- ``dropout_p > 0`` and ``alibi_slopes`` are refused with ValueError (distattn computes
  neither), before any communication.
- ``deterministic`` is accepted and ignored: distattn's backward is deterministic.
- ``return_attn_probs=True`` returns ``(out, lse, None)`` like upstream: lse is the natural-log
  softmax denominator, [B, H, S_local] (varlen: [H, total_local]); the third element (the
  attention probabilities) is always None.
"""
from __future__ import annotations

import torch

from ...attention import dist_flash_attn


def check_unsupported(dropout_p, alibi_slopes, where: str) -> None:
    if dropout_p not in (0, 0.0, None):
        raise ValueError(f"{where}: dropout_p={dropout_p!r} is not supported by distattn "
                         f"(exact attention only); pass dropout_p=0.0 and apply dropout "
                         f"outside attention if you need it")
    if alibi_slopes is not None:
        raise ValueError(f"{where}: alibi_slopes are not supported by distattn; pass "
                         f"alibi_slopes=None")


def window_of(window_size, where: str):
    if window_size is None:
        return None
    try:
        left, right = (int(x) for x in window_size)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: window_size must be a pair (left, right) with -1 for "
                         f"unbounded, got {window_size!r}") from None
    return None if (left, right) == (-1, -1) else (left, right)


def attend(q, k, v, *, where: str, layout: str, dropout_p=0.0, softmax_scale=None,
           causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
           return_attn_probs=False, group=None, cu_seqlens=None, varlen=False):
    """q [B, S_local, H, D] (varlen: [total_local, H, D]), k/v likewise with Hkv heads.
    Returns out like q, or (out, lse, None) with ``return_attn_probs``."""
    check_unsupported(dropout_p, alibi_slopes, where)
    window = window_of(window_size, where)
    if varlen:
        q, k, v = (t.unsqueeze(0) for t in (q, k, v))
    out, lse = dist_flash_attn(q, k, v, mesh=group, causal=bool(causal),
                               softmax_scale=softmax_scale, layout=layout, return_lse=True,
                               cu_seqlens=cu_seqlens, window=window,
                               softcap=softcap if softcap else None)
    if varlen:
        out, lse = out.squeeze(0), lse.squeeze(0)
    return (out, lse, None) if return_attn_probs else out


def split_kv(kv: torch.Tensor, dim: int):
    """k, v of a packed kv tensor (the 2 sits at ``dim``)."""
    return kv.select(dim, 0), kv.select(dim, 1)


def split_qkv(qkv: torch.Tensor, dim: int):
    return qkv.select(dim, 0), qkv.select(dim, 1), qkv.select(dim, 2)


def world_of(group):
    import torch.distributed as dist
    return dist.get_world_size(group), dist.get_rank(group)


def as_int_list(cu) -> list:
    return [int(x) for x in (cu.tolist() if isinstance(cu, torch.Tensor) else cu)]
