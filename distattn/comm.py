"""Communicators: ring point-to-point exchange and the all-to-all of Ulysses.

Both run on NCCL (GPU) and gloo (CPU) with the same code. Nothing here synchronises the host
with the device: a ``RingExchange`` returns the work handles of one batched send+receive, and
``wait`` makes the caller's stream (or thread, on CPU) wait for them.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .mesh import SPMesh


class RingExchange:
    """Send to the ring rank ``hops`` ahead while receiving from the one ``hops`` behind.

    ``start(send, recv, hops=1)`` posts both as one ``batch_isend_irecv`` and returns a handle;
    ``wait(handle)`` completes it. Every rank of the ring must post the same sequence of
    exchanges, and the sizes of each sender and its receiver must agree (plans make them
    agree). Empty tensors are neither sent nor received.
    """

    def __init__(self, mesh: SPMesh):
        self.group = mesh.ring_group
        self.ranks = mesh.ring_ranks
        self.rank = mesh.ring_rank

    def start(self, send: torch.Tensor, recv: torch.Tensor, hops: int = 1):
        R = len(self.ranks)
        ops = []
        if send.numel():
            ops.append(dist.P2POp(dist.isend, send, self.ranks[(self.rank + hops) % R],
                                  self.group))
        if recv.numel():
            ops.append(dist.P2POp(dist.irecv, recv, self.ranks[(self.rank - hops) % R],
                                  self.group))
        return dist.batch_isend_irecv(ops) if ops else []

    @staticmethod
    def wait(handle) -> None:
        for work in handle:
            work.wait()


def all_to_all(x: torch.Tensor, group, world: int, scatter_dim: int,
               gather_dim: int) -> torch.Tensor:
    """Split ``x`` into ``world`` equal parts along ``scatter_dim``; part i goes to group rank
    i; the parts received are concatenated in rank order along ``gather_dim``. Not
    differentiable (see ``ulysses.seq_to_heads`` for the autograd-aware form)."""
    if world == 1:
        return x
    scatter_dim %= x.dim()
    gather_dim %= x.dim()
    shape = list(x.shape)
    if shape[scatter_dim] % world:
        raise ValueError(f"all_to_all: dimension {scatter_dim} of size {shape[scatter_dim]} "
                         f"does not split over {world} ranks")
    # [..., world * n, ...] -> [world, ..., n, ...] so that each destination's part is one
    # contiguous slab, as all_to_all_single sends them.
    split = shape[:scatter_dim] + [world, shape[scatter_dim] // world] + shape[scatter_dim + 1:]
    send = x.reshape(split).movedim(scatter_dim, 0).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    # recv[i] is source rank i's part; put the source index right before gather_dim's
    # elements and merge the two.
    recv = recv.movedim(0, gather_dim)
    shape = list(recv.shape)
    merged = shape[:gather_dim] + [shape[gather_dim] * shape[gather_dim + 1]] + shape[gather_dim + 2:]
    return recv.reshape(merged)
