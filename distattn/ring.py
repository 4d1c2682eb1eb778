"""Ring attention executor: runs a ``RingPlan`` with a ``RingExchange`` and a backend.

Forward, per rank: at step 0 the rank's queries meet its own K/V. K and V then travel packed in
one buffer [2, B, m, Hkv, D], where m is the K/V owner's *payload* (the slots other ranks need;
``plan.payload``), through two preallocated buffers: the exchange for step t+1 is posted before
the compute of step t, so communication overlaps compute. The ring stops after ``plan.steps``
steps. Each block folds into float32 (float64 for float64 inputs) running accumulators with the
stable merge; the output is cast to q's dtype once, at the end.

Backward, per rank: K/V travel again the same way. dq accumulates locally, and so do the dK/dV
of step 0. The dK/dV of a payload travel with it: at step t a rank adds its contribution to the
partial sum received from the previous rank and passes it on; after the last step the holder
sends the sum straight back to the owner (one ring hop when the ring ran all the way round).
Each of those sends is posted after the step's compute and waited for only after the next
step's compute, so it overlaps too.
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
from .packing import pack, unpack
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
    """Views of the travelling K/V (or dK/dV) of each owner, inside flat buffers sized for the
    largest payload. ``shape(owner)`` is [2, B, m_owner, H, D]."""

    def __init__(self, plan: RingPlan, kv_shape, dtype, device, count: int):
        self.plan = plan
        self.base = tuple(kv_shape)
        largest = max(plan.payload_len(o) for o in range(plan.world))
        numel = math.prod(self.base[:2]) * largest * math.prod(self.base[3:])
        self.bufs = [torch.empty(numel, dtype=dtype, device=device) for _ in range(count)]

    def shape(self, owner: int) -> tuple:
        return self.base[:2] + (self.plan.payload_len(owner),) + self.base[3:]

    def view(self, i: int, owner: int) -> torch.Tensor:
        shape = self.shape(owner)
        return self.bufs[i][:math.prod(shape)].view(shape)


def _packed_kv(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """K and V in one [2, ...] buffer (``packing.pack``), as a view when they already are the
    two halves of one contiguous buffer (what the Ulysses all-to-all hands over): the ring
    only reads it, so no copy of this rank's K/V is needed then."""
    # views of one base, V right after K (storage offsets, not data pointers: a fake or
    # traced tensor has none)
    if k.shape == v.shape and k.dtype == v.dtype and k.is_contiguous() and \
            v.is_contiguous() and k._base is not None and k._base is v._base and \
            v.storage_offset() == k.storage_offset() + k.numel():
        return k.as_strided((2,) + tuple(k.shape), (k.numel(),) + tuple(k.stride()))
    return pack(k, v)


def _prepare_launches(cfg: RingConfig, masks, q, sizes) -> None:
    """Let the backend build its per-mask launch metadata (device index arrays) for every
    step before the ring starts, so no host-to-device copy happens inside a step; cached per
    (mask, sizes, device), so later calls build nothing."""
    prepare = getattr(cfg.backend, "prepare_launches", None)
    if prepare is not None:
        for mask, sk in zip(masks, sizes):
            prepare(mask, q, q.shape[1], sk)


def _own_payload(kv: torch.Tensor, plan: RingPlan, rank: int) -> torch.Tensor:
    """This rank's payload ranges packed into one contiguous tensor (kv itself when it all
    travels)."""
    ranges = plan.payload[rank]
    if ranges == ((0, kv.shape[2]),):
        return kv
    return torch.cat([kv[:, :, a:b] for a, b in ranges] or [kv[:, :, :0]], dim=2)


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
    dims = (k.shape[-1], v.shape[-1])
    kv = _packed_kv(k, v)                 # raw: every holder derives the flags from it
    active = plan.active(r)
    _prepare_launches(cfg, masks, q, [plan.key_len(r, t) for t in range(T)])
    ring = None
    if T > 1:
        travel = _Payloads(plan, kv.shape, kv.dtype, q.device, 2)
        ring = RingExchange(cfg.mesh)
    exact = _nonfinite_call(ring, "ring forward, non-finite check", q, q, kv)
    if exact:
        q_bad, q = bad_rows(q), sanitized(q)
        scratch = Scratch(max(kv.numel(), travel.bufs[0].numel() if T > 1 else 0), kv.dtype,
                          q.device)
    prof = _start_profile(cfg, "forward")
    cur = kv
    for t in range(T):
        if t + 1 < T:
            nxt = travel.view((t + 1) % 2, plan.kv_source(r, t + 1))
            handle = ring.start(_own_payload(kv, plan, r) if t == 0 else cur, nxt)
        with span(prof, "compute", t, q.device):
            if active[t]:                 # else the mask shows nothing: nothing to do
                held = unpack(scratch.clean(cur) if exact else cur, dims)
                cfg.backend.forward_into(q, *held, out_acc, lse_acc, scale=cfg.scale,
                                         mask=masks[t], softcap=cfg.softcap)
                if exact:
                    poison_forward_(out_acc, lse_acc, masks[t],
                                    KeyFlags(*unpack(cur, dims), held[1]), q_bad)
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
    dims = (k.shape[-1], v.shape[-1])
    kv = _packed_kv(k, v)
    active = plan.active(r)
    _prepare_launches(cfg, masks, q, [plan.key_len(r, t) for t in range(T)])
    dkv_local = torch.zeros(kv.shape, dtype=acc, device=q.device)
    ring = None
    if T > 1:
        travel = _Payloads(plan, kv.shape, kv.dtype, q.device, 2)
        grads = _Payloads(plan, kv.shape, acc, q.device, 3)   # two partial sums + one inbox
        ring = RingExchange(cfg.mesh)
    exact = not host_readable(q) or _nonfinite_call(
        ring, "ring backward, non-finite check", q, q, kv, out, finite_lse(lse), dout)
    if exact:
        rows = RowFlags.of(q, out, lse, dout)
        q, out, lse, dout = rows.sanitize(q, out, lse, dout)
        scratch = Scratch(max(kv.numel(), travel.bufs[0].numel() if T > 1 else 0), kv.dtype,
                          q.device)
    grad_handle = None
    prof = _start_profile(cfg, "backward")
    cur = kv
    for t in range(T):
        if t + 1 < T:
            nxt = travel.view((t + 1) % 2, plan.kv_source(r, t + 1))
            kv_handle = ring.start(_own_payload(kv, plan, r) if t == 0 else cur, nxt)
        owner = plan.kv_source(r, t)
        mine = dkv_local if t == 0 else grads.view(t % 2, owner).zero_()
        with span(prof, "compute", t, q.device):
            if active[t]:
                held = unpack(scratch.clean(cur) if exact else cur, dims)
                cfg.backend.backward_into(dout, q, *held, out, lse, dq_acc,
                                          *unpack(mine, dims), scale=cfg.scale,
                                          mask=masks[t], softcap=cfg.softcap)
                if exact:
                    poison_backward_(dq_acc, *unpack(mine, dims), masks[t], rows)
        with span(prof, "wait", t, q.device):
            if grad_handle is not None:   # partial sum for the K/V held now, from prev rank
                ring.wait(grad_handle, f"ring step {t} backward (dK/dV)")
                mine.add_(grads.view(2, owner))
                grad_handle = None
            if t >= 1 and t + 1 < T:      # pass it on to the next holder
                grad_handle = ring.start(mine, grads.view(2, plan.kv_source(r, t + 1)))
            elif t >= 1:                  # last step: straight back to the owner
                grad_handle = ring.start(mine, grads.view(2, r), hops=R - t)
            if t + 1 < T:
                ring.wait(kv_handle, f"ring step {t} backward (K/V)")
                cur = nxt
    if grad_handle is not None:
        with span(prof, "wait", T, q.device):
            ring.wait(grad_handle, "ring backward, last dK/dV hop")
        total, at = grads.view(2, r), 0
        for a, b in plan.payload[r]:
            dkv_local[:, :, a:b].add_(total[:, :, at:at + b - a])
            at += b - a
    dk, dv = unpack(dkv_local, dims)
    return dq_acc.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
