"""Ulysses: sequence shards <-> head shards, and the head bookkeeping that goes with it.

A rank of a Ulysses group of U holds [B, n, H, D]: n tokens, all heads. After
``seq_to_heads`` it holds [B, U*n, H/U, D]: the group's U*n tokens in group-rank order and
heads [u*H/U, (u+1)*H/U). ``heads_to_seq`` is the inverse. Both are differentiable (the
backward of each is the other), for users who put their own attention between them;
``dist_flash_attn`` itself runs the same all-to-alls inside one autograd Function
(``hybrid.USPAttention``) so its backward can also run alone.

GQA/MQA: K/V heads must split over U too. When U > Hkv and U is a multiple of Hkv, each K/V
head is repeated U/Hkv times (``repeat_kv_heads``, just enough for one head per rank) before
the all-to-all; ``hybrid._heads_backward`` (both backward paths) sums the copies' gradients
back. Query head h of rank u then still reads the K/V head it reads on one device.
"""
from __future__ import annotations

from dataclasses import dataclass

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
    """Ulysses degrees that split these head counts evenly (up to ``limit``); every degree
    up to Hq works, the others split unevenly (``head_split``)."""
    return [d for d in range(1, limit + 1)
            if hq % d == 0 and (hkv % d == 0 or d % hkv == 0)]


@dataclass(frozen=True)
class HeadSplit:
    """Which heads each rank of a Ulysses group of ``degree`` computes.

    Rank u gets q heads ``q_bounds[u] = (start, stop)`` (contiguous, in rank order) and the
    K/V heads ``kv_index[u]`` (indices into the Hkv heads, a K/V head listed on several
    ranks is sent to each: "repeated just enough"). Its local call is plain GQA: local q
    head i reads local K/V head ``i // group_u`` with ``group_u = (stop - start) //
    len(kv_index[u])`` (ranks may differ; ring peers share a Ulysses rank, hence shapes).

    The unit is a q head group of ``group`` heads with its K/V head: each K/V head's Hq/Hkv
    query heads are cut into ``c`` units (the smallest divisor c of Hq/Hkv with Hkv*c >=
    degree, so K/V is repeated as little as possible), and the Hkv*c units are dealt out
    contiguously, the first ``units % degree`` ranks one more. ``even``: every rank has the
    same heads, exactly the split of ``repeat_kv_heads`` (the equal all-to-all of
    ``comm.all_to_all`` applies).
    """
    hq: int
    hkv: int
    degree: int
    q_bounds: tuple
    kv_index: tuple
    even: bool

    def q_count(self, u: int) -> int:
        return self.q_bounds[u][1] - self.q_bounds[u][0]


def head_split(hq: int, hkv: int, degree: int) -> HeadSplit:
    """The split of ``hq`` q heads and ``hkv`` K/V heads over ``degree`` ranks (see
    ``HeadSplit``); raises ValueError when there are fewer q heads than ranks."""
    check_heads(hq, hkv, degree)
    g = hq // hkv
    c = next(c for c in range(1, g + 1) if g % c == 0 and hkv * c >= degree)
    units, size = hkv * c, g // c          # units of `size` q heads, one K/V head each
    base, extra = divmod(units, degree)
    q_bounds, kv_index, at = [], [], 0
    for u in range(degree):
        n = base + (u < extra)
        q_bounds.append((at * size, (at + n) * size))
        kv_index.append(tuple(unit // c for unit in range(at, at + n)))
        at += n
    # c > 1 repeats every K/V head c times; a rank's units of one K/V head then share it
    # A rank holding several units of one K/V head needs that head once when each of its
    # K/V heads has the same number of units (its local group is then larger); otherwise
    # the head is sent once per unit so that the rank's local call stays plain GQA.
    kv_index = [tuple(dict.fromkeys(ix)) if all(ix.count(h) == ix.count(ix[0]) for h in ix)
                else ix for ix in kv_index]
    even = hq % degree == 0 and (hkv % degree == 0 or degree % hkv == 0)
    return HeadSplit(hq, hkv, degree, tuple(q_bounds), tuple(kv_index), even)


def check_heads(hq: int, hkv: int, degree: int) -> None:
    """Raise ValueError when a Ulysses group of ``degree`` cannot split the heads: Hq must
    be a multiple of Hkv and at least the degree (uneven splits are fine)."""
    if hkv >= 1 and hq % hkv == 0 and 1 <= degree <= hq:
        return
    raise ValueError(
        f"ulysses_degree={degree} cannot split q heads Hq={hq} and k/v heads Hkv={hkv}: "
        f"every Ulysses rank needs at least one q head (degree <= Hq). Degrees that split "
        f"these heads evenly: {valid_ulysses_degrees(hq, hkv)}; or move more of the group "
        f"into ring_degree")


def repeat_kv_heads(kv: torch.Tensor, degree: int, head_dim: int = 2) -> torch.Tensor:
    """Repeat each K/V head just enough that ``degree`` ranks get one head each (only when
    Hkv < degree); differentiable."""
    hkv = kv.shape[head_dim]
    if hkv >= degree:
        return kv
    return kv.repeat_interleave(degree // hkv, dim=head_dim)
