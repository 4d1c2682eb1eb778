"""Ring attention executor: runs a ``RingPlan`` with a ``RingExchange`` and a backend.

Forward, per rank: at step 0 the rank's queries meet its own K/V (the caller's k and v, no
copy). K and V then travel, as two tensors side by side in one flat buffer ([B, m, Hkv, D]
each, m the K/V owner's *payload*: the slots other ranks need, ``plan.payload``), through two
buffers allocated once per call: the exchange for step t+1 is posted before the compute of
step t, so communication overlaps compute. The first hop sends views of the owner's k and v
(one per payload range; a packed copy only for batch > 1 or many ranges). The ring stops after ``plan.steps``
steps. Each block folds into float32 (float64 for float64 inputs) running accumulators with the
stable merge; the output is cast to q's dtype once, at the end.

Backward, per rank: K/V travel again the same way. dq accumulates locally, and so do the dK/dV
of step 0. The dK/dV of a payload travel with it: at step t a rank adds its contribution to the
partial sum received from the previous rank and passes it on; after the last step the holder
sends the sum straight back to the owner (one ring hop when the ring ran all the way round).
Each of those sends is posted after the step's compute and waited for only after the next
step's compute, so it overlaps too. That takes three partial-sum buffers (the one computed
into, the one in flight to the next holder, the one arriving), each allocated when first used.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .comm import RingExchange
from .kernels.base import BlockAttention
from .kernels.mask import accumulation_dtype
from .merge import new_accumulators
from .mesh import SPMesh
from .nonfinite import (KeyFlags, RowFlags, Scratch, bad_rows, finite_lse, finite_total,
                        host_readable, poison_backward_, poison_forward_, sanitized)
from .plan import RingPlan
from .profile import span
from .sinks import fold_sinks_


@dataclass(frozen=True)
class RingConfig:
    """Everything an executor needs besides the tensors; ``plan`` is a ``RingPlan`` or a
    ``HelperPlan`` (``hybrid`` picks the executor by its type)."""
    mesh: SPMesh
    plan: RingPlan
    backend: BlockAttention
    scale: float
    profiler: Optional[object] = None  # a profile.StepProfiler, or None
    softcap: float = 0.0               # 0: off
    sinks: Optional[torch.Tensor] = None  # sink logits of the heads this executor sees


def _start_profile(cfg: RingConfig, pass_name: str):
    if cfg.profiler is not None:
        cfg.profiler.pass_name = pass_name
    return cfg.profiler


class _Payloads:
    """K/V (or dK/dV) of each owner's payload inside ``count`` flat buffers sized once per
    call for the largest payload, each allocated when first used (a 2-step ring never
    touches some): ``pair(i, owner)`` = (K [B, m, Hkv, Dk], V [B, m, Hkv, Dv]) views of
    buffer i, V right after K; ``flat(i, owner)`` the same elements as one view (one kernel
    to zero or add both)."""

    def __init__(self, plan: RingPlan, k_shape, v_shape, dtype, device, count: int):
        self.plan, self.dtype, self.device = plan, dtype, device
        self.k_shape, self.v_shape = tuple(k_shape), tuple(v_shape)
        largest = max(plan.payload_len(o) for o in range(plan.world))
        self.numel = largest * (self._row(self.k_shape) + self._row(self.v_shape))
        self.bufs = [None] * count

    @staticmethod
    def _row(shape) -> int:
        """Elements per sequence slot of a [B, S, H, D] tensor."""
        return shape[0] * math.prod(shape[2:])

    def _buf(self, i: int) -> torch.Tensor:
        if self.bufs[i] is None:
            self.bufs[i] = torch.empty(self.numel, dtype=self.dtype, device=self.device)
        return self.bufs[i]

    def _shapes(self, owner: int):
        m = self.plan.payload_len(owner)
        return ((self.k_shape[0], m) + self.k_shape[2:], (self.v_shape[0], m) + self.v_shape[2:])

    def pair(self, i: int, owner: int) -> tuple:
        ks, vs = self._shapes(owner)
        buf = self._buf(i)
        at = buf.storage_offset()
        return (buf.as_strided(ks, _strides(ks), at),         # one op per view
                buf.as_strided(vs, _strides(vs), at + math.prod(ks)))

    def flat(self, i: int, owner: int) -> torch.Tensor:
        ks, vs = self._shapes(owner)
        return self._buf(i)[:math.prod(ks) + math.prod(vs)]


def _strides(shape) -> tuple:
    """Contiguous strides of ``shape``."""
    strides, n = [], 1
    for size in reversed(shape):
        strides.append(n)
        n *= size
    return tuple(reversed(strides))


# A payload of at most this many slot ranges leaves its owner as views of k and v (one send
# per range, batch 1), a larger one as one packed copy per tensor.
_MAX_RANGE_SENDS = 4


def _first_hop_splits(plan: RingPlan, owner: int, batch: int) -> tuple:
    """Lengths of the parts in which ``owner``'s payload leaves it (K and V alike); the sender
    and its receiver derive the same from the plan, so their sends and receives pair up."""
    lengths = tuple(b - a for a, b in plan.payload[owner])
    if lengths and batch == 1 and len(lengths) <= _MAX_RANGE_SENDS:
        return lengths
    return (sum(lengths),)


def _own_parts(k, v, plan: RingPlan, rank: int) -> list:
    """What this rank sends of its own K and V at the first hop: views of the caller's k and
    v where they are contiguous slot ranges (no copy of this rank's K/V), else a contiguous
    copy of the payload part (a non-contiguous k, batch > 1, many ranges)."""
    ranges = plan.payload[rank]
    parts = []
    for t in (k, v) if ranges else ():
        if len(_first_hop_splits(plan, rank, t.shape[0])) == len(ranges):
            parts += [t[:, a:b].contiguous() for a, b in ranges]
        else:
            parts.append(torch.cat([t[:, a:b] for a, b in ranges], dim=1))
    return parts


def _recv_parts(pair, plan: RingPlan, owner: int) -> list:
    """The views of ``pair`` (K, V of ``owner``'s payload) that receive its first hop."""
    splits = _first_hop_splits(plan, owner, pair[0].shape[0])
    return [part for t in pair for part in t.split(splits, dim=1)]


def _contiguous_kv(k, v) -> tuple:
    """The caller's k and v themselves when contiguous (no copy); else contiguous copies, so
    that a call on views computes on the same layout as one on contiguous tensors (a
    kernel's rounding may depend on strides: results stay bitwise those of contiguous
    inputs) and the first hop sends them without another copy."""
    return k.contiguous(), v.contiguous()


def _prepare_launches(cfg: RingConfig, masks, q, sizes) -> None:
    """Let the backend build its per-mask launch metadata (device index arrays) for every
    step before the ring starts, so no host-to-device copy happens inside a step; cached per
    (mask, sizes, device), so later calls build nothing."""
    prepare = getattr(cfg.backend, "prepare_launches", None)
    if prepare is not None:
        for mask, sk in zip(masks, sizes):
            prepare(mask, q, q.shape[1], sk)


def _clean(scratch: Scratch, k, v) -> tuple:
    """Sanitized copies of the held K and V, side by side in the call's scratch buffer: one
    kernel when they lie side by side in one travel buffer (steps >= 1), else two."""
    nk, nv = k.numel(), v.numel()
    base = k._base
    if base is not None and v._base is base and base.dim() == 1 and k.is_contiguous() and \
            v.is_contiguous() and v.storage_offset() == k.storage_offset() + nk:
        start = k.storage_offset() - base.storage_offset()
        flat = sanitized(base[start:start + nk + nv], out=scratch.buf[:nk + nv])
        return flat[:nk].view(k.shape), flat[nk:].view(v.shape)
    return (sanitized(k, out=scratch.buf[:nk].view(k.shape)),
            sanitized(v, out=scratch.buf[nk:nk + nv].view(v.shape)))


def _nonfinite_call(ring, what: str, q, *tensors) -> bool:
    """Whether this call takes the non-finite path (``nonfinite.py``): always where a flag
    cannot be read on the host (CUDA, tracing, fake tensors); on CPU only when some element
    of ``tensors`` on some ring rank is not finite -- one float64 sum per rank, summed over
    the ring (``ring``: None for one step), read once per call. Every rank of the ring
    decides alike."""
    if not host_readable(q):
        return True
    total = finite_total(*tensors)
    if ring is not None:
        ring.all_sum(total, what)
    return not math.isfinite(total.item())


def ring_forward(q, k, v, cfg: RingConfig):
    """out [B, n, Hq, D] (q's dtype), lse [B, Hq, n] (accumulation dtype). On the non-finite
    path the backend sees sanitized q and K/V and non-finite values act through
    ``nonfinite.poison_forward_``; a call with finite inputs on CPU skips both."""
    plan, r, T = cfg.plan, cfg.mesh.ring_rank, cfg.plan.steps
    acc = accumulation_dtype(q.dtype)
    out_acc, lse_acc = new_accumulators(q, acc, v.shape[-1])
    masks = plan.masks(r)
    active = plan.active(r)
    k, v = _contiguous_kv(k, v)
    _prepare_launches(cfg, masks, q, [plan.key_len(r, t) for t in range(T)])
    ring = None
    if T > 1:
        travel = _Payloads(plan, k.shape, v.shape, k.dtype, q.device, 2)
        ring = RingExchange(cfg.mesh)
    exact = _nonfinite_call(ring, "ring forward, non-finite check", q, q, k, v)
    if exact:
        q_bad, q = bad_rows(q), sanitized(q)
        scratch = Scratch(max(k.numel() + v.numel(), travel.numel if T > 1 else 0),
                          k.dtype, q.device)
    prof = _start_profile(cfg, "forward")
    cur = (k, v)                          # raw: every holder derives the flags from it
    for t in range(T):
        if t + 1 < T:
            owner = plan.kv_source(r, t + 1)
            nxt = travel.pair((t + 1) % 2, owner)
            handle = ring.start(_own_parts(k, v, plan, r), _recv_parts(nxt, plan, owner)) \
                if t == 0 else ring.start(cur, nxt)
        with span(prof, "compute", t, q.device):
            if active[t]:                 # else the mask shows nothing: nothing to do
                held = _clean(scratch, *cur) if exact else cur
                cfg.backend.forward_into(q, *held, out_acc, lse_acc, scale=cfg.scale,
                                         mask=masks[t], softcap=cfg.softcap)
                if exact:
                    poison_forward_(out_acc, lse_acc, masks[t], KeyFlags(*cur, held[1]), q_bad)
        if t + 1 < T:
            with span(prof, "wait", t, q.device):
                ring.wait(handle, f"ring step {t} forward")
            cur = nxt
    return finish_forward(out_acc, lse_acc, q.dtype, cfg)


def finish_forward(out_acc, lse_acc, dtype, cfg: RingConfig):
    """Fold the sinks in (once, in the accumulation dtype) and cast the output once."""
    if cfg.sinks is not None:
        fold_sinks_(out_acc, lse_acc, cfg.sinks)
    return out_acc.to(dtype), lse_acc


def ring_backward(dout, q, k, v, out, lse, cfg: RingConfig):
    """(dq, dk, dv) in the dtypes of q, k, v. On the non-finite path the backend sees
    sanitized inputs and non-finite values act through ``nonfinite.poison_backward_``; a
    call with finite inputs (and lse finite or -inf) on CPU skips both."""
    plan, r, T, R = cfg.plan, cfg.mesh.ring_rank, cfg.plan.steps, cfg.plan.world
    acc = accumulation_dtype(q.dtype)
    dq_acc = torch.zeros(q.shape, dtype=acc, device=q.device)
    masks = plan.masks(r)
    active = plan.active(r)
    k, v = _contiguous_kv(k, v)
    _prepare_launches(cfg, masks, q, [plan.key_len(r, t) for t in range(T)])
    dkv_local = torch.zeros(k.numel() + v.numel(), dtype=acc, device=q.device)
    dk_local, dv_local = dkv_local[:k.numel()].view(k.shape), dkv_local[k.numel():].view(v.shape)
    ring = None
    if T > 1:
        travel = _Payloads(plan, k.shape, v.shape, k.dtype, q.device, 2)
        # dK/dV partial sums: the one computed into, the one in flight to the next holder,
        # the one arriving from the previous holder (allocated when first needed)
        grads = _Payloads(plan, k.shape, v.shape, acc, q.device, 3)
        ring = RingExchange(cfg.mesh)
    exact = not host_readable(q) or _nonfinite_call(
        ring, "ring backward, non-finite check", q, q, k, v, out, finite_lse(lse), dout)
    if exact:
        rows = RowFlags.of(q, out, lse, dout)
        q, out, lse, dout = rows.sanitize(q, out, lse, dout)
        scratch = Scratch(max(k.numel() + v.numel(), travel.numel if T > 1 else 0),
                          k.dtype, q.device)
    grad_handle = None
    prof = _start_profile(cfg, "backward")
    cur = (k, v)
    for t in range(T):
        if t + 1 < T:
            nxt_owner = plan.kv_source(r, t + 1)
            nxt = travel.pair((t + 1) % 2, nxt_owner)
            kv_handle = ring.start(_own_parts(k, v, plan, r),
                                   _recv_parts(nxt, plan, nxt_owner)) \
                if t == 0 else ring.start(cur, nxt)
        owner = plan.kv_source(r, t)
        if t == 0:
            mine = (dk_local, dv_local)
        else:
            mine_flat = grads.flat(t % 2, owner).zero_()
            mine = grads.pair(t % 2, owner)
        with span(prof, "compute", t, q.device):
            if active[t]:
                held = _clean(scratch, *cur) if exact else cur
                cfg.backend.backward_into(dout, q, *held, out, lse, dq_acc, *mine,
                                          scale=cfg.scale, mask=masks[t], softcap=cfg.softcap)
                if exact:
                    poison_backward_(dq_acc, *mine, masks[t], rows)
        with span(prof, "wait", t, q.device):
            if grad_handle is not None:   # partial sum for the K/V held now, from prev rank
                ring.wait(grad_handle, f"ring step {t} backward (dK/dV)")
                mine_flat.add_(grads.flat(2, owner))
                grad_handle = None
            if t >= 1 and t + 1 < T:      # pass it on to the next holder
                grad_handle = ring.start(mine, grads.pair(2, nxt_owner))
            elif t >= 1:                  # last step: straight back to the owner
                grad_handle = ring.start(mine, grads.pair(2, r), hops=R - t)
            if t + 1 < T:
                ring.wait(kv_handle, f"ring step {t} backward (K/V)")
                cur = nxt
    if grad_handle is not None:
        with span(prof, "wait", T, q.device):
            ring.wait(grad_handle, "ring backward, last dK/dV hop")
        total_k, total_v = grads.pair(2, r)
        at = 0
        for a, b in plan.payload[r]:
            dk_local[:, a:b].add_(total_k[:, at:at + b - a])
            dv_local[:, a:b].add_(total_v[:, at:at + b - a])
            at += b - a
    return dq_acc.to(q.dtype), dk_local.to(k.dtype), dv_local.to(v.dtype)
