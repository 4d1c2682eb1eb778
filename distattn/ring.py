"""Ring attention executor: runs a ``RingPlan`` with a ``RingExchange`` and a backend.

Forward, per rank: K and V are packed into one buffer [2, B, n, Hkv, D] and travel one hop
per step through two preallocated buffers. The exchange for step t+1 is posted before the
compute of step t, so communication overlaps compute. Each block folds into float32 (float64
for float64 inputs) running accumulators with the stable merge; the output is cast to q's
dtype once, at the end.

Backward, per rank: K/V travel again the same way. dq accumulates locally. dK/dV travel with
the K/V they belong to: at step t a rank adds its contribution to the partial sum received
from the previous rank and passes it on; after the last step one more hop delivers each sum
to its owner. That hop is posted after the step's compute and waited for only after the
next step's compute, so it overlaps too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .comm import RingExchange
from .kernels.base import BlockAttention
from .kernels.mask import accumulation_dtype
from .merge import new_accumulators
from .mesh import SPMesh
from .plan import RingPlan, token_slices
from .profile import span


@dataclass(frozen=True)
class RingConfig:
    """Everything an executor needs besides the tensors; ``plan`` is a ``RingPlan`` or a
    ``HelperPlan`` (``hybrid`` picks the executor by its type)."""
    mesh: SPMesh
    plan: RingPlan
    backend: BlockAttention
    scale: float
    profiler: Optional[object] = None  # a profile.StepProfiler, or None


def _blocks(cfg: RingConfig, step: int, local_len: int):
    """This rank's blocks at ``step`` as (query slice, key slice, mask)."""
    for blk in cfg.plan.blocks[cfg.mesh.ring_rank][step]:
        qs, ks = token_slices(blk, local_len, cfg.plan.chunks)
        yield qs, ks, blk.mask


def _start_profile(cfg: RingConfig, pass_name: str):
    if cfg.profiler is not None:
        cfg.profiler.pass_name = pass_name
    return cfg.profiler


def _lse_rows(lse: torch.Tensor, rows: slice) -> torch.Tensor:
    return lse[:, :, rows]


def ring_forward(q, k, v, cfg: RingConfig):
    """out [B, n, Hq, D] (q's dtype), lse [B, Hq, n] (accumulation dtype)."""
    R, n = cfg.plan.world, q.shape[1]
    acc = accumulation_dtype(q.dtype)
    out_acc, lse_acc = new_accumulators(q, acc)
    kv = [torch.stack([k, v]), None]
    if R > 1:
        kv[1] = torch.empty_like(kv[0])
        ring = RingExchange(cfg.mesh)
    prof = _start_profile(cfg, "forward")
    for t in range(R):
        cur = kv[t % 2]
        if t + 1 < R:
            handle = ring.start(cur, kv[(t + 1) % 2])
        with span(prof, "compute", t, q.device):
            for qs, ks, mask in _blocks(cfg, t, n):
                cfg.backend.forward_into(q[:, qs], cur[0][:, ks], cur[1][:, ks],
                                         out_acc[:, qs], _lse_rows(lse_acc, qs),
                                         scale=cfg.scale, mask=mask)
        if t + 1 < R:
            with span(prof, "wait", t, q.device):
                ring.wait(handle)
    return out_acc.to(q.dtype), lse_acc


def ring_backward(dout, q, k, v, out, lse, cfg: RingConfig):
    """(dq, dk, dv) in the dtypes of q, k, v."""
    R, n = cfg.plan.world, q.shape[1]
    acc = accumulation_dtype(q.dtype)
    dq_acc = torch.zeros(q.shape, dtype=acc, device=q.device)
    kv = [torch.stack([k, v]), None]
    dkv = [torch.empty(kv[0].shape, dtype=acc, device=q.device) for _ in range(2)]
    if R > 1:
        kv[1] = torch.empty_like(kv[0])
        dkv_in = torch.empty_like(dkv[0])
        ring = RingExchange(cfg.mesh)
    grad_handle = None
    prof = _start_profile(cfg, "backward")
    for t in range(R):
        cur = kv[t % 2]
        if t + 1 < R:
            kv_handle = ring.start(cur, kv[(t + 1) % 2])
        mine = dkv[t % 2]
        with span(prof, "compute", t, q.device):
            mine.zero_()
            for qs, ks, mask in _blocks(cfg, t, n):
                cfg.backend.backward_into(
                    dout[:, qs], q[:, qs], cur[0][:, ks], cur[1][:, ks], out[:, qs],
                    _lse_rows(lse, qs), dq_acc[:, qs], mine[0][:, ks], mine[1][:, ks],
                    scale=cfg.scale, mask=mask)
        with span(prof, "wait", t, q.device):
            if grad_handle is not None:   # partial sum for the K/V held now, from prev rank
                ring.wait(grad_handle)
                mine.add_(dkv_in)
            if R > 1:                     # pass it on (after the last step: to its owner)
                grad_handle = ring.start(mine, dkv_in)
            if t + 1 < R:
                ring.wait(kv_handle)
    if R > 1:
        with span(prof, "wait", R, q.device):
            ring.wait(grad_handle)
        total = dkv_in
    else:
        total = dkv[0]
    return dq_acc.to(q.dtype), total[0].to(k.dtype), total[1].to(v.dtype)
