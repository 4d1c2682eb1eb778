"""Communicators: ring point-to-point exchange and the all-to-all of Ulysses.

Both run on NCCL (GPU) and gloo (CPU) with the same code. Nothing here synchronises the host
with the device: a ``RingExchange`` returns the work handles of one batched send+receive, and
``wait`` makes the caller's stream (or thread, on CPU) wait for them.

Every wait goes through ``wait_all``, which turns a backend failure (a peer that died, a
timeout of the mesh's groups, mismatched sizes) into a ``CommunicationError`` naming the
distattn collective that was waiting. On CPU (gloo) the wait blocks, so that is where a
failure shows. On NCCL a wait only orders streams: a hung peer is reported by NCCL's watchdog
after the group's timeout, and ``wait_all`` sees errors only with TORCH_NCCL_BLOCKING_WAIT=1.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from .mesh import SPMesh


class CommunicationError(RuntimeError):
    """A wait of distattn's communication failed: the message names the collective."""


class MeshFailedError(CommunicationError):
    """A call on a mesh whose communication failed earlier (``SPMesh.state.failed``)."""


def wait_all(works, what) -> None:
    """Wait for every work handle in ``works``. ``what`` describes the collective (a str, or
    a function returning one, called only on failure). Raises ``CommunicationError`` (a
    RuntimeError) chained to the backend's error."""
    start = time.monotonic()
    try:
        for work in works:
            work.wait()
    except RuntimeError as exc:   # torch's DistBackendError is a RuntimeError too
        desc = what() if callable(what) else what
        raise CommunicationError(
            f"distattn: {desc} failed after waiting {time.monotonic() - start:.1f} s "
            f"({type(exc).__name__}: {exc}). A rank of the mesh died, hung, skipped this call "
            f"or failed in the middle of it; the other ranks fail too, at the latest after the "
            f"mesh timeout (SPMesh.build(timeout=...)). The mesh cannot be used after this "
            f"error: build a new one once every rank is back, or restart the job") from exc


class RingExchange:
    """Send to the ring rank ``hops`` ahead while receiving from the one ``hops`` behind.

    ``start(send, recv, hops=1)`` posts both as one ``batch_isend_irecv`` and returns a handle;
    ``send`` and ``recv`` are a tensor or a sequence of tensors (K and V as two tensors: no
    packed copy), sent and received in order, so the i-th tensor sent pairs with the i-th
    received. ``wait(handle, what)`` completes it (``what``, e.g. "ring step 2 forward", names
    it in errors). Every rank of the ring must post the same sequence of exchanges, and the
    sizes of each sender and its receiver must agree (plans make them agree). Empty tensors
    are neither sent nor received.
    """

    def __init__(self, mesh: SPMesh):
        self.group = mesh.ring_group
        self.ranks = mesh.ring_ranks
        self.rank = mesh.ring_rank

    def start(self, send, recv, hops: int = 1):
        R = len(self.ranks)
        ops = []
        for op, tensors, peer in ((dist.isend, send, self.rank + hops),
                                  (dist.irecv, recv, self.rank - hops)):
            for t in (tensors,) if isinstance(tensors, torch.Tensor) else tensors:
                if t.numel():
                    ops.append(dist.P2POp(op, t, self.ranks[peer % R], self.group))
        return dist.batch_isend_irecv(ops) if ops else []

    def wait(self, handle, what: str = "ring exchange") -> None:
        wait_all(handle, lambda: f"{what} (ring rank {self.rank} of ranks {list(self.ranks)})")

    def all_sum(self, t: torch.Tensor, what: str) -> None:
        """In-place SUM of ``t`` over the ring (a small flag, once per call)."""
        wait_all([dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group, async_op=True)],
                 lambda: f"{what} (ring rank {self.rank} of ranks {list(self.ranks)})")


def all_to_all(x, group, world: int, scatter_dim: int, gather_dim: int,
               what: str = "Ulysses all-to-all") -> torch.Tensor:
    """Split ``x`` into ``world`` equal parts along ``scatter_dim``; part i goes to group rank
    i; the parts received are concatenated in rank order along ``gather_dim``. Not
    differentiable (see ``ulysses.seq_to_heads`` for the autograd-aware form). ``what``
    names it in errors.

    ``x`` may also be a list of tensors of one shape standing for ``torch.stack(x)`` (the
    dims are the stacked tensor's, ``scatter_dim`` >= 1): each is copied once, straight into
    its place in the send buffer (no stacked copy), and the list is emptied then, so that
    tensors only the list held are freed before the receive buffer is allocated."""
    if world == 1:
        return torch.stack(x) if isinstance(x, list) else x
    parts = x if isinstance(x, list) else None
    shape = [len(parts)] + list(parts[0].shape) if parts is not None else list(x.shape)
    scatter_dim %= len(shape)
    gather_dim %= len(shape)
    if shape[scatter_dim] % world:
        raise ValueError(f"all_to_all: dimension {scatter_dim} of size {shape[scatter_dim]} "
                         f"does not split over {world} ranks")
    # [..., world * n, ...] -> [world, ..., n, ...] so that each destination's part is one
    # contiguous slab, as all_to_all_single sends them.
    split = shape[:scatter_dim] + [world, shape[scatter_dim] // world] + shape[scatter_dim + 1:]
    if parts is None:
        send = x.reshape(split).movedim(scatter_dim, 0).contiguous()
    else:
        if scatter_dim == 0:
            raise ValueError("all_to_all: a list of tensors cannot scatter its stacking dim")
        send = parts[0].new_empty([world] + split[:scatter_dim] + split[scatter_dim + 1:])
        for i, part in enumerate(parts):
            send[:, i].copy_(part.reshape(split[1:]).movedim(scatter_dim - 1, 0))
        parts.clear()
    recv = torch.empty_like(send)
    work = dist.all_to_all_single(recv, send, group=group, async_op=True)
    wait_all([work], lambda: f"{what} of {tuple(shape)} over ranks "
                             f"{dist.get_process_group_ranks(group)}")
    del send
    # recv[i] is source rank i's part; put the source index right before gather_dim's
    # elements and merge the two.
    recv = recv.movedim(0, gather_dim)
    shape = list(recv.shape)
    merged = shape[:gather_dim] + [shape[gather_dim] * shape[gather_dim + 1]] + shape[gather_dim + 2:]
    return recv.reshape(merged)


def all_to_all_v(send: list[list[torch.Tensor]], recv_shapes: list[list[tuple]], group,
                 what: str = "Ulysses all-to-all") -> list[list[torch.Tensor]]:
    """All-to-all of unequal parts: ``send[i]`` (a list of tensors, any shapes, one dtype)
    goes to group rank i; ``recv_shapes[j]`` are the shapes of what group rank j sends here
    (the caller knows them: every rank computes the same head split). Returns, per source
    rank j, its tensors with those shapes. Everything travels as one flat
    ``all_to_all_single`` with per-rank split sizes. Not differentiable."""
    return start_all_to_all_v(send, recv_shapes, group, what).wait()


class PendingAllToAllV:
    """An ``all_to_all_v`` in flight: ``wait()`` completes it and returns its parts."""

    def __init__(self, send, recv_shapes, group, what: str):
        ref = next(t for parts in send for t in parts)
        flat = [t.reshape(-1) for parts in send for t in parts]
        self.send_buf = torch.cat(flat) if flat else ref.new_empty(0)   # alive until wait
        self.in_splits = [sum(t.numel() for t in parts) for parts in send]
        self.recv_shapes = recv_shapes
        self.numel = [[torch.Size(s).numel() for s in shapes] for shapes in recv_shapes]
        self.out_splits = [sum(n) for n in self.numel]
        self.recv = self.send_buf.new_empty(sum(self.out_splits))
        self.group, self.what = group, what
        self.work = dist.all_to_all_single(self.recv, self.send_buf, self.out_splits,
                                           self.in_splits, group=group, async_op=True)

    def wait(self) -> list[list[torch.Tensor]]:
        wait_all([self.work], lambda: f"{self.what} (uneven split, {self.in_splits} elements "
                                      f"out, {self.out_splits} in) over ranks "
                                      f"{dist.get_process_group_ranks(self.group)}")
        parts, at = [], 0
        for shapes, sizes in zip(self.recv_shapes, self.numel):
            mine = []
            for shape, size in zip(shapes, sizes):
                mine.append(self.recv[at:at + size].view(shape))
                at += size
            parts.append(mine)
        return parts


def start_all_to_all_v(send, recv_shapes, group, what: str = "all-to-all") -> PendingAllToAllV:
    """``all_to_all_v`` posted without waiting, so compute can overlap it; every rank of
    ``group`` must post the same sequence of them."""
    return PendingAllToAllV(send, recv_shapes, group, what)


def sp_all_reduce(t: torch.Tensor, mesh: SPMesh) -> None:
    """In-place SUM of ``t`` over the whole SP group: over the Ulysses group, then the ring."""
    for group, degree, what in ((mesh.ulysses_group, mesh.ulysses_degree, "Ulysses"),
                                (mesh.ring_group, mesh.ring_degree, "ring")):
        if degree > 1:
            work = dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group, async_op=True)
            wait_all([work], lambda: f"the all-reduce of {tuple(t.shape)} over the {what} "
                                     f"ranks {dist.get_process_group_ranks(group)}")
