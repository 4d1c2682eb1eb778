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
    views; ``out_blk`` may have a lower precision than ``out_acc``."""
    lse_blk = lse_blk.to(lse_acc.dtype)
    m = torch.maximum(lse_acc, lse_blk)
    # Where both sides are -inf, use 0 as the shift so the exponentials below are exp(-inf) = 0.
    m_safe = torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)
    w_acc = torch.exp(lse_acc - m_safe)
    w_blk = torch.exp(lse_blk - m_safe)
    total = w_acc + w_blk
    new_lse = torch.where(total > 0, m_safe + torch.log(total), m)
    # Normalised weights; 0/0 cannot happen because total == 0 forces both weights to 0.
    inv = torch.where(total > 0, 1.0 / total, torch.zeros_like(total))
    w_acc = (w_acc * inv).transpose(1, 2).unsqueeze(-1)   # [B, S, H, 1]
    w_blk = (w_blk * inv).transpose(1, 2).unsqueeze(-1)
    out_acc.mul_(w_acc).add_(out_blk.to(out_acc.dtype) * w_blk)
    lse_acc.copy_(new_lse)


def new_accumulators(q: torch.Tensor, acc_dtype: torch.dtype, dv: int | None = None):
    """Empty running result for queries q [B, S, H, D]: out [B, S, H, Dv] = 0 (Dv: V's head
    dim, default D), lse = -inf."""
    b, s, h, d = q.shape
    d = d if dv is None else dv
    out = torch.zeros(b, s, h, d, dtype=acc_dtype, device=q.device)
    lse = torch.full((b, h, s), float("-inf"), dtype=acc_dtype, device=q.device)
    return out, lse
