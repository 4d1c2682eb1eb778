"""Ulysses: sequence shards <-> head shards, and the head bookkeeping that goes with it.

A rank of a Ulysses group of U holds [B, n, H, D]: n tokens, all heads. After
``seq_to_heads`` it holds [B, U*n, H/U, D]: the group's U*n tokens in group-rank order and
heads [u*H/U, (u+1)*H/U). ``heads_to_seq`` is the inverse. Both are differentiable (the
backward of each is the other), for users who put their own attention between them;
``dist_flash_attn`` itself runs the same all-to-alls inside one autograd Function
(``hybrid.USPAttention``) so its backward can also run alone.

GQA/MQA: K/V heads must split over U too. When U > Hkv and U is a multiple of Hkv, each K/V
head is repeated U/Hkv times (``repeat_kv_heads``, just enough for one head per rank) before
the all-to-all; ``hybrid.usp_backward`` sums the copies' gradients back. Query head h of rank u then still
reads the K/V head it reads on one device.
"""
from __future__ import annotations

import torch

from .comm import all_to_all


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, world: int, scatter_dim: int, gather_dim: int):
        ctx.args = (group, world, scatter_dim, gather_dim)
        return all_to_all(x, group, world, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        group, world, scatter_dim, gather_dim = ctx.args
        # the inverse all-to-all: scatter what was gathered, gather what was scattered
        dx = all_to_all(grad.contiguous(), group, world, gather_dim, scatter_dim)
        return dx, None, None, None, None


def seq_to_heads(x: torch.Tensor, mesh, head_dim: int = 2, seq_dim: int = 1) -> torch.Tensor:
    """[.., n (seq_dim), H (head_dim), ..] -> [.., U*n, H/U, ..] over ``mesh``'s Ulysses group."""
    return _AllToAll.apply(x, mesh.ulysses_group, mesh.ulysses_degree, head_dim, seq_dim)


def heads_to_seq(x: torch.Tensor, mesh, head_dim: int = 2, seq_dim: int = 1) -> torch.Tensor:
    """Inverse of ``seq_to_heads``."""
    return _AllToAll.apply(x, mesh.ulysses_group, mesh.ulysses_degree, seq_dim, head_dim)


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
