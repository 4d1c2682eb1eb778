"""USP: Ulysses inside, ring across (pure ring and pure Ulysses are its edge cases).

Each rank holds n tokens of its ring part with all heads. The Ulysses all-to-all turns that
into the whole ring part (U*n tokens) with H/U heads; ring attention over the ring group then
runs on those; the inverse all-to-all returns the output (and lse) to sequence shards. With
U = 1 there is no all-to-all; with R = 1 the ring is a single local step.
"""
from __future__ import annotations

import torch

from .comm import all_to_all
from .ring import RingAttention, RingConfig
from .ulysses import heads_to_seq, repeat_kv_heads, seq_to_heads


def usp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: RingConfig):
    """(out [B, n, Hq, D], lse [B, Hq, n]) for this rank's n tokens."""
    mesh = cfg.mesh
    U, group = mesh.ulysses_degree, mesh.ulysses_group
    if U == 1:
        return RingAttention.apply(q, k, v, cfg)
    # K and V share one all-to-all: [2, B, n, Hkv, D], heads on dim 3, sequence on dim 2.
    kv = repeat_kv_heads(torch.stack([k, v]), U, head_dim=3)
    kv = seq_to_heads(kv, group, U, head_dim=3, seq_dim=2)
    q = seq_to_heads(q, group, U)
    out, lse = RingAttention.apply(q, kv[0], kv[1], cfg)
    out = heads_to_seq(out, group, U)
    lse = all_to_all(lse, group, U, scatter_dim=2, gather_dim=1)
    return out, lse
