"""All-gather executor: runs an ``AllGatherPlan`` (``gather_plan.py``) over the ring group.

Forward, per ring rank r: one all-to-all with uneven parts gathers, from every other owner o,
the K/V slots ``plan.need(r, o)`` that r's queries see (K and V packed in one buffer, raw; r's
own needed slots stay local), packed in owner order. r then computes its whole part against
the gathered keys under ``plan.mask(r)`` with one ``forward_into`` into fp32 (fp64 for fp64)
accumulators -- the ring executor's step 0, over more keys -- folds the sinks in and casts once.

Backward, per ring rank r: the same gather again (nothing is kept from the forward, so memory
is that of one gathered K/V at a time), one ``backward_into`` gives dq and the dK/dV of the
gathered keys, and a second all-to-all sends owner o's share back to o; each owner adds what
every rank returns into its own dK/dV (a reduce-scatter with the sum). Gradients travel in the
accumulation dtype.

With ``plan.head_chunks`` = 1 (the default) nothing overlaps the collectives: the schedule
trades the ring's overlap for one large launch and one collective per direction, which pays
off where the collective is fast (NVLink) or the ring's per-step launches are small. With c
> 1 the K/V heads go in c groups (``plan.head_ranges``): group i+1's gather is posted before
group i's compute, and in backward group i's dK/dV return is posted after its compute and
waited for after group i+1's; each group is one launch over its heads (q heads of a K/V
head stay with it). Every rank posts the same sequence of collectives on the ring group.
Non-finite inputs are handled as in the ring executor (``nonfinite.py``): K/V travel raw,
the backend sees a sanitized copy.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .comm import start_all_to_all_v
from .gather_plan import AllGatherPlan
from .kernels.mask import accumulation_dtype
from .merge import new_accumulators
from .nonfinite import KeyFlags, RowFlags, bad_rows, poison_backward_, poison_forward_, sanitized
from .packing import pack, unpack
from .profile import span
from .ring import RingConfig, _start_profile, finish_forward


def _peers(mesh) -> list:
    """The ring index of each rank of the ring group, in group-rank order (the order in which
    ``all_to_all_v`` addresses them)."""
    return [mesh.ring_ranks.index(g) for g in dist.get_process_group_ranks(mesh.ring_group)]


def _take(buf: torch.Tensor, ranges: tuple) -> torch.Tensor:
    """The slot ``ranges`` of ``buf`` [c, B, n, H, D] packed on dim 2."""
    if len(ranges) == 1:
        return buf[:, :, ranges[0][0]:ranges[0][1]]
    return torch.cat([buf[:, :, a:b] for a, b in ranges] or [buf[:, :, :0]], dim=2)


def _slots(shape, length: int) -> list:
    shape = list(shape)
    shape[2] = length
    return shape


class _Gather:
    """A gather in flight (``start_gather``); ``wait()`` returns the gathered K/V."""

    def __init__(self, own, pending, peers, rank, world):
        self.own, self.pending, self.peers, self.rank, self.world = \
            own, pending, peers, rank, world

    def wait(self) -> torch.Tensor:
        if self.pending is None:
            return self.own
        parts = {p: got[0] for p, got in zip(self.peers, self.pending.wait())}
        parts[self.rank] = self.own
        return torch.cat([parts[o] for o in range(self.world)], dim=2)


def start_gather(kv: torch.Tensor, plan: AllGatherPlan, mesh, what: str) -> _Gather:
    """Post the gather of this rank's packed K/V [c, B, n, Hkv, D]; its ``wait()`` returns the
    keys this rank's queries see, [c, B, plan.key_len(r), Hkv, D]: ``plan.need(r, o)`` of
    every owner o, in owner order. Every ring rank must post it; rank o sends each r exactly
    ``plan.need(r, o)``."""
    r, R = mesh.ring_rank, plan.world
    own = _take(kv, plan.need(r, r))
    if R == 1:
        return _Gather(own, None, None, r, R)
    peers = _peers(mesh)
    send = [[_take(kv, plan.need(p, r)) if p != r else kv[:, :, :0]] for p in peers]
    shapes = [[_slots(kv.shape, plan.need_len(r, p) if p != r else 0)] for p in peers]
    return _Gather(own, start_all_to_all_v(send, shapes, mesh.ring_group, what), peers, r, R)


def gather_kv(kv: torch.Tensor, plan: AllGatherPlan, mesh, what: str) -> torch.Tensor:
    """``start_gather(...).wait()``."""
    return start_gather(kv, plan, mesh, what).wait()


def _add_ranges_(acc: torch.Tensor, ranges: tuple, packed: torch.Tensor) -> None:
    at = 0
    for a, b in ranges:
        acc[:, :, a:b].add_(packed[:, :, at:at + b - a])
        at += b - a


class _Return:
    """A dK/dV return in flight (``start_return``); ``wait()`` adds what arrived."""

    def __init__(self, pending, peers, plan, rank, acc):
        self.pending, self.peers, self.plan, self.rank, self.acc = \
            pending, peers, plan, rank, acc

    def wait(self) -> None:
        if self.pending is None:
            return
        for p, got in zip(self.peers, self.pending.wait()):
            if p != self.rank:
                _add_ranges_(self.acc, self.plan.need(p, self.rank), got[0])


def start_return(dkv: torch.Tensor, plan: AllGatherPlan, mesh, what: str,
                 acc: torch.Tensor) -> _Return:
    """The reverse of ``start_gather``: ``dkv`` [c, B, key_len(r), Hkv, D] (gradients of the
    gathered keys) goes back to the owners; ``acc`` [c, B, n, Hkv, D] (this rank's dK/dV, a
    view is fine) gets its own share now and, at ``wait()``, the sum of what every other rank
    returns for its slots (a reduce-scatter)."""
    r, R = mesh.ring_rank, plan.world
    share = lambda o: dkv[:, :, plan.key_offset(r, o):plan.key_offset(r, o) + plan.need_len(r, o)]
    _add_ranges_(acc, plan.need(r, r), share(r))
    if R == 1:
        return _Return(None, None, plan, r, acc)
    peers = _peers(mesh)
    send = [[share(p) if p != r else dkv[:, :, :0]] for p in peers]
    shapes = [[_slots(acc.shape, plan.need_len(p, r) if p != r else 0)] for p in peers]
    return _Return(start_all_to_all_v(send, shapes, mesh.ring_group, what), peers, plan, r,
                   acc)


def _what(base: str, heads, chunks: int) -> str:
    return base if chunks == 1 else f"{base[:-1]}, K/V heads {heads[0]}:{heads[1]})"


def _shapes(plan, r: int, q, k, v):
    """(K and V head dims, query heads per K/V head, the K/V head groups, this rank's mask,
    whether it has anything to compute) of one call."""
    mask = plan.mask(r)
    return ((k.shape[-1], v.shape[-1]), q.shape[2] // k.shape[2],
            plan.head_ranges(k.shape[2]), mask,
            bool(mask.simplify(q.shape[1], plan.key_len(r)).pieces))


def allgather_forward(q, k, v, cfg: RingConfig):
    """out [B, n, Hq, Dv] (q's dtype), lse [B, Hq, n] (accumulation dtype) for this ring
    rank's part of n slots; q, k, v are the part's [B, n, H, D] tensors."""
    plan, r = cfg.plan, cfg.mesh.ring_rank
    out_acc, lse_acc = new_accumulators(q, accumulation_dtype(q.dtype), v.shape[-1])
    dims, g, heads, mask, live = _shapes(plan, r, q, k, v)
    q_bad, q = bad_rows(q), sanitized(q)
    kv = pack(k, v)
    post = lambda i: start_gather(kv[:, :, :, heads[i][0]:heads[i][1]], plan, cfg.mesh,
                                  _what("all-gather of K/V (forward)", heads[i], len(heads)))
    prof = _start_profile(cfg, "forward")
    pending = post(0)
    for i, (a, b) in enumerate(heads):
        with span(prof, "wait", i, q.device):
            kv_i = pending.wait()
        if i + 1 < len(heads):
            pending = post(i + 1)
        qh = slice(a * g, b * g)
        with span(prof, "compute", i, q.device):
            if live:
                clean = unpack(sanitized(kv_i), dims)
                cfg.backend.forward_into(q[:, :, qh], *clean, out_acc[:, :, qh],
                                         lse_acc[:, qh], scale=cfg.scale, mask=mask,
                                         softcap=cfg.softcap)
                poison_forward_(out_acc[:, :, qh], lse_acc[:, qh], mask,
                                KeyFlags(*unpack(kv_i, dims), clean[1]), q_bad[:, :, qh])
    return finish_forward(out_acc, lse_acc, q.dtype, cfg)


def allgather_backward(dout, q, k, v, out, lse, cfg: RingConfig):
    """(dq, dk, dv) in the dtypes of q, k, v, given the final (out, lse) of
    ``allgather_forward`` and dout."""
    plan, r = cfg.plan, cfg.mesh.ring_rank
    acc = accumulation_dtype(q.dtype)
    dims, g, heads, mask, live = _shapes(plan, r, q, k, v)
    rows = RowFlags.of(q, out, lse, dout)
    q, out, lse, dout = rows.sanitize(q, out, lse, dout)
    kv_mine = pack(k, v)
    dq_acc = torch.zeros(q.shape, dtype=acc, device=q.device)
    dkv_mine = torch.zeros(kv_mine.shape, dtype=acc, device=q.device)
    post = lambda i: start_gather(kv_mine[:, :, :, heads[i][0]:heads[i][1]], plan, cfg.mesh,
                                  _what("all-gather of K/V (backward)", heads[i], len(heads)))
    prof = _start_profile(cfg, "backward")
    pending, returning = post(0), None
    for i, (a, b) in enumerate(heads):
        with span(prof, "wait", i, q.device):
            kv_i = pending.wait()
        if i + 1 < len(heads):
            pending = post(i + 1)
        qh = slice(a * g, b * g)
        dkv = torch.zeros(kv_i.shape, dtype=acc, device=q.device)
        with span(prof, "compute", i, q.device):
            if live:
                cfg.backend.backward_into(
                    dout[:, :, qh], q[:, :, qh], *unpack(sanitized(kv_i), dims),
                    out[:, :, qh], lse[:, qh], dq_acc[:, :, qh], *unpack(dkv, dims),
                    scale=cfg.scale, mask=mask, softcap=cfg.softcap)
                flags = rows if len(heads) == 1 else RowFlags(rows.dead[:, :, qh],
                                                              rows.bad[:, :, qh])
                poison_backward_(dq_acc[:, :, qh], *unpack(dkv, dims), mask, flags)
        if returning is not None:
            with span(prof, "wait", i, q.device):
                returning.wait()
        returning = start_return(dkv, plan, cfg.mesh, _what(
            "reduce-scatter of dK/dV (backward)", (a, b), len(heads)),
            dkv_mine[:, :, :, a:b])
    with span(prof, "wait", len(heads), q.device):
        returning.wait()
    dk, dv = unpack(dkv_mine, dims)
    return dq_acc.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
