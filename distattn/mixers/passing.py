"""State passing: what a causal mixer needs from the ranks before it, differentiably.

Under the ``contiguous`` layout the SP group holds the sequence in order: rank (u, r) of an
SP mesh holds sequence part ``r * U + u`` (``sequence_neighbours``). A causal mixer run on
its own part needs only what comes from the part before it:

- a causal convolution of kernel k: the last ``k - 1`` inputs before its first token (the
  halo). ``exchange_halo`` sends this rank's last k - 1 inputs forward and receives the
  previous rank's, on every rank at once; its backward returns the halo's gradient.
- a recurrence (an SSM scan, the delta rule, linear attention): the state after the last
  token before its part. ``receive_from_previous`` and ``send_to_next`` hand such tensors
  down the sequence one rank after another: rank i waits for rank i - 1's final state, so
  the forward is a chain of P - 1 hops; the backward runs the chain in reverse (rank i
  receives the gradient of its final state from rank i + 1 and sends the gradient of its
  initial state to rank i - 1).

Every rank of the mesh must make the same calls in the same order (messages pair up in
order, as NCCL requires). Point-to-point messages travel on the default process group,
between the global ranks of the mesh. The first rank receives nothing (its mixer starts from
zeros, as on one process); the last sends nothing. Nothing here synchronises a device with
the host except the waits of the messages themselves, and the headers of
``send_to_next`` (shapes and dtypes of the states, read on the host: one small message each).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

from ..comm import wait_all
from ..mesh import SPMesh, _group_rank

_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16, torch.int64,
           torch.int32)
_MAX_DIMS = 6
_HEADER = 3 + _MAX_DIMS      # present, dtype code, ndim, dims


def sequence_neighbours(mesh: SPMesh) -> tuple[Optional[int], Optional[int]]:
    """Global ranks holding the sequence part just before and just after this rank's under
    the ``contiguous`` layout (None at the ends, and for a one-rank mesh)."""
    if mesh.size == 1:
        return None, None
    if mesh.control_group is None:
        raise ValueError("state passing needs a mesh built with SPMesh.build (this one has "
                         "no groups)")
    ranks = dist.get_process_group_ranks(mesh.control_group)
    U, R = mesh.ulysses_degree, mesh.ring_degree
    here = mesh.ring_rank * U + mesh.ulysses_rank

    def at(i):
        if not 0 <= i < U * R:
            return None
        return ranks[_group_rank(i % U, i // U, U, R, mesh.placement)]

    return at(here - 1), at(here + 1)


def _post(ops, what):
    wait_all(dist.batch_isend_irecv(ops) if ops else [], what)


def _send(tensors: Sequence[torch.Tensor], peer: int, what: str) -> None:
    _post([dist.P2POp(dist.isend, t.contiguous(), peer) for t in tensors if t.numel()], what)


def _recv_like(like: Sequence[torch.Tensor], peer: int, what: str) -> list:
    return _receive_payload(like[0].device if like else None, peer,
                            [(t.shape, t.dtype) for t in like], what)


def _header(t: Optional[torch.Tensor], device) -> torch.Tensor:
    h = torch.zeros(_HEADER, dtype=torch.int64)
    if t is not None:
        if t.dtype not in _DTYPES or t.dim() > _MAX_DIMS:
            raise ValueError(f"state passing carries tensors of {_DTYPES} with at most "
                             f"{_MAX_DIMS} dims, got {t.dtype} {tuple(t.shape)}")
        h[0], h[1], h[2] = 1, _DTYPES.index(t.dtype), t.dim()
        h[3:3 + t.dim()] = torch.tensor(t.shape)
    return h.to(device)


def _receive_headers(device, prev: int, count: int, what: str) -> list:
    """What the previous rank will send: (shape, dtype) per slot, None for an empty slot."""
    headers = _recv_like([torch.empty(_HEADER, dtype=torch.int64, device=device)
                          for _ in range(count)], prev, f"{what} (headers)")
    out = []
    for h in headers:
        h = h.tolist()
        out.append((tuple(h[3:3 + h[2]]), _DTYPES[h[1]]) if h[0] else None)
    return out


def _receive_payload(device, prev: int, specs, what: str) -> list:
    bufs = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in specs]
    _post([dist.P2POp(dist.irecv, b, prev) for b in bufs if b.numel()], what)
    return bufs


class _Receive(torch.autograd.Function):
    """anchor -> the tensors the previous rank sends (``specs``: their shapes and dtypes).
    Backward: their gradients go back to it."""

    @staticmethod
    def forward(ctx, anchor, prev, specs, what):
        ctx.meta = (prev, what)
        return tuple(_receive_payload(anchor.device, prev, specs, what))

    @staticmethod
    def backward(ctx, *grads):
        prev, what = ctx.meta
        _send(grads, prev, f"{what} backward")
        return None, None, None, None


class _Send(torch.autograd.Function):
    """(out, *tensors) -> a copy of out; the tensors go to the next rank. Backward: their
    gradients come back from it."""

    @staticmethod
    def forward(ctx, out, nxt, what, *tensors):
        _send(tensors, nxt, what)
        ctx.meta = (nxt, what)
        # Saved only to be unpacked before the wait below: inside a non-reentrant checkpoint
        # that recomputes the layer first -- and the recompute sends the next rank the
        # states its own recompute waits for (else this rank would wait for that rank's
        # gradients while that rank waits for this rank's recomputed states).
        ctx.save_for_backward(*tensors)
        return out.clone()

    @staticmethod
    def backward(ctx, grad_out):
        nxt, what = ctx.meta
        specs = [(t.shape, t.dtype) for t in ctx.saved_tensors]
        grads = _receive_payload(grad_out.device, nxt, specs, f"{what} backward")
        return (grad_out, None, None) + tuple(grads)


def receive_from_previous(anchor: torch.Tensor, count: int, mesh: SPMesh,
                          what: str = "state passing") -> list:
    """``count`` tensors (or None, as sent) from the previous sequence rank's
    ``send_to_next``; all None on the first rank. Differentiable when ``anchor`` requires
    grad: the backward sends the gradients back. ``anchor`` is any tensor of this rank's
    graph that requires grad exactly when the sender's ``out`` does (the layer's input, or a
    parameter of the layer), so that both ends of a message run their backward or neither."""
    prev, _ = sequence_neighbours(mesh)
    if prev is None:
        return [None] * count
    specs = _receive_headers(anchor.device, prev, count, what)
    present = [s for s in specs if s is not None]
    if not present:
        return [None] * count
    if torch.is_grad_enabled() and anchor.requires_grad:
        got = iter(_Receive.apply(anchor, prev, present, what))
    else:
        got = iter(_receive_payload(anchor.device, prev, present, what))
    return [next(got) if s is not None else None for s in specs]


def send_to_next(out: torch.Tensor, tensors: Sequence[Optional[torch.Tensor]], mesh: SPMesh,
                 what: str = "state passing") -> torch.Tensor:
    """Send ``tensors`` (None for an empty slot) to the next sequence rank's
    ``receive_from_previous`` (same count); returns ``out``, through a node whose backward
    receives the tensors' gradients from that rank -- so put it on the path from the
    tensors to the loss (e.g. the layer's output). The last rank sends nothing."""
    _, nxt = sequence_neighbours(mesh)
    if nxt is None:
        return out
    _send([_header(t, out.device) for t in tensors], nxt, f"{what} (headers)")
    present = [t for t in tensors if t is not None]
    if not present:
        return out
    if torch.is_grad_enabled() and out.requires_grad:
        return _Send.apply(out, nxt, what, *present)
    _send(present, nxt, what)
    return out


def _swap(send: torch.Tensor, to: Optional[int], source: Optional[int], what: str):
    """Send ``send`` to ``to`` while receiving a tensor like it from ``source`` (either may
    be None: nothing that way); returns the received tensor (uninitialised without a
    source)."""
    got = torch.empty_like(send, memory_format=torch.contiguous_format)
    ops = []
    if to is not None and send.numel():
        ops.append(dist.P2POp(dist.isend, send.contiguous(), to))
    if source is not None and got.numel():
        ops.append(dist.P2POp(dist.irecv, got, source))
    _post(ops, what)
    return got


class _Exchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tail, prev, nxt, what):
        halo = _swap(tail, nxt, prev, what)
        if prev is None:
            halo.zero_()
        ctx.meta = (prev, nxt, what)
        return halo

    @staticmethod
    def backward(ctx, grad_halo):
        prev, nxt, what = ctx.meta
        grad_tail = _swap(grad_halo, prev, nxt, f"{what} backward")
        if nxt is None:
            grad_tail.zero_()
        return grad_tail, None, None, None


def exchange_halo(tail: torch.Tensor, mesh: SPMesh, what: str = "halo exchange") -> torch.Tensor:
    """Send ``tail`` (this rank's last inputs, e.g. [B, C, k - 1]) to the next sequence rank
    and return the previous rank's (zeros on the first rank), all ranks at once. Every rank's
    tail has the same shape and dtype. Differentiable: the halo's gradient goes back to its
    sender and arrives here as the tail's."""
    prev, nxt = sequence_neighbours(mesh)
    if prev is None and nxt is None:
        return torch.zeros_like(tail)
    return _Exchange.apply(tail, prev, nxt, what)
