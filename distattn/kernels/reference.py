"""Reference backend: attention written out in plain PyTorch tensor math.

Runs on any device and dtype and is the ground truth the other backends are tested against.
It computes in the accumulation dtype (float32, or float64 for float64 inputs) and
materialises each piece's score matrix, so it is meant for correctness, not speed. GQA is a
grouped view of the query heads: q [B, Sq, Hkv, G, D] meets k [B, Sk, Hkv, D] directly.
"""
from __future__ import annotations

import torch

from .base import BlockAttention, band_tiles, empty_result
from .mask import Mask, accumulation_dtype


def _grouped(q: torch.Tensor, hkv: int) -> torch.Tensor:
    b, s, hq, d = q.shape
    return q.reshape(b, s, hkv, hq // hkv, d)


def _scores(q, k, scale, softcap):
    """Scaled (and soft-capped) scores [B, Hkv, G, Sq, Sk] and, with softcap, the derivative
    of the cap (1 - tanh^2) that backward needs; None without softcap."""
    scores = torch.einsum("bqhgd,bkhd->bhgqk", q, k) * scale
    if not softcap:
        return scores, None
    capped = torch.tanh(scores / softcap)
    return capped * softcap, 1 - capped * capped


def _probabilities(scores, lse_or_none, mask: Mask):
    """Scores -> (P [B, Hkv, G, Sq, Sk], lse [B, Hkv, G, Sq]) with the mask applied."""
    visible = mask.dense(scores.shape[-2], scores.shape[-1], device=scores.device)
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1) if lse_or_none is None else lse_or_none
    # exp(-inf - lse) is 0 for masked keys; rows with lse = -inf saw nothing and get P = 0.
    finite = torch.isfinite(lse).unsqueeze(-1)
    p = torch.where(finite & visible, torch.exp(scores - lse.unsqueeze(-1)),
                    torch.zeros((), dtype=scores.dtype, device=scores.device))
    return p, lse


class ReferenceBackend(BlockAttention):
    """Every mask and softcap; pieces run one by one on their own rectangles (base class), a
    narrow band (sliding window) in row tiles of its width (``band_tiles``)."""
    name = "reference"

    def forward_piece(self, q, k, v, *, scale, mask, softcap=0.0):
        tiles = list(band_tiles(mask, q.shape[1], k.shape[1]))
        if len(tiles) == 1 and tiles[0][2] is mask:
            return self._forward_dense(q, k, v, scale=scale, mask=mask, softcap=softcap)
        out, lse = empty_result(q, accumulation_dtype(q.dtype), v.shape[-1])
        for rows, cols, sub in tiles:       # disjoint rows: each row written once
            o, l = self._forward_dense(q[:, rows], k[:, cols], v[:, cols], scale=scale,
                                       mask=sub, softcap=softcap)
            out[:, rows] = o
            lse[:, :, rows] = l
        return out, lse

    def backward_piece(self, dout, q, k, v, out, lse, *, scale, mask, softcap=0.0):
        tiles = list(band_tiles(mask, q.shape[1], k.shape[1]))
        if len(tiles) == 1 and tiles[0][2] is mask:
            return self._backward_dense(dout, q, k, v, out, lse, scale=scale, mask=mask,
                                        softcap=softcap)
        acc = accumulation_dtype(q.dtype)
        dq, dk, dv = (torch.zeros(t.shape, dtype=acc, device=q.device) for t in (q, k, v))
        for rows, cols, sub in tiles:
            g = self._backward_dense(dout[:, rows], q[:, rows], k[:, cols], v[:, cols],
                                     out[:, rows], lse[:, :, rows], scale=scale, mask=sub,
                                     softcap=softcap)
            dq[:, rows] += g[0]
            dk[:, cols] += g[1]
            dv[:, cols] += g[2]
        return dq, dk, dv

    def _forward_dense(self, q, k, v, *, scale, mask, softcap=0.0):
        acc = accumulation_dtype(q.dtype)
        b, sq, hq, d = q.shape
        hkv = k.shape[2]
        scores, _ = _scores(_grouped(q.to(acc), hkv), k.to(acc), scale, softcap)
        p, lse = _probabilities(scores, None, mask)
        out = torch.einsum("bhgqk,bkhd->bqhgd", p, v.to(acc)).reshape(b, sq, hq, -1)
        return out.to(q.dtype), lse.reshape(b, hq, sq)

    def _backward_dense(self, dout, q, k, v, out, lse, *, scale, mask, softcap=0.0):
        acc = accumulation_dtype(q.dtype)
        b, sq, hq, d = q.shape
        hkv = k.shape[2]
        g = hq // hkv
        qg, dog, og = (_grouped(t.to(acc), hkv) for t in (q, dout, out))
        kf, vf = k.to(acc), v.to(acc)
        lse_g = lse.to(acc).reshape(b, hkv, g, sq)
        scores, cap_grad = _scores(qg, kf, scale, softcap)
        p, _ = _probabilities(scores, lse_g, mask)
        dp = torch.einsum("bqhgd,bkhd->bhgqk", dog, vf)
        delta = (dog * og).sum(-1).permute(0, 2, 3, 1).unsqueeze(-1)  # [B, Hkv, G, Sq, 1]
        ds = p * (dp - delta)
        if cap_grad is not None:
            ds = ds * cap_grad
        dq = torch.einsum("bhgqk,bkhd->bqhgd", ds, kf).reshape(b, sq, hq, -1) * scale
        dk = torch.einsum("bhgqk,bqhgd->bkhd", ds, qg) * scale
        dv = torch.einsum("bhgqk,bqhgd->bkhd", p, dog)
        return dq, dk, dv


def reference_attention(q, k, v, *, causal=False, scale=None, mask=None, softcap=0.0):
    """Whole-sequence attention for tests and checks: (out, lse) with the reference math.
    ``mask`` (a ``Mask`` over the whole sequence) overrides ``causal``."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if mask is None:
        mask = Mask.causal(0) if causal else Mask.none()
    return ReferenceBackend().forward(q, k, v, scale=scale, mask=mask, softcap=softcap)
