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

No compute overlaps the gather here: this schedule trades the ring's overlap for one large
launch and a single collective, which pays off where the collective is fast (NVLink) or the
ring's per-step launches are small. Non-finite inputs are handled as in the ring executor
(``nonfinite.py``): K/V travel raw, the backend sees a sanitized copy.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .comm import all_to_all_v
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


def gather_kv(kv: torch.Tensor, plan: AllGatherPlan, mesh, what: str) -> torch.Tensor:
    """This rank's packed K/V [c, B, n, Hkv, D] -> the keys its queries see, [c, B,
    plan.key_len(r), Hkv, D]: ``plan.need(r, o)`` of every owner o, in owner order. Every ring
    rank must call it; rank o sends each r exactly ``plan.need(r, o)``."""
    r, R = mesh.ring_rank, plan.world
    own = _take(kv, plan.need(r, r))
    if R == 1:
        return own
    peers = _peers(mesh)
    send = [[_take(kv, plan.need(p, r)) if p != r else kv[:, :, :0]] for p in peers]
    shapes = [[_slots(kv.shape, plan.need_len(r, p) if p != r else 0)] for p in peers]
    got = all_to_all_v(send, shapes, mesh.ring_group, what)
    parts = {p: got[i][0] for i, p in enumerate(peers)}
    parts[r] = own
    return torch.cat([parts[o] for o in range(R)], dim=2)


def _add_ranges_(acc: torch.Tensor, ranges: tuple, packed: torch.Tensor) -> None:
    at = 0
    for a, b in ranges:
        acc[:, :, a:b].add_(packed[:, :, at:at + b - a])
        at += b - a


def scatter_dkv_(dkv: torch.Tensor, plan: AllGatherPlan, mesh, what: str,
                 acc: torch.Tensor) -> None:
    """The reverse of ``gather_kv``: ``dkv`` [c, B, key_len(r), Hkv, D] (gradients of the
    gathered keys) goes back to the owners, and ``acc`` [c, B, n, Hkv, D] (this rank's dK/dV)
    gets the sum of what every rank returns for its slots, its own share included."""
    r, R = mesh.ring_rank, plan.world
    share = lambda o: dkv[:, :, plan.key_offset(r, o):plan.key_offset(r, o) + plan.need_len(r, o)]
    _add_ranges_(acc, plan.need(r, r), share(r))
    if R == 1:
        return
    peers = _peers(mesh)
    send = [[share(p) if p != r else dkv[:, :, :0]] for p in peers]
    shapes = [[_slots(acc.shape, plan.need_len(p, r) if p != r else 0)] for p in peers]
    got = all_to_all_v(send, shapes, mesh.ring_group, what)
    for i, p in enumerate(peers):
        if p != r:
            _add_ranges_(acc, plan.need(p, r), got[i][0])


def allgather_forward(q, k, v, cfg: RingConfig):
    """out [B, n, Hq, Dv] (q's dtype), lse [B, Hq, n] (accumulation dtype) for this ring
    rank's part of n slots; q, k, v are the part's [B, n, H, D] tensors."""
    plan, r = cfg.plan, cfg.mesh.ring_rank
    out_acc, lse_acc = new_accumulators(q, accumulation_dtype(q.dtype), v.shape[-1])
    dims = (k.shape[-1], v.shape[-1])
    q_bad, q = bad_rows(q), sanitized(q)
    prof = _start_profile(cfg, "forward")
    with span(prof, "wait", 0, q.device):
        kv = gather_kv(pack(k, v), plan, cfg.mesh, "all-gather of K/V (forward)")
    mask = plan.mask(r)
    with span(prof, "compute", 0, q.device):
        if mask.simplify(q.shape[1], kv.shape[2]).pieces:
            clean = unpack(sanitized(kv), dims)
            cfg.backend.forward_into(q, *clean, out_acc, lse_acc, scale=cfg.scale, mask=mask,
                                     softcap=cfg.softcap)
            poison_forward_(out_acc, lse_acc, mask, KeyFlags(*unpack(kv, dims), clean[1]),
                            q_bad)
    return finish_forward(out_acc, lse_acc, q.dtype, cfg)


def allgather_backward(dout, q, k, v, out, lse, cfg: RingConfig):
    """(dq, dk, dv) in the dtypes of q, k, v, given the final (out, lse) of
    ``allgather_forward`` and dout."""
    plan, r = cfg.plan, cfg.mesh.ring_rank
    acc = accumulation_dtype(q.dtype)
    dims = (k.shape[-1], v.shape[-1])
    rows = RowFlags.of(q, out, lse, dout)
    q, out, lse, dout = rows.sanitize(q, out, lse, dout)
    kv_mine = pack(k, v)
    prof = _start_profile(cfg, "backward")
    with span(prof, "wait", 0, q.device):
        kv = gather_kv(kv_mine, plan, cfg.mesh, "all-gather of K/V (backward)")
    dq_acc = torch.zeros(q.shape, dtype=acc, device=q.device)
    dkv = torch.zeros(kv.shape, dtype=acc, device=q.device)
    mask = plan.mask(r)
    with span(prof, "compute", 0, q.device):
        if mask.simplify(q.shape[1], kv.shape[2]).pieces:
            cfg.backend.backward_into(dout, q, *unpack(sanitized(kv), dims), out, lse, dq_acc,
                                      *unpack(dkv, dims), scale=cfg.scale, mask=mask,
                                      softcap=cfg.softcap)
            poison_backward_(dq_acc, *unpack(dkv, dims), mask, rows)
    dkv_mine = torch.zeros(kv_mine.shape, dtype=acc, device=q.device)
    with span(prof, "wait", 1, q.device):
        scatter_dkv_(dkv, plan, cfg.mesh, "reduce-scatter of dK/dV (backward)", dkv_mine)
    dk, dv = unpack(dkv_mine, dims)
    return dq_acc.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
