"""Executor of DistFlashAttn's helper schedule (``plan.HelperPlan``): causal attention on the
contiguous layout in P // 2 + 1 balanced steps.

At step t >= 1 each rank has one task (see ``plan.Task``): "own" (its queries, another rank's
K/V) or "help" (another rank's queries, its own K/V, result sent back). Per iteration t a rank

1. posts one batched exchange: the inputs of step t+1 (K/V or query rows, to and from the
   peers the plan names) and the results of step t-1 that go back to their owners;
2. computes step t on inputs that arrived during the previous iteration;
3. waits for the exchange and folds in the results returned to it.

After the last step one more exchange returns the last results. Communication therefore
overlaps the compute of the step before it, all tensors of a step travel in one
``batch_isend_irecv``, receive buffers come from a pool allocated once per call (two per
kind, alternating), and nothing synchronises the host per step.

What travels (forward / backward):
- "own" task: K/V [2, B, n, Hkv, D] in; backward returns dK/dV (accumulation dtype) to the
  K/V owner.
- "help" task: query rows in (backward: q, out, dout rows and their lse); forward returns the
  partial (out in q's dtype, lse), backward returns dq rows (accumulation dtype).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .comm import wait_all
from .kernels.mask import accumulation_dtype
from .merge import merge_, new_accumulators
from .nonfinite import (KeyFlags, RowFlags, bad_rows, poison_backward_, poison_forward_,
                        sanitized)
from .packing import pack, unpack
from .profile import span
from .ring import RingConfig, _start_profile, finish_forward


class _Pool:
    """Receive buffers, allocated on first use and reused every other step."""

    def __init__(self):
        self._bufs = {}

    def get(self, key, step: int, make):
        k = (key, step % 2)
        if k not in self._bufs:
            self._bufs[k] = make()
        return self._bufs[k]


class _Exchange:
    """Collects the point-to-point ops of one iteration and posts them as one batch."""

    def __init__(self, group):
        self.group = group
        self.ops = []
        self.keep = []  # tensors that must stay alive until the batch completes

    def send(self, tensor, dst):
        tensor = tensor.contiguous()
        self.keep.append(tensor)
        self.ops.append(dist.P2POp(dist.isend, tensor, dst, self.group))

    def recv(self, tensor, src):
        self.ops.append(dist.P2POp(dist.irecv, tensor, src, self.group))

    def post(self):
        self.works = dist.batch_isend_irecv(self.ops) if self.ops else []
        return self

    def wait(self, what: str):
        wait_all(self.works, lambda: f"{what} (peers: ranks "
                                     f"{sorted({op.peer for op in self.ops})})")


def _drive(cfg: RingConfig, device, pass_name, post_inputs, post_returns, compute, absorb):
    """The iteration skeleton shared by forward and backward (see the module docstring)."""
    prof = _start_profile(cfg, pass_name)
    steps = cfg.plan.steps
    group = cfg.mesh.ring_group
    results = {}
    for t in range(steps + 1):             # t == steps: only the last returns travel
        ex = _Exchange(group)
        if t + 1 < steps:
            post_inputs(ex, t + 1)
        if t - 1 >= 1:
            post_returns(ex, t - 1, results.pop(t - 1))
        ex.post()
        if t < steps:
            with span(prof, "compute", t, device):
                result = compute(t)
            if t >= 1:                     # step 0 (the diagonal) returns nothing
                results[t] = result
        with span(prof, "wait", t, device):
            ex.wait(f"helper step {t} {pass_name}")
        if t - 1 >= 1:
            absorb(t - 1)


def _global(cfg: RingConfig, rank: int) -> int:
    return cfg.mesh.ring_ranks[rank]


def helper_forward(q, k, v, cfg: RingConfig):
    """out [B, n, Hq, D] (q's dtype), lse [B, Hq, n] (accumulation dtype)."""
    plan, r, be, scale, cap = cfg.plan, cfg.mesh.ring_rank, cfg.backend, cfg.scale, cfg.softcap
    acc = accumulation_dtype(q.dtype)
    out_acc, lse_acc = new_accumulators(q, acc, v.shape[-1])
    dims = (k.shape[-1], v.shape[-1])
    q_bad, q = bad_rows(q), sanitized(q)   # the kernels see finite values (nonfinite.py)
    kv_mine = pack(k, v)                   # raw: a rank that computes on it takes its flags
    keys_mine = KeyFlags(k, v)             # from the raw values
    k, v = unpack(sanitized(kv_mine), dims)
    pool, inputs, returned = _Pool(), {}, {}
    gr = lambda rank: _global(cfg, rank)

    def post_inputs(ex, t):
        for kind, dst, rows in plan.outbound(r, t):
            ex.send(kv_mine if kind == "kv" else q[:, plan.slots(rows)], gr(dst))
        for kind, src, rows in plan.inbound(r, t):
            sl = plan.slots(rows)
            shape = kv_mine.shape if kind == "kv" else q[:, sl].shape
            buf = pool.get((kind, shape), t, lambda: torch.empty(shape, dtype=q.dtype,
                                                                  device=q.device))
            ex.recv(buf, gr(src))
            inputs[t] = buf

    def compute(t):
        task = plan.tasks[r][t]
        if task.kind == "diag":
            be.forward_into(q, k, v, out_acc, lse_acc, scale=scale, mask=task.mask, softcap=cap)
            poison_forward_(out_acc, lse_acc, task.mask, keys_mine, q_bad)
            return None
        sl = plan.slots(task.rows)
        buf = inputs.pop(t)
        if task.kind == "own":     # the peer's raw K/V: flags first, then clean in place
            keys = KeyFlags(*unpack(buf, dims))
            be.forward_into(q[:, sl], *unpack(sanitized(buf, out=buf), dims), out_acc[:, sl],
                            lse_acc[:, :, sl], scale=scale, mask=task.mask, softcap=cap)
            poison_forward_(out_acc[:, sl], lse_acc[:, :, sl], task.mask, keys, q_bad[:, sl])
            return None
        # help: (out, lse) of the peer's (sanitized) rows, which it poisons for its own q
        out, lse = be.forward(buf, k, v, scale=scale, mask=task.mask, softcap=cap)
        poison_forward_(out, lse, task.mask, keys_mine)
        return out, lse

    def post_returns(ex, s, result):
        task = plan.tasks[r][s]
        if task.kind == "help":
            ex.send(result[0], gr(task.peer))
            ex.send(result[1], gr(task.peer))
        for kind, helper, rows in plan.outbound(r, s):
            if kind == "q":
                sl = plan.slots(rows)
                o = pool.get(("ret_o", sl.stop - sl.start), s,
                             lambda: torch.empty_like(out_acc[:, sl], dtype=q.dtype))
                l = pool.get(("ret_l", sl.stop - sl.start), s,
                             lambda: torch.empty_like(lse_acc[:, :, sl]))
                ex.recv(o, gr(helper))
                ex.recv(l, gr(helper))
                returned[s] = (sl, o, l)

    def absorb(s):
        if s in returned:
            sl, o, l = returned.pop(s)
            merge_(out_acc[:, sl], lse_acc[:, :, sl], o, l)

    _drive(cfg, q.device, "forward", post_inputs, post_returns, compute, absorb)
    return finish_forward(out_acc, lse_acc, q.dtype, cfg)


def helper_backward(dout, q, k, v, out, lse, cfg: RingConfig):
    """(dq, dk, dv) in the dtypes of q, k, v."""
    plan, r, be, scale, cap = cfg.plan, cfg.mesh.ring_rank, cfg.backend, cfg.scale, cfg.softcap
    acc = accumulation_dtype(q.dtype)
    dq_acc = torch.zeros(q.shape, dtype=acc, device=q.device)
    dims = (k.shape[-1], v.shape[-1])
    kv_mine = pack(k, v)
    dkv_acc = torch.zeros(kv_mine.shape, dtype=acc, device=q.device)
    dk_acc, dv_acc = unpack(dkv_acc, dims)
    qod_dims = (q.shape[-1], out.shape[-1], dout.shape[-1])
    # The kernels see finite values; the rows' flags travel with them (nonfinite.py).
    rows_mine = RowFlags.of(q, out, lse, dout)
    q, out, lse, dout = rows_mine.sanitize(q, out, lse, dout)
    codes = rows_mine.codes()                     # [B, n, Hq] uint8
    k, v = unpack(sanitized(kv_mine), dims)
    qod = pack(q, out.to(q.dtype), dout)          # what a helper needs of our query rows
    lse = lse.contiguous()
    pool, inputs, returned = _Pool(), {}, {}
    gr = lambda rank: _global(cfg, rank)

    def post_inputs(ex, t):
        for kind, dst, rows in plan.outbound(r, t):
            if kind == "kv":
                ex.send(kv_mine, gr(dst))
            else:
                sl = plan.slots(rows)
                ex.send(qod[:, :, sl], gr(dst))
                ex.send(lse[:, :, sl], gr(dst))
                ex.send(codes[:, sl], gr(dst))
        for kind, src, rows in plan.inbound(r, t):
            sl = plan.slots(rows)
            if kind == "kv":
                buf = pool.get("kv", t, lambda: torch.empty_like(kv_mine))
                ex.recv(buf, gr(src))
            else:
                shape, lshape = qod[:, :, sl].shape, lse[:, :, sl].shape
                cshape = codes[:, sl].shape
                buf = (pool.get(("qod", shape), t, lambda: torch.empty(
                           shape, dtype=q.dtype, device=q.device)),
                       pool.get(("lse", lshape), t, lambda: torch.empty(
                           lshape, dtype=lse.dtype, device=q.device)),
                       pool.get(("codes", cshape), t, lambda: torch.empty(
                           cshape, dtype=codes.dtype, device=q.device)))
                for part in buf:
                    ex.recv(part, gr(src))
            inputs[t] = buf

    def compute(t):
        task = plan.tasks[r][t]
        if task.kind == "diag":
            be.backward_into(dout, q, k, v, out, lse, dq_acc, dk_acc, dv_acc,
                             scale=scale, mask=task.mask, softcap=cap)
            poison_backward_(dq_acc, dk_acc, dv_acc, task.mask, rows_mine)
            return None
        sl = plan.slots(task.rows)
        buf = inputs.pop(t)
        if task.kind == "own":      # dK/dV of the peer's K/V go back to it
            dkv = pool.get("dkv_out", t, lambda: torch.empty_like(dkv_acc)).zero_()
            be.backward_into(dout[:, sl], q[:, sl], *unpack(sanitized(buf, out=buf), dims),
                             out[:, sl], lse[:, :, sl], dq_acc[:, sl], *unpack(dkv, dims),
                             scale=scale, mask=task.mask, softcap=cap)
            poison_backward_(dq_acc[:, sl], *unpack(dkv, dims), task.mask, rows_mine.rows(sl))
            return dkv
        # help: dq rows go back, dK/dV stay here
        (hq, ho, hdo), hlse = unpack(buf[0], qod_dims), buf[1]
        dq = pool.get(("dq_out", hq.shape), t, lambda: torch.empty(
            hq.shape, dtype=acc, device=q.device)).zero_()
        be.backward_into(hdo, hq, k, v, ho, hlse, dq, dk_acc, dv_acc,
                         scale=scale, mask=task.mask, softcap=cap)
        poison_backward_(dq, dk_acc, dv_acc, task.mask, RowFlags.from_codes(buf[2]))
        return dq

    def post_returns(ex, s, result):
        task = plan.tasks[r][s]
        ex.send(result, gr(task.peer))
        for kind, peer, rows in plan.outbound(r, s):
            sl = plan.slots(rows)
            if kind == "kv":
                buf = pool.get("ret_dkv", s, lambda: torch.empty_like(dkv_acc))
                returned.setdefault(s, []).append((None, buf))
            else:
                buf = pool.get(("ret_dq", sl.stop - sl.start), s,
                               lambda: torch.empty_like(dq_acc[:, sl]))
                returned.setdefault(s, []).append((sl, buf))
            ex.recv(buf, gr(peer))

    def absorb(s):
        for sl, buf in returned.pop(s, []):
            if sl is None:
                dkv_acc.add_(buf)
            else:
                dq_acc[:, sl].add_(buf)

    _drive(cfg, q.device, "backward", post_inputs, post_returns, compute, absorb)
    return dq_acc.to(q.dtype), dk_acc.to(k.dtype), dv_acc.to(v.dtype)
