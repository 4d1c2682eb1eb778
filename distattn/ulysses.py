"""Ulysses head bookkeeping: which degrees can split the heads, and K/V head repetition.

A rank of a Ulysses group of U holds [B, n, H, D]: n tokens, all heads. After the all-to-all
(``comm.all_to_all``, scattering heads and gathering the sequence; see ``hybrid``) it holds
[B, U*n, H/U, D]: the group's U*n tokens in group-rank order and heads [u*H/U, (u+1)*H/U).

GQA/MQA: K/V heads must split over U too. When U > Hkv and U is a multiple of Hkv, each K/V
head is repeated U/Hkv times (``repeat_kv_heads``, just enough for one head per rank) before
the all-to-all; ``hybrid.usp_backward`` sums the copies' gradients back. Query head h of rank u then still
reads the K/V head it reads on one device.
"""
from __future__ import annotations

import torch


def valid_ulysses_degrees(hq: int, hkv: int, limit: int = 64) -> list[int]:
    """Ulysses degrees that can split these head counts (up to ``limit``)."""
    return [d for d in range(1, limit + 1)
            if hq % d == 0 and (hkv % d == 0 or d % hkv == 0)]


def check_heads(hq: int, hkv: int, degree: int) -> None:
    """Raise ValueError when a Ulysses group of ``degree`` cannot split the heads."""
    if hq % degree == 0 and (hkv % degree == 0 or degree % hkv == 0):
        return
    raise ValueError(
        f"ulysses_degree={degree} cannot split q heads Hq={hq} and k/v heads Hkv={hkv}: it "
        f"must divide Hq and either divide Hkv or be a multiple of it. Ulysses degrees that "
        f"work for these heads: {valid_ulysses_degrees(hq, hkv)}; or move more of the group "
        f"into ring_degree")


def repeat_kv_heads(kv: torch.Tensor, degree: int, head_dim: int = 2) -> torch.Tensor:
    """Repeat each K/V head just enough that ``degree`` ranks get one head each (only when
    Hkv < degree); differentiable."""
    hkv = kv.shape[head_dim]
    if hkv >= degree:
        return kv
    return kv.repeat_interleave(degree // hkv, dim=head_dim)
