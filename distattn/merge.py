"""Online-softmax merge of partial attention results (docs/DESIGN.md, "Merge and sinks").

Two partial results over disjoint key sets, (out_a, lse_a) and (out_b, lse_b), combine into
the result over the union:

    m   = max(lse_a, lse_b)
    lse = m + log(exp(lse_a - m) + exp(lse_b - m))
    out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse)

computed in the accumulators' dtype (float32, or float64 for float64 inputs). A side with
lse = -inf (it saw no key) contributes weight exactly 0; when both are -inf the result stays
lse = -inf, out unchanged (zero). No NaN can come out of an empty row.

Shapes: out [B, S, H, D], lse [B, H, S]. The CUDA backend has the same operation as a kernel.
"""
from __future__ import annotations

import torch


def merge_(out_acc: torch.Tensor, lse_acc: torch.Tensor, out_blk: torch.Tensor,
           lse_blk: torch.Tensor) -> None:
    """Fold (out_blk, lse_blk) into the accumulators in place. The accumulators may be strided
    views; ``out_blk`` may have a lower precision than ``out_acc``.

    Eight elementwise kernels: ``logaddexp`` is the guarded update itself (max +
    log1p(exp(-|d|)), exact for -inf on either side and -inf when both are), the weights
    exp(lse_side - lse) are normalised by construction, and where both sides are -inf the
    shift (lse clamped to the dtype's lowest finite value) makes both weights exp(-inf) = 0.
    NaN propagates (a NaN lse makes the row's out and lse NaN)."""
    lse_blk = lse_blk.to(lse_acc.dtype)
    new_lse = torch.logaddexp(lse_acc, lse_blk)
    shift = new_lse.clamp_min(torch.finfo(new_lse.dtype).min)
    w_acc = torch.exp(lse_acc - shift).transpose(1, 2).unsqueeze(-1)   # [B, S, H, 1]
    w_blk = torch.exp(lse_blk - shift).transpose(1, 2).unsqueeze(-1)
    out_acc.mul_(w_acc).addcmul_(out_blk, w_blk)
    lse_acc.copy_(new_lse)


def new_accumulators(q: torch.Tensor, acc_dtype: torch.dtype, dv: int | None = None):
    """Empty running result for queries q [B, S, H, D]: out [B, S, H, Dv] = 0 (Dv: V's head
    dim, default D), lse = -inf."""
    b, s, h, d = q.shape
    d = d if dv is None else dv
    out = torch.zeros(b, s, h, d, dtype=acc_dtype, device=q.device)
    lse = torch.full((b, h, s), float("-inf"), dtype=acc_dtype, device=q.device)
    return out, lse
