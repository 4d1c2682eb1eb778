"""Reference backend: attention written out in plain PyTorch tensor math.

Runs on any device and dtype and is the ground truth the other backends are tested against.
It computes in the accumulation dtype (float32, or float64 for float64 inputs) and
materialises the [Sq, Sk] score matrix, so it is meant for correctness, not speed. GQA is a
grouped view of the query heads: q [B, Sq, Hkv, G, D] meets k [B, Sk, Hkv, D] directly.
"""
from __future__ import annotations

import torch

from .base import BlockAttention, empty_result
from .mask import Mask, accumulation_dtype


def _grouped(q: torch.Tensor, hkv: int) -> torch.Tensor:
    b, s, hq, d = q.shape
    return q.reshape(b, s, hkv, hq // hkv, d)


def _probabilities(q, k, lse_or_none, scale, mask: Mask):
    """Scores -> (P [B, Hkv, G, Sq, Sk], lse [B, Hkv, G, Sq]) in q's dtype (already upcast)."""
    scores = torch.einsum("bqhgd,bkhd->bhgqk", q, k) * scale
    visible = mask.dense(q.shape[1], k.shape[1], device=q.device)
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1) if lse_or_none is None else lse_or_none
    # exp(-inf - lse) is 0 for masked keys; rows with lse = -inf saw nothing and get P = 0.
    finite = torch.isfinite(lse).unsqueeze(-1)
    p = torch.where(finite & visible, torch.exp(scores - lse.unsqueeze(-1)),
                    torch.zeros((), dtype=scores.dtype, device=scores.device))
    return p, lse


class ReferenceBackend(BlockAttention):
    name = "reference"

    def forward(self, q, k, v, *, scale, mask):
        acc = accumulation_dtype(q.dtype)
        mask = mask.simplify(q.shape[1], k.shape[1])
        if mask.kind == "empty":
            return empty_result(q, acc)
        b, sq, hq, d = q.shape
        hkv = k.shape[2]
        qg = _grouped(q.to(acc), hkv)
        p, lse = _probabilities(qg, k.to(acc), None, scale, mask)
        out = torch.einsum("bhgqk,bkhd->bqhgd", p, v.to(acc)).reshape(b, sq, hq, -1)
        return out.to(q.dtype), lse.reshape(b, hq, sq)

    def backward(self, dout, q, k, v, out, lse, *, scale, mask):
        acc = accumulation_dtype(q.dtype)
        mask = mask.simplify(q.shape[1], k.shape[1])
        if mask.kind == "empty":
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        b, sq, hq, d = q.shape
        hkv = k.shape[2]
        g = hq // hkv
        qg, dog, og = (_grouped(t.to(acc), hkv) for t in (q, dout, out))
        kf, vf = k.to(acc), v.to(acc)
        lse_g = lse.to(acc).reshape(b, hkv, g, sq)
        p, _ = _probabilities(qg, kf, lse_g, scale, mask)
        dp = torch.einsum("bqhgd,bkhd->bhgqk", dog, vf)
        delta = (dog * og).sum(-1).permute(0, 2, 3, 1).unsqueeze(-1)  # [B, Hkv, G, Sq, 1]
        ds = p * (dp - delta)
        dq = torch.einsum("bhgqk,bkhd->bqhgd", ds, kf).reshape(b, sq, hq, -1) * scale
        dk = torch.einsum("bhgqk,bqhgd->bkhd", ds, qg) * scale
        dv = torch.einsum("bhgqk,bqhgd->bkhd", p, dog)
        return dq, dk, dv


def reference_attention(q, k, v, *, causal=False, scale=None):
    """Whole-sequence attention for tests and checks: (out, lse) with the reference math."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    mask = Mask.causal(0) if causal else Mask.none()
    return ReferenceBackend().forward(q, k, v, scale=scale, mask=mask)
