"""The whole sequence from the SP group, differentiably, and this rank's part of it back.

``gather_sequence(local, mesh, layout, cu)``: ``local`` [B, S_local, ...] holds this rank's
tokens in ``layout`` (as ``distattn.shard`` made them); the result [B, S, ...] holds every
token in global order, on every rank. Its backward sums the gradient over the SP group (each
rank computed the layer on the whole sequence for its own outputs only) and returns this
rank's slots. ``local_part(full, ...)`` is ``shard`` without its agreement (differentiable,
zeros in padding slots). Together they run any layer exactly on the full sequence: gather its
input, run it, keep the local part of its output. Every rank of the mesh must call them in
the same order (they communicate; the caller agreed on the layout already).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..comm import sp_all_reduce
from ..layout import gather_full, ring_layout, take_shard
from ..mesh import SPMesh


def sequence_length(local_len: int, mesh: SPMesh, cu: Optional[tuple]) -> int:
    """The global length: ``cu[-1]`` for a row with boundaries, else S_local x mesh size."""
    return cu[-1] if cu is not None else local_len * mesh.size


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local, mesh, layout, cu):
        seq_len = sequence_length(local.shape[1], mesh, cu)
        lay = ring_layout(layout, seq_len, mesh.ring_degree, mesh.ulysses_degree, cu)
        ctx.meta = (mesh, layout, cu)
        return gather_full(local, mesh, 1, lay, seq_len)

    @staticmethod
    def backward(ctx, grad):
        mesh, layout, cu = ctx.meta
        total = grad.contiguous().clone()
        sp_all_reduce(total, mesh)
        return take_shard(total, mesh, 1, layout, cu), None, None, None


def gather_sequence(local: torch.Tensor, mesh: SPMesh, layout: str,
                    cu: Optional[tuple] = None) -> torch.Tensor:
    """[B, S_local, ...] of this rank -> [B, S, ...] in global order (see the module)."""
    if mesh.size == 1:
        return local
    return _GatherSequence.apply(local, mesh, layout, cu)


def local_part(full: torch.Tensor, mesh: SPMesh, layout: str,
               cu: Optional[tuple] = None) -> torch.Tensor:
    """[B, S, ...] in global order -> this rank's [B, S_local, ...] (differentiable)."""
    if mesh.size == 1:
        return full
    return take_shard(full, mesh, 1, layout, cu)
