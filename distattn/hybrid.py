"""USP: Ulysses inside, ring (or helper schedule) across; pure ring and pure Ulysses are its
edge cases.

Each rank holds n tokens of its ring part with all heads. The Ulysses all-to-all turns that
into the whole ring part (U*n tokens) with H/U heads; the ring-group schedule (a ``RingPlan``
or a ``HelperPlan``) runs on those; the inverse all-to-all returns the output (and lse) to
sequence shards. With U = 1 there is no all-to-all; with R = 1 the schedule is one local
step.

``usp_forward`` and ``usp_backward`` are plain functions (no autograd) so that callers with
a saved result, like rematerialization-aware checkpointing, can run the backward alone;
``USPAttention`` ties them together for autograd.
"""
from __future__ import annotations

import torch

from .agree import check_agreement
from .comm import all_to_all
from .helper import helper_backward, helper_forward
from .plan import HelperPlan
from .ring import RingConfig, ring_backward, ring_forward
from .sinks import sinks_grad
from .ulysses import repeat_kv_heads


def _schedule(cfg: RingConfig):
    if isinstance(cfg.plan, HelperPlan):
        return helper_forward, helper_backward
    return ring_forward, ring_backward


def _kv_to_heads(k, v, mesh, pass_name: str):
    """K and V in one all-to-all: [2, B, n, Hkv, D] (heads on dim 3, sequence on dim 2) ->
    [2, B, U*n, max(Hkv, U)/U, D], K/V heads repeated first where Hkv < U."""
    U = mesh.ulysses_degree
    return all_to_all(repeat_kv_heads(torch.stack([k, v]), U, head_dim=3), mesh.ulysses_group,
                      U, scatter_dim=3, gather_dim=2, what=_a2a("K/V", pass_name))


def _a2a(tensors: str, pass_name: str) -> str:
    return f"Ulysses all-to-all of {tensors} ({pass_name})"


def usp_forward(q, k, v, cfg: RingConfig):
    """(out [B, n, Hq, D] in q's dtype, lse [B, Hq, n]) for this rank's n tokens."""
    forward, _ = _schedule(cfg)
    U, group = cfg.mesh.ulysses_degree, cfg.mesh.ulysses_group
    if U == 1:
        return forward(q, k, v, cfg)
    kv = _kv_to_heads(k, v, cfg.mesh, "forward")
    qh = all_to_all(q, group, U, scatter_dim=2, gather_dim=1, what=_a2a("q", "forward"))
    out, lse = forward(qh, kv[0], kv[1], cfg)
    return (all_to_all(out, group, U, scatter_dim=1, gather_dim=2,
                       what=_a2a("out", "forward")),
            all_to_all(lse, group, U, scatter_dim=2, gather_dim=1,
                       what=_a2a("lse", "forward")))


def usp_backward(dout, q, k, v, out, lse, cfg: RingConfig):
    """(dq, dk, dv) of ``usp_forward`` given its result (out, lse) and the gradient dout."""
    _, backward = _schedule(cfg)
    U, group = cfg.mesh.ulysses_degree, cfg.mesh.ulysses_group
    dout = dout.contiguous()
    if U == 1:
        return backward(dout, q, k, v, out, lse, cfg)
    hkv = k.shape[2]
    # q, out and dout share one all-to-all; k and v another (repeated heads as in forward).
    qod = all_to_all(torch.stack([q, out, dout]), group, U, scatter_dim=3, gather_dim=2,
                     what=_a2a("q/out/dout", "backward"))
    kv = _kv_to_heads(k, v, cfg.mesh, "backward")
    lse_h = all_to_all(lse.contiguous(), group, U, scatter_dim=1, gather_dim=2,
                       what=_a2a("lse", "backward"))
    dq, dk, dv = backward(qod[2], qod[0], kv[0], kv[1], qod[1], lse_h, cfg)
    dq = all_to_all(dq, group, U, scatter_dim=1, gather_dim=2, what=_a2a("dq", "backward"))
    dkv = all_to_all(torch.stack([dk, dv]), group, U, scatter_dim=2, gather_dim=3,
                     what=_a2a("dK/dV", "backward"))
    if dkv.shape[3] != hkv:   # sum the gradients of repeated K/V heads
        dkv = dkv.unflatten(3, (hkv, dkv.shape[3] // hkv)).sum(4)
    return dq, dkv[0], dkv[1]


class USPAttention(torch.autograd.Function):
    """(q, k, v, sinks) -> (out, lse); ``sinks`` [Hq] or None; lse is not differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, cfg: RingConfig):
        out, lse = usp_forward(q, k, v, cfg)
        ctx.save_for_backward(q, k, v, out, lse, sinks)
        ctx.cfg = cfg
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, sinks = ctx.saved_tensors
        check_agreement(ctx.cfg.mesh, "the backward of dist_flash_attn", {"dout": dout})
        dq, dk, dv = usp_backward(dout, q, k, v, out, lse, ctx.cfg)
        dsinks = None if sinks is None else sinks_grad(dout, out, lse, sinks)
        return dq, dk, dv, dsinks, None
