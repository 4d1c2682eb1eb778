"""USP: Ulysses inside, ring (or helper schedule) across; pure ring and pure Ulysses are its
edge cases.

Each rank holds n tokens of its ring part with all heads. The Ulysses all-to-all turns that
into the whole ring part (U*n tokens) with H/U heads; the ring-group schedule (a ``RingPlan``,
a ``HelperPlan`` or an ``AllGatherPlan``) runs on those; the inverse all-to-all returns the output (and lse) to
sequence shards. With U = 1 there is no all-to-all; with R = 1 the schedule is one local
step.

``usp_forward`` and ``usp_backward`` are plain functions (no autograd) so that callers with
a saved result, like rematerialization-aware checkpointing, can run the backward alone;
``USPAttention`` ties their parts together for autograd, keeping the head-sharded tensors of
the forward so that its backward sends only dout and the gradients.
"""
from __future__ import annotations

import torch

from .agree import check_agreement, failure_marks
from .allgather import allgather_backward, allgather_forward
from .comm import all_to_all, all_to_all_v
from .gather_plan import AllGatherPlan
from .helper import helper_backward, helper_forward
from .plan import HelperPlan
from .ring import RingConfig, ring_backward, ring_forward
from .sinks import sinks_grad
from .ulysses import head_split, repeat_kv_heads


def _schedule(cfg: RingConfig):
    if isinstance(cfg.plan, HelperPlan):
        return helper_forward, helper_backward
    if isinstance(cfg.plan, AllGatherPlan):
        return allgather_forward, allgather_backward
    return ring_forward, ring_backward


def _kv_to_heads(k, v, mesh, pass_name: str):
    """K and V in one all-to-all: [2, B, n, Hkv, D] (heads on dim 3, sequence on dim 2) ->
    [2, B, U*n, max(Hkv, U)/U, D], K/V heads repeated first where Hkv < U."""
    U = mesh.ulysses_degree
    return all_to_all([repeat_kv_heads(k, U), repeat_kv_heads(v, U)], mesh.ulysses_group,
                      U, scatter_dim=3, gather_dim=2, what=_a2a("K/V", pass_name))


def _a2a(tensors: str, pass_name: str) -> str:
    return f"Ulysses all-to-all of {tensors} ({pass_name})"


def _heads_of(split, w: int, kv: bool):
    """Rank w's heads: a slice of the q heads, or an index tensor of the K/V heads."""
    return split.kv_index[w] if kv else range(*split.q_bounds[w])


def _count(split, w: int, kv: bool) -> int:
    return len(_heads_of(split, w, kv))


def _take(t, heads, hdim: int, kv: bool):
    if kv:
        return t.index_select(hdim, torch.tensor(heads, device=t.device))
    return t.narrow(hdim, heads.start, len(heads))


def _to_heads_v(tensors, kinds, split, mesh, sdim: int, hdim: int, what: str):
    """Uneven seq -> heads: each tensor [.., n (sdim), H (hdim), ..] becomes [.., U*n,
    H_u, ..] with this rank's heads of ``split`` (``kinds[i]``: True for K/V heads)."""
    U, me = mesh.ulysses_degree, mesh.ulysses_rank
    send = [[_take(t, _heads_of(split, w, kv), hdim, kv) for t, kv in zip(tensors, kinds)]
            for w in range(U)]
    shapes = [[_with(t.shape, hdim, _count(split, me, kv)) for t, kv in zip(tensors, kinds)]
              for _ in range(U)]
    got = all_to_all_v(send, shapes, mesh.ulysses_group, what)
    return [torch.cat([got[w][i] for w in range(U)], dim=sdim) for i in range(len(tensors))]


def _to_seq_v(tensors, kinds, split, mesh, sdim: int, hdim: int, what: str):
    """Inverse of ``_to_heads_v``; K/V tensors (gradients) come back summed over the ranks
    that held a copy of a head, so they have Hkv heads again."""
    U, me = mesh.ulysses_degree, mesh.ulysses_rank
    n = tensors[0].shape[sdim] // U
    send = [[t.narrow(sdim, w * n, n) for t in tensors] for w in range(U)]
    shapes = [[_with(_with(t.shape, sdim, n), hdim, _count(split, w, kv))
               for t, kv in zip(tensors, kinds)] for w in range(U)]
    got = all_to_all_v(send, shapes, mesh.ulysses_group, what)
    result = []
    for i, kv in enumerate(kinds):
        parts = torch.cat([got[w][i] for w in range(U)], dim=hdim)
        if kv:
            index = torch.tensor([h for w in range(U) for h in split.kv_index[w]],
                                 device=parts.device)
            total = parts.new_zeros(_with(parts.shape, hdim, split.hkv))
            parts = total.index_add_(hdim, index, parts)
        result.append(parts)
    return result


def _with(shape, dim: int, size: int):
    shape = list(shape)
    shape[dim] = size
    return shape


def _split(q, k, v, mesh):
    """The head split of this call (None: the equal one of ``repeat_kv_heads``, which stacks
    K with V and q with out, so only when V's head dim is q/k's)."""
    split = head_split(q.shape[2], k.shape[2], mesh.ulysses_degree)
    return None if split.even and v.shape[-1] == k.shape[-1] else split


def usp_forward(q, k, v, cfg: RingConfig):
    """(out [B, n, Hq, D] in q's dtype, lse [B, Hq, n]) for this rank's n tokens."""
    return _forward(q, k, v, cfg)[:2]


def _forward(q, k, v, cfg: RingConfig):
    """(out, lse, heads): ``usp_forward``'s result and ``heads`` = (q, k, v, out, lse) as
    the schedule saw them (head-sharded, K/V repeated as sent), kept for ``_heads_backward``."""
    forward, _ = _schedule(cfg)
    U, group = cfg.mesh.ulysses_degree, cfg.mesh.ulysses_group
    if U == 1:
        out, lse = forward(q, k, v, cfg)
        return out, lse, (q, k, v, out, lse)
    split = _split(q, k, v, cfg.mesh)
    if split is not None:
        qh, kh, vh = _to_heads_v([q, k, v], [False, True, True], split, cfg.mesh, 1, 2,
                                 _a2a("q/K/V", "forward"))
        oh, lse_h = forward(qh, kh, vh, cfg)
        out, = _to_seq_v([oh], [False], split, cfg.mesh, 1, 2, _a2a("out", "forward"))
        lse, = _to_seq_v([lse_h.contiguous()], [False], split, cfg.mesh, 2, 1,
                         _a2a("lse", "forward"))
        return out, lse, (qh, kh, vh, oh, lse_h)
    kv = _kv_to_heads(k, v, cfg.mesh, "forward")
    qh = all_to_all(q, group, U, scatter_dim=2, gather_dim=1, what=_a2a("q", "forward"))
    oh, lse_h = forward(qh, kv[0], kv[1], cfg)
    out = all_to_all(oh, group, U, scatter_dim=1, gather_dim=2, what=_a2a("out", "forward"))
    lse = all_to_all(lse_h, group, U, scatter_dim=2, gather_dim=1,
                     what=_a2a("lse", "forward"))
    return out, lse, (qh, kv[0], kv[1], oh, lse_h)


def _heads_backward(dh, heads, hkv: int, split, cfg: RingConfig):
    """(dq, dk, dv) sequence-sharded, from the head-sharded gradient ``dh`` and ``heads``
    (q, k, v, out, lse head-sharded); ``hkv``: K/V heads of the sequence-sharded k."""
    _, backward = _schedule(cfg)
    U, group = cfg.mesh.ulysses_degree, cfg.mesh.ulysses_group
    qh, kh, vh, oh, lse_h = heads
    dq, dk, dv = backward(dh, qh, kh, vh, oh, lse_h, cfg)
    if U == 1:
        return dq, dk, dv
    if split is not None:
        return tuple(_to_seq_v([dq, dk, dv], [False, True, True], split, cfg.mesh, 1, 2,
                               _a2a("dq/dK/dV", "backward")))
    dq = all_to_all(dq, group, U, scatter_dim=1, gather_dim=2, what=_a2a("dq", "backward"))
    parts = [dk, dv]   # the list alone holds them: freed once copied into the send buffer
    del dk, dv
    dkv = all_to_all(parts, group, U, scatter_dim=2, gather_dim=3,
                     what=_a2a("dK/dV", "backward"))
    if dkv.shape[3] != hkv:   # sum the gradients of repeated K/V heads
        dkv = dkv.unflatten(3, (hkv, dkv.shape[3] // hkv)).sum(4)
    return dq, dkv[0], dkv[1]


def _dout_to_heads(dout, split, cfg: RingConfig):
    """dout [B, n, Hq, D] -> this rank's heads [B, U*n, Hq_u, D] (as q went forward)."""
    U = cfg.mesh.ulysses_degree
    if U == 1:
        return dout
    if split is not None:
        return _to_heads_v([dout], [False], split, cfg.mesh, 1, 2,
                           _a2a("dout", "backward"))[0]
    return all_to_all(dout, cfg.mesh.ulysses_group, U, scatter_dim=2, gather_dim=1,
                      what=_a2a("dout", "backward"))


def usp_backward(dout, q, k, v, out, lse, cfg: RingConfig):
    """(dq, dk, dv) of ``usp_forward`` given its result (out, lse) and the gradient dout, all
    sequence-sharded: so q, out, dout, K/V and lse go to the head-sharded side first (the
    autograd path, which kept them from the forward, sends dout only)."""
    U, group = cfg.mesh.ulysses_degree, cfg.mesh.ulysses_group
    dout = dout.contiguous()
    if U == 1:
        return _heads_backward(dout, (q, k, v, out, lse), k.shape[2], None, cfg)
    split = _split(q, k, v, cfg.mesh)
    if split is not None:
        qh, oh, dh, kh, vh = _to_heads_v([q, out, dout, k, v], [False] * 3 + [True] * 2,
                                         split, cfg.mesh, 1, 2,
                                         _a2a("q/out/dout/K/V", "backward"))
        lse_h, = _to_heads_v([lse.contiguous()], [False], split, cfg.mesh, 2, 1,
                             _a2a("lse", "backward"))
        return _heads_backward(dh, (qh, kh, vh, oh, lse_h), k.shape[2], split, cfg)
    # q, out and dout share one all-to-all; k and v another (repeated heads as in forward).
    qod = all_to_all([q, out, dout], group, U, scatter_dim=3, gather_dim=2,
                     what=_a2a("q/out/dout", "backward"))
    kv = _kv_to_heads(k, v, cfg.mesh, "backward")
    lse_h = all_to_all(lse.contiguous(), group, U, scatter_dim=1, gather_dim=2,
                       what=_a2a("lse", "backward"))
    return _heads_backward(qod[2], (qod[0], kv[0], kv[1], qod[1], lse_h), k.shape[2], None,
                           cfg)


class USPAttention(torch.autograd.Function):
    """(q, k, v, sinks) -> (out, lse); ``sinks`` [Hq] or None; lse is not differentiable.

    Saves q, k, v, out and lse head-sharded, as the forward's schedule had them, so the
    backward all-to-alls only dout (sequence -> heads) and dq, dk, dv (heads -> sequence)."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, cfg: RingConfig):
        out, lse, heads = _forward(q, k, v, cfg)
        # dsinks is computed sequence-sharded (this rank's tokens): keep the returned out/lse
        seq = (out, lse) if sinks is not None else ()
        ctx.save_for_backward(*heads, sinks, *seq)
        ctx.cfg, ctx.hkv = cfg, k.shape[2]
        ctx.split = _split(q, k, v, cfg.mesh) if cfg.mesh.ulysses_degree > 1 else None
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        saved = ctx.saved_tensors
        heads, sinks = saved[:5], saved[5]
        cfg = ctx.cfg
        check_agreement(cfg.mesh, "the backward of dist_flash_attn", {"dout": dout})
        with failure_marks(cfg.mesh, "the backward of dist_flash_attn"):
            dh = _dout_to_heads(dout.contiguous(), ctx.split, cfg)
            dq, dk, dv = _heads_backward(dh, heads, ctx.hkv, ctx.split, cfg)
        dsinks = None if sinks is None else sinks_grad(dout, *saved[6:], sinks)
        return dq, dk, dv, dsinks, None
