"""Sequence layouts: which global tokens each rank holds (DESIGN.md section 1).

The global sequence of length S is first split over the R ring ranks by the layout:

- ``contiguous``: ring rank r holds tokens [r*S/R, (r+1)*S/R);
- ``zigzag``: the sequence is cut into 2R equal chunks; ring rank r holds chunks r and
  2R-1-r, in that order (early and late tokens together balance causal work);
- ``stripe``: token t lives on ring rank t mod R (rank r holds r, r+R, r+2R, ...).

Each ring rank's part is then split contiguously over its U Ulysses ranks. ``shard``,
``unshard`` and ``positions`` implement exactly that, so users never reorder tokens by hand.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .mesh import SPMesh, as_mesh

LAYOUTS = ("contiguous", "zigzag", "stripe")


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def seq_multiple(layout: str, ring_degree: int, ulysses_degree: int) -> int:
    """The global sequence length must be a multiple of this for the layout and mesh: each
    ring part (S/R tokens; two equal chunks for zigzag) must split evenly over U ranks."""
    check_layout(layout)
    per_part = math.lcm(2, ulysses_degree) if layout == "zigzag" else ulysses_degree
    return ring_degree * per_part


def check_seq_len(seq_len: int, layout: str, ring_degree: int, ulysses_degree: int,
                  arg: str = "seq_len") -> None:
    m = seq_multiple(layout, ring_degree, ulysses_degree)
    if seq_len % m:
        raise ValueError(
            f"{arg}={seq_len} cannot be split by layout={layout!r} over ring_degree="
            f"{ring_degree} x ulysses_degree={ulysses_degree}: it must be a multiple of {m} "
            f"(pad the sequence to a multiple of {m})")


def ring_part_indices(seq_len: int, ring_degree: int, ring_rank: int, layout: str) -> torch.Tensor:
    """Global token indices held by ring rank ``ring_rank``, in local order (int64, CPU)."""
    check_layout(layout)
    R, r = ring_degree, ring_rank
    if layout == "contiguous":
        n = seq_len // R
        return torch.arange(r * n, (r + 1) * n)
    if layout == "zigzag":
        c = seq_len // (2 * R)
        return torch.cat([torch.arange(r * c, (r + 1) * c),
                          torch.arange((2 * R - 1 - r) * c, (2 * R - r) * c)])
    return torch.arange(r, seq_len, R)


def local_indices(seq_len: int, mesh: SPMesh, layout: str) -> torch.Tensor:
    """Global token indices held by this rank (int64, CPU)."""
    check_seq_len(seq_len, layout, mesh.ring_degree, mesh.ulysses_degree)
    part = ring_part_indices(seq_len, mesh.ring_degree, mesh.ring_rank, layout)
    n = part.numel() // mesh.ulysses_degree
    return part[mesh.ulysses_rank * n:(mesh.ulysses_rank + 1) * n]


def shard(x: torch.Tensor, mesh=None, dim: int = 1, layout: str = "contiguous") -> torch.Tensor:
    """This rank's part of the full tensor ``x`` (the same on every rank) along ``dim``.
    Pure indexing, no communication; differentiable."""
    mesh = as_mesh(mesh)
    dim = dim % x.dim()
    idx = local_indices(x.shape[dim], mesh, layout)
    if layout == "contiguous":
        return x.narrow(dim, int(idx[0]), idx.numel()) if idx.numel() else x.narrow(dim, 0, 0)
    return x.index_select(dim, idx.to(x.device))


def _all_gather(t: torch.Tensor, group, n: int) -> list[torch.Tensor]:
    if n == 1:
        return [t]
    parts = [torch.empty_like(t) for _ in range(n)]
    dist.all_gather(parts, t, group=group)
    return parts


def unshard(local: torch.Tensor, mesh=None, dim: int = 1,
            layout: str = "contiguous") -> torch.Tensor:
    """Inverse of ``shard``: the full tensor on every rank (all-gather, then reorder). Every
    rank of the mesh must call it with same-shaped tensors. Not differentiable: the result
    carries no autograd history."""
    mesh = as_mesh(mesh)
    dim = dim % local.dim()
    local = local.detach().contiguous()
    # Ulysses pieces concatenate (in u order) into this ring rank's part ...
    part = torch.cat(_all_gather(local, mesh.ulysses_group, mesh.ulysses_degree), dim=dim)
    # ... and the ring parts scatter back to their global positions.
    parts = _all_gather(part.contiguous(), mesh.ring_group, mesh.ring_degree)
    seq_len = part.shape[dim] * mesh.ring_degree
    check_seq_len(seq_len, layout, mesh.ring_degree, mesh.ulysses_degree, arg="full length")
    shape = list(part.shape)
    shape[dim] = seq_len
    full = torch.empty(shape, dtype=local.dtype, device=local.device)
    for r, p in enumerate(parts):
        idx = ring_part_indices(seq_len, mesh.ring_degree, r, layout).to(local.device)
        full.index_copy_(dim, idx, p)
    return full


def positions(seq_len: int, mesh=None, layout: str = "contiguous", device=None) -> torch.Tensor:
    """Global index of each local token (int64), e.g. for RoPE position ids."""
    return local_indices(seq_len, as_mesh(mesh), layout).to(device)
