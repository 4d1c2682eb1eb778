"""Single-GPU view of a P-rank causal sequence-parallel run, plus a communication model.

What it measures (real kernels, one device):

* For P in ``--worlds`` (default 2, 4, 8, 16, 32) and each causal layout/schedule
  (contiguous ring, zigzag ring, stripe ring, contiguous helper), the full work list of
  rank 0 and of the busiest rank, forward and backward: every block kernel, online-softmax
  merge and gradient addition that rank performs, in plan order. Blocks that would arrive
  from other ranks (their K/V, their query rows, returned partials) are stood in by local
  buffers of the same shape, so the kernels are exactly those of the real run; only the
  communication is missing.
* The "no-comm" bound: the whole causal attention of S = P * tokens_per_rank tokens as one
  monolithic kernel call on this device, divided by P -- what P ranks would take with perfect
  balance, no fragmentation and free communication.
* Per-step compute times of every rank (each distinct step is timed once and reused:
  identical steps launch identical kernels).

What it predicts (communication model, see docs/BENCHMARKS.md): each step's bytes, read off
the plan, become time on a link (latency + bytes / bandwidth, full duplex). A step lasts
``max(compute, communication) + absorb`` (absorb = merging results that came back), the
slowest rank setting the pace; results of the last step travel after it, exposed. Ulysses
all-to-alls are not overlapped. From this: end-to-end time and iterations/s for every
layout/schedule and every Ulysses x ring split of the GPU counts in ``--clusters`` (default
8 and 64; Ulysses inside a node on NVLink, ring across nodes on InfiniBand).

Output (under ``--out``, default bench/out/): ``schedule_efficiency.{md,csv}``,
``schedule_steps.csv``, ``schedule_splits.{md,csv}`` and ``schedule.png`` (when matplotlib is
installed).

    python bench/schedule.py                       # GPU defaults: 8k tokens/rank, D=128,
                                                   # Hq 32 / Hkv 8, bf16
    python bench/schedule.py --smoke               # tiny shapes on CPU (meaningless numbers)
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402  (puts the repository root on sys.path)
import torch  # noqa: E402

from distattn.kernels import get_backend  # noqa: E402
from distattn.kernels.mask import Mask, accumulation_dtype  # noqa: E402
from distattn.merge import merge_  # noqa: E402
from distattn.plan import HelperPlan, work  # noqa: E402

# ---------------------------------------------------------------------------------------------
# The work of one rank, as data (pure: no tensors)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    """One thing a rank computes. Token ranges are [start, stop) in a local sequence.

    kind: ``fwd_own`` / ``bwd_own`` (this rank's query rows ``q`` with keys ``k`` of its own
    K/V, or of a received K/V when ``remote``), ``fwd_help`` / ``bwd_help`` (received query
    rows ``q`` with keys ``k`` of its own K/V; the result goes back), ``merge`` (fold a
    returned (out, lse) partial into rows ``q``), ``add_dq`` (add returned dq rows ``q``),
    ``add_dkv`` (add returned/passed dK/dV of keys ``k``).
    """
    kind: str
    q: tuple = (0, 0)
    k: tuple = (0, 0)
    mask: Mask = Mask.none()
    remote: bool = False


@dataclass(frozen=True)
class Window:
    """One iteration of a rank: ``compute`` ops overlapped with ``send``/``recv`` bytes, then
    ``absorb`` ops once the communication has finished. The window after the last step has
    no compute (only the last results travelling back)."""
    compute: tuple
    absorb: tuple
    send: int
    recv: int
    messages: int


def _range(sl: slice) -> tuple:
    return sl.start, sl.stop


def _len(rng) -> int:
    """Length of a (start, stop) range or of a slice with explicit bounds."""
    if isinstance(rng, slice):
        return rng.stop - rng.start
    return rng[1] - rng[0]


def _work_items(plan, rank: int, step: int):
    """(Work, query slot range, key slot range, simplified mask) of the blocks ``rank``
    computes at ``step`` that show something."""
    for w in plan.computes(rank, step):
        q, k = _range(w.q), (0, len(w.key_slots))     # keys: packed payload coordinates
        mask = w.mask.simplify(_len(q), _len(k))
        if mask.pieces:
            yield w, q, k, mask


class Bytes:
    """Message sizes in bytes for one ring rank's shape, per slot (see docs/BENCHMARKS.md)."""

    def __init__(self, shape: common.Shape):
        s = shape
        acc = torch.empty((), dtype=accumulation_dtype(s.dtype)).element_size()
        self._kv_row = 2 * s.batch * s.hkv * s.head_dim * s.elt    # one slot of K and V
        self._q_row = s.batch * s.hq * s.head_dim * s.elt      # one token of q / out / dout
        self._lse_row = s.batch * s.hq * acc
        self._dq_row = s.batch * s.hq * s.head_dim * acc
        self._dkv_row = 2 * s.batch * s.hkv * s.head_dim * acc

    def kv(self, n: int) -> int:
        """K and V of ``n`` slots."""
        return n * self._kv_row

    def q_rows(self, n: int, pass_: str) -> int:
        """Query rows a helper receives: q (forward); q, out, dout and lse (backward)."""
        return n * (self._q_row if pass_ == "fwd" else 3 * self._q_row + self._lse_row)

    def partial(self, n: int) -> int:
        """A forward partial result going back: out rows in q's dtype + lse."""
        return n * (self._q_row + self._lse_row)

    def dq(self, n: int) -> int:
        return n * self._dq_row

    def dkv(self, n: int) -> int:
        return n * self._dkv_row


def _returns(plan, step: int, pass_: str) -> list[tuple]:
    """Results computed at ``step`` that travel back after it: (src, dst, kind, range).

    Forward: a block computed away from its queries' owner returns (out, lse) rows.
    Backward: such a block returns dq rows; in the helper schedule a block computed on a
    received K/V also returns its dK/dV (in the ring schedule dK/dV travel with the ring)."""
    helper = isinstance(plan, HelperPlan)
    out = []
    for c in range(plan.world):
        for w, q, k, _ in _work_items(plan, c, step):
            if w.q_owner != c:
                out.append((c, w.q_owner, "partial" if pass_ == "fwd" else "dq", q))
            if pass_ == "bwd" and helper and w.kv_owner != c:
                out.append((c, w.kv_owner, "dkv", k))
    return out


def all_returns(plan, pass_: str) -> list[list[tuple]]:
    """``_returns`` of every step: the same for every rank's program, so built once."""
    return [_returns(plan, t, pass_) for t in range(plan.steps)]


def _ring_dkv(plan, rank: int, t: int, nb: Bytes):
    """Ring backward, window ``t``: the dK/dV partial sum of step t - 1 (steps >= 1 only; step
    0's stays local) moves on to the next holder, or after the last step straight back to
    its owner. Returns (send bytes, recv bytes, messages, absorb ops) of ``rank``."""
    if t < 2 or plan.steps < 2:
        return 0, 0, 0, ()
    sent = plan.key_len(rank, t - 1)
    # What arrives: the partial sum for the keys held at step t, or one's own payload back.
    got = plan.key_len(rank, t) if t < plan.steps else plan.payload_len(rank)
    return (nb.dkv(sent), nb.dkv(got), 2, (Op("add_dkv", k=(0, got)),) if got else ())


def rank_program(plan, rank: int, shape: common.Shape, pass_: str,
                 returns: list | None = None) -> list[Window]:
    """The ``plan.steps + 1`` windows of ``rank`` for pass "fwd" or "bwd". ``shape.tokens``
    is the plan's ``part_len`` (slots per ring rank). ``returns``: ``all_returns(plan,
    pass_)`` when the caller builds every rank's program (else computed here)."""
    if returns is None:
        returns = all_returns(plan, pass_)
    nb = Bytes(shape)
    helper = isinstance(plan, HelperPlan)
    steps = plan.steps
    windows = []
    prev_returns: list = []
    for t in range(steps + 1):
        compute, absorb = [], []
        send = recv = messages = 0
        if t < steps:
            for w, q, k, mask in _work_items(plan, rank, t):
                if w.q_owner == rank:
                    compute.append(Op(f"{pass_}_own", q, k, mask, w.kv_owner != rank))
                else:
                    compute.append(Op(f"{pass_}_help", q, k, mask))
        # inputs of step t + 1, prefetched during step t
        if t + 1 < steps:
            if helper:
                whole = plan.layout.part_len
                for kind, _, rows in plan.inbound(rank, t + 1):
                    recv += nb.kv(whole) if kind == "kv" else \
                        nb.q_rows(_len(plan.slots(rows)), pass_)
                    messages += 1
                for kind, _, rows in plan.outbound(rank, t + 1):
                    send += nb.kv(whole) if kind == "kv" else \
                        nb.q_rows(_len(plan.slots(rows)), pass_)
                    messages += 1
            else:   # the ring passes each owner's payload on, as far as the plan goes
                send += nb.kv(plan.key_len((rank + 1) % plan.world, t + 1))
                recv += nb.kv(plan.key_len(rank, t + 1))
                messages += 1
        # results of step t - 1 travelling back during step t (after the last step: alone)
        for src, dst, kind, rng in prev_returns:
            size = {"partial": nb.partial, "dq": nb.dq, "dkv": nb.dkv}[kind](_len(rng))
            if src == rank:
                send += size
                messages += 1
            if dst == rank:
                recv += size
                messages += 1
                absorb.append(Op({"partial": "merge", "dq": "add_dq", "dkv": "add_dkv"}[kind],
                                 q=rng if kind != "dkv" else (0, 0),
                                 k=rng if kind == "dkv" else (0, 0)))
        if pass_ == "bwd" and not helper:
            s_, r_, m_, ops = _ring_dkv(plan, rank, t, nb)
            send, recv, messages = send + s_, recv + r_, messages + m_
            absorb.extend(ops)
        windows.append(Window(tuple(compute), tuple(absorb), send, recv, messages))
        prev_returns = returns[t] if t < steps else []
    return windows


# ---------------------------------------------------------------------------------------------
# Communication model
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Link:
    """A GPU's link: ``bandwidth`` bytes/s in each direction at once, ``latency`` seconds per
    batched exchange."""
    name: str
    bandwidth: float
    latency: float

    def ms(self, send: int, recv: int) -> float:
        """Time of one batched exchange that sends ``send`` and receives ``recv`` bytes."""
        if send == 0 and recv == 0:
            return 0.0
        return (self.latency + max(send, recv) / self.bandwidth) * 1e3


def all_to_all_ms(nbytes: int, degree: int, gpus_per_node: int, nvlink: Link,
                  ib: Link) -> float:
    """One all-to-all among ``degree`` consecutive ranks, each holding ``nbytes`` of which
    (degree-1)/degree leave it. Parts for ranks in the same node go over NVLink, the rest over
    the GPU's InfiniBand link, both at once."""
    if degree <= 1 or nbytes == 0:
        return 0.0
    if degree <= gpus_per_node:
        return (nvlink.latency + nbytes * (degree - 1) / degree / nvlink.bandwidth) * 1e3
    intra = nbytes * (gpus_per_node - 1) / degree
    inter = nbytes * (degree - gpus_per_node) / degree
    return (ib.latency + max(intra / nvlink.bandwidth, inter / ib.bandwidth)) * 1e3


def ulysses_ms(shape: common.Shape, degree: int, pass_: str, gpus_per_node: int,
               nvlink: Link, ib: Link) -> float:
    """The Ulysses all-to-alls of one pass for a rank holding ``shape`` (its sequence shard,
    all heads), none of them overlapped with compute. Forward: q and K/V (K/V heads repeated
    up to ``degree`` when fewer) in, out and lse back. Backward: dout in, dq and dK/dV back."""
    if degree <= 1:
        return 0.0
    s = shape
    acc = torch.empty((), dtype=accumulation_dtype(s.dtype)).element_size()
    q = s.batch * s.tokens * s.hq * s.head_dim * s.elt
    kv = 2 * s.batch * s.tokens * max(s.hkv, degree) * s.head_dim * s.elt
    lse = s.batch * s.tokens * s.hq * acc
    sizes = [q, kv, q, lse] if pass_ == "fwd" else [q, q, kv]
    return sum(all_to_all_ms(b, degree, gpus_per_node, nvlink, ib) for b in sizes)


def predict(programs: list[list[Window]], step_ms, link: Link) -> dict:
    """End-to-end time of one pass from all ranks' programs.

    ``step_ms(ops)`` is the measured time of a tuple of ops. Step t lasts
    ``max over ranks of (max(compute, comm) + absorb)``; the final window (results of the last
    step travelling back) is exposed. ``compute_ms`` is the same sum with free communication.
    """
    n_windows = len(programs[0])
    total = compute_only = 0.0
    per_step = []
    for t in range(n_windows):
        c = [step_ms(p[t].compute) for p in programs]
        a = [step_ms(p[t].absorb) for p in programs]
        x = [link.ms(p[t].send, p[t].recv) for p in programs]
        step = max(max(ci, xi) + ai for ci, xi, ai in zip(c, x, a))
        total += step
        compute_only += max(ci + ai for ci, ai in zip(c, a))
        per_step.append({"step": t, "compute_ms": max(c), "absorb_ms": max(a),
                         "comm_ms": max(x), "step_ms": step})
    return {"ms": total, "compute_ms": compute_only, "steps": per_step}


# ---------------------------------------------------------------------------------------------
# Executing ops with real kernels
# ---------------------------------------------------------------------------------------------


def _randn(shape, dtype, device, scale=1.0):
    return (torch.randn(shape, device=device, dtype=torch.float32) * scale).to(dtype)


class Workspace:
    """Buffers of one ring rank (``shape``) on ``device``: its own q/K/V, stand-ins for
    received K/V and query rows, accumulators and returned-result buffers. ``run(ops)`` issues
    the kernels of ``ops`` on them (asynchronously on a GPU)."""

    def __init__(self, shape: common.Shape, device: torch.device, backend_name: str):
        s = shape
        B, L, D = s.batch, s.tokens, s.head_dim
        dt, acc = s.dtype, accumulation_dtype(s.dtype)
        qs, kvs = (B, L, s.hq, D), (2, B, L, s.hkv, D)
        self.q_loc, self.q_rem = _randn(qs, dt, device), _randn(qs, dt, device)
        self.kv_loc, self.kv_rem = _randn(kvs, dt, device), _randn(kvs, dt, device)
        self.backend = get_backend(backend_name, self.q_loc, self.kv_loc[0], self.kv_loc[1])
        self.scale = D ** -0.5
        none = Mask.none()
        be = self.backend
        # plausible out / lse for the backward kernels (finite, of the right magnitude)
        self.out_loc, self.lse_loc = be.forward(self.q_loc, self.kv_loc[0], self.kv_loc[1],
                                                scale=self.scale, mask=none)
        self.out_rem, self.lse_rem = be.forward(self.q_rem, self.kv_loc[0], self.kv_loc[1],
                                                scale=self.scale, mask=none)
        self.lse_loc, self.lse_rem = self.lse_loc.contiguous(), self.lse_rem.contiguous()
        self.dout_loc, self.dout_rem = _randn(qs, dt, device), _randn(qs, dt, device)
        self.out_acc = self.out_loc.to(acc)
        self.lse_acc = self.lse_loc.to(acc).clone()
        self.part_out, self.part_lse = self.out_rem.clone(), self.lse_rem.to(acc).clone()
        self.dq_acc = torch.zeros(qs, dtype=acc, device=device)
        self.dq_ret = torch.zeros(qs, dtype=acc, device=device)
        self.dq_in = _randn(qs, acc, device, 1e-3)
        self.dkv_acc = torch.zeros(kvs, dtype=acc, device=device)
        self.dkv_rem = torch.zeros(kvs, dtype=acc, device=device)
        self.dkv_in = _randn(kvs, acc, device, 1e-3)

    def run(self, ops) -> None:
        be, scale = self.backend, self.scale
        for op in ops:
            qs, ks = slice(*op.q), slice(*op.k)
            if op.kind == "fwd_own":
                kv = self.kv_rem if op.remote else self.kv_loc
                be.forward_into(self.q_loc[:, qs], kv[0][:, ks], kv[1][:, ks],
                                self.out_acc[:, qs], self.lse_acc[:, :, qs],
                                scale=scale, mask=op.mask)
            elif op.kind == "fwd_help":
                be.forward(self.q_rem[:, qs], self.kv_loc[0][:, ks], self.kv_loc[1][:, ks],
                           scale=scale, mask=op.mask)
            elif op.kind == "merge":
                merge_(self.out_acc[:, qs], self.lse_acc[:, :, qs], self.part_out[:, qs],
                       self.part_lse[:, :, qs])
            elif op.kind == "bwd_own":
                kv, dkv = ((self.kv_rem, self.dkv_rem) if op.remote
                           else (self.kv_loc, self.dkv_acc))
                be.backward_into(self.dout_loc[:, qs], self.q_loc[:, qs], kv[0][:, ks],
                                 kv[1][:, ks], self.out_loc[:, qs], self.lse_loc[:, :, qs],
                                 self.dq_acc[:, qs], dkv[0][:, ks], dkv[1][:, ks],
                                 scale=scale, mask=op.mask)
            elif op.kind == "bwd_help":
                be.backward_into(self.dout_rem[:, qs], self.q_rem[:, qs],
                                 self.kv_loc[0][:, ks], self.kv_loc[1][:, ks],
                                 self.out_rem[:, qs], self.lse_rem[:, :, qs],
                                 self.dq_ret[:, qs], self.dkv_acc[0][:, ks],
                                 self.dkv_acc[1][:, ks], scale=scale, mask=op.mask)
            elif op.kind == "add_dq":
                self.dq_acc[:, qs].add_(self.dq_in[:, qs])
            elif op.kind == "add_dkv":
                self.dkv_acc[:, :, ks].add_(self.dkv_in[:, :, ks])
            else:
                raise ValueError(f"unknown op {op.kind!r}")


class Timer:
    """Measures tuples of ops on per-shape workspaces, each distinct tuple once."""

    def __init__(self, args, device: torch.device):
        self.args, self.device = args, device
        self.workspaces: dict = {}
        self.cache: dict = {}

    def workspace(self, shape: common.Shape) -> Workspace:
        if shape not in self.workspaces:
            self.workspaces.clear()          # one shape at a time keeps memory bounded
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.workspaces[shape] = Workspace(shape, self.device, self.args.backend)
        return self.workspaces[shape]

    def _time(self, fn) -> float:
        a = self.args
        return common.time_ms(fn, self.device, a.warmup, a.iters, a.budget_s)

    def ops_ms(self, shape: common.Shape, ops: tuple) -> float:
        """Time of one tuple of ops (0 for none), cached per (shape, ops)."""
        if not ops:
            return 0.0
        key = (shape, ops)
        if key not in self.cache:
            ws = self.workspace(shape)
            self.cache[key] = self._time(lambda: ws.run(ops))
        return self.cache[key]

    def program_ms(self, shape: common.Shape, program: list[Window]) -> float:
        """Time of a rank's whole work list, issued back to back as in a real run."""
        ws = self.workspace(shape)

        def run():
            for w in program:
                ws.run(w.compute)
                ws.run(w.absorb)
        return self._time(run)


def mono_ms(shape: common.Shape, device: torch.device, args) -> tuple[float, float]:
    """(forward ms, backward ms) of one causal attention over ``shape.tokens`` tokens with
    all heads, as one call of the backend on this device."""
    s = shape
    q = _randn((s.batch, s.tokens, s.hq, s.head_dim), s.dtype, device)
    k = _randn((s.batch, s.tokens, s.hkv, s.head_dim), s.dtype, device)
    v = _randn((s.batch, s.tokens, s.hkv, s.head_dim), s.dtype, device)
    dout = _randn(q.shape, s.dtype, device)
    be = get_backend(args.backend, q, k, v)
    scale, mask = s.head_dim ** -0.5, Mask.causal(0)
    out, lse = be.forward(q, k, v, scale=scale, mask=mask)
    fwd = common.time_ms(lambda: be.forward(q, k, v, scale=scale, mask=mask), device,
                         args.warmup, args.iters, args.budget_s)
    bwd = common.time_ms(lambda: be.backward(dout, q, k, v, out, lse, scale=scale, mask=mask),
                         device, args.warmup, args.iters, args.budget_s)
    return fwd, bwd


class Mono:
    """Monolithic-call times per sequence length. When a length does not fit in memory, the
    time is scaled quadratically from the longest length measured (marked "scaled")."""

    def __init__(self, args, device, batch, hq, hkv, head_dim, dtype):
        self.args, self.device = args, device
        self.dims = (batch, hq, hkv, head_dim, dtype)
        self.times: dict = {}

    def get(self, tokens: int) -> tuple[float, float, str]:
        if tokens not in self.times:
            b, hq, hkv, d, dt = self.dims
            try:
                f, bw = mono_ms(common.Shape(b, tokens, hq, hkv, d, dt), self.device, self.args)
                self.times[tokens] = (f, bw, "measured")
            except torch.OutOfMemoryError:
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                done = [t for t, v in self.times.items() if v[2] == "measured"]
                if not done:
                    raise
                t0 = max(done)
                f, bw, _ = self.times[t0]
                r = (tokens / t0) ** 2
                self.times[tokens] = (f * r, bw * r, "scaled")
        return self.times[tokens]


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------

EFF_COLUMNS = ["P", "schedule", "pass", "steps", "max/mean work", "rank0 ms",
               "rank0 kernel eff", "busiest rank", "busiest ms", "busiest kernel eff",
               "no-comm ms", "compute eff", "link", "predicted ms", "predicted eff"]
STEP_COLUMNS = ["P", "schedule", "pass", "step", "compute_ms", "absorb_ms", "comm_ms",
                "step_ms"]
SPLIT_COLUMNS = ["gpus", "ulysses", "ring", "schedule", "ring link", "a2a fwd ms",
                 "a2a bwd ms", "fwd ms", "fwd+bwd ms", "fwd it/s", "fwd+bwd it/s",
                 "no-comm fwd+bwd ms", "bound", "fwd eff", "fwd+bwd eff", "exposed comm ms"]


def _links(args) -> tuple[Link, Link]:
    nv = Link("nvlink", args.nvlink_gbps * 1e9, args.nvlink_latency_us * 1e-6)
    ib = Link("ib", args.ib_gbps * 1e9, args.ib_latency_us * 1e-6)
    return nv, ib


def efficiency_rows(args, device, timer: Timer, mono: Mono):
    """Rows of the per-rank efficiency table and of the per-step table."""
    nv, ib = _links(args)
    shape = common.Shape(args.batch, args.tokens_per_rank, args.hq, args.hkv, args.head_dim,
                         common.DTYPES[args.dtype])
    rows, step_rows = [], []
    for P in args.worlds:
        fwd_mono, bwd_mono, _ = mono.get(P * shape.tokens)
        link = nv if P <= args.gpus_per_node else ib
        for layout, schedule in common.CAUSAL_SCHEDULES:
            plan = common.make_plan(P, layout, schedule, shape.tokens)
            loads = work(plan)
            mean = sum(loads) / P
            busiest = max(range(P), key=lambda r: loads[r])
            name = common.label(layout, schedule)
            for pass_, bound_total in (("fwd", fwd_mono), ("bwd", bwd_mono)):
                t0 = time.perf_counter()
                returns = all_returns(plan, pass_)
                programs = [rank_program(plan, r, shape, pass_, returns) for r in range(P)]
                bound = bound_total / P
                r0_ms = timer.program_ms(shape, programs[0])
                b_ms = r0_ms if busiest == 0 else timer.program_ms(shape, programs[busiest])
                pred = predict(programs, lambda ops: timer.ops_ms(shape, ops), link)
                rows.append({
                    "P": P, "schedule": name, "pass": pass_, "steps": plan.steps,
                    "max/mean work": max(loads) / mean,
                    "rank0 ms": r0_ms, "rank0 kernel eff": bound * loads[0] / mean / r0_ms,
                    "busiest rank": busiest, "busiest ms": b_ms,
                    "busiest kernel eff": bound * loads[busiest] / mean / b_ms,
                    "no-comm ms": bound, "compute eff": bound / b_ms, "link": link.name,
                    "predicted ms": pred["ms"], "predicted eff": bound / pred["ms"]})
                for st in pred["steps"]:
                    step_rows.append({"P": P, "schedule": name, "pass": pass_, **st})
                print(f"  P={P:<3d} {name:<18s} {pass_}: busiest rank {busiest} "
                      f"{b_ms:9.3f} ms, bound {bound:9.3f} ms, compute eff "
                      f"{bound / b_ms:6.1%}, predicted eff {bound / pred['ms']:6.1%} "
                      f"({time.perf_counter() - t0:.1f}s)", flush=True)
    return rows, step_rows


def split_rows(args, device, timer: Timer, mono: Mono):
    """Predicted end-to-end rows for every Ulysses x ring split of each cluster size."""
    nv, ib = _links(args)
    dt = common.DTYPES[args.dtype]
    n = args.tokens_per_rank
    rows = []
    for gpus in args.clusters:
        fwd_mono, bwd_mono, source = mono.get(gpus * n)
        bound_f, bound_fb = fwd_mono / gpus, (fwd_mono + bwd_mono) / gpus
        link = nv if gpus <= args.gpus_per_node else ib
        per_rank = common.Shape(args.batch, n, args.hq, args.hkv, args.head_dim, dt)
        for U in common.ulysses_degrees(gpus, args.hq, args.hkv):
            R = gpus // U
            hq_r, hkv_r = common.ring_rank_heads(args.hq, args.hkv, U)
            ring_shape = common.Shape(args.batch, U * n, hq_r, hkv_r, args.head_dim, dt)
            a2a = {p: ulysses_ms(per_rank, U, p, args.gpus_per_node, nv, ib)
                   for p in ("fwd", "bwd")}
            for layout, schedule in common.CAUSAL_SCHEDULES:
                plan = common.make_plan(R, layout, schedule, ring_shape.tokens)
                res = {}
                for pass_ in ("fwd", "bwd"):
                    returns = all_returns(plan, pass_)
                    programs = [rank_program(plan, r, ring_shape, pass_, returns)
                                for r in range(R)]
                    res[pass_] = predict(programs, lambda ops: timer.ops_ms(ring_shape, ops),
                                         link)
                fwd = res["fwd"]["ms"] + a2a["fwd"]
                fb = fwd + res["bwd"]["ms"] + a2a["bwd"]
                compute = res["fwd"]["compute_ms"] + res["bwd"]["compute_ms"]
                rows.append({
                    "gpus": gpus, "ulysses": U, "ring": R,
                    "schedule": common.label(layout, schedule),
                    "ring link": link.name if R > 1 else "-",
                    "a2a fwd ms": a2a["fwd"], "a2a bwd ms": a2a["bwd"],
                    "fwd ms": fwd, "fwd+bwd ms": fb, "fwd it/s": 1e3 / fwd,
                    "fwd+bwd it/s": 1e3 / fb, "no-comm fwd+bwd ms": bound_fb,
                    "bound": source, "fwd eff": bound_f / fwd, "fwd+bwd eff": bound_fb / fb,
                    "exposed comm ms": fb - compute})
            print(f"  {gpus} GPUs: ulysses {U} x ring {R} done", flush=True)
    return rows


def plot(plt, eff_rows, split_rows_, clusters):
    """Efficiency vs P (measured compute-only and predicted) and predicted fwd+bwd it/s per
    split: the figure (``common.save_plot`` draws with it)."""
    names = [common.label(*s) for s in common.CAUSAL_SCHEDULES]
    fig, axes = plt.subplots(1, 2 + len(clusters), figsize=(6 * (2 + len(clusters)), 4.5))
    for ax, pass_ in zip(axes[:2], ("fwd", "bwd")):
        for name in names:
            rs = [r for r in eff_rows if r["schedule"] == name and r["pass"] == pass_]
            Ps = [r["P"] for r in rs]
            line, = ax.plot(Ps, [r["compute eff"] for r in rs], "o-", label=f"{name} compute")
            ax.plot(Ps, [r["predicted eff"] for r in rs], "x--", color=line.get_color(),
                    label=f"{name} predicted")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("P (ranks)")
        ax.set_ylabel("fraction of no-comm bound")
        ax.set_title(f"{pass_}: busiest rank vs no-comm bound")
        top = max([1.1] + [r[c] * 1.05 for r in eff_rows if r["pass"] == pass_
                           for c in ("compute eff", "predicted eff")])
        ax.set_ylim(0, top)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    for ax, gpus in zip(axes[2:], clusters):
        rs = [r for r in split_rows_ if r["gpus"] == gpus]
        splits = sorted({(r["ulysses"], r["ring"]) for r in rs})
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            vals = [next(r["fwd+bwd it/s"] for r in rs if r["schedule"] == name
                         and (r["ulysses"], r["ring"]) == sp) for sp in splits]
            ax.bar([j + i * width for j in range(len(splits))], vals, width, label=name)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(splits))])
        ax.set_xticklabels([f"U{u}xR{r}" for u, r in splits], fontsize=8)
        ax.set_ylabel("predicted fwd+bwd it/s")
        ax.set_title(f"{gpus} GPUs (model)")
        ax.grid(alpha=0.3, axis="y")
    axes[2].legend(fontsize=7)
    return fig


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens-per-rank", type=int, default=8192)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--hq", type=int, default=32, help="query heads")
    p.add_argument("--hkv", type=int, default=8, help="key/value heads")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=sorted(common.DTYPES), default="bf16")
    p.add_argument("--backend", default="auto", help="auto | cuda | torch | reference")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--worlds", type=common.ints, default=[2, 4, 8, 16, 32],
                   help="ring sizes P of the single-GPU view (comma-separated)")
    p.add_argument("--clusters", type=common.ints, default=[8, 64],
                   help="GPU counts whose Ulysses x ring splits are predicted")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--nvlink-gbps", type=float, default=450.0,
                   help="NVLink bandwidth per GPU and direction, GB/s")
    p.add_argument("--nvlink-latency-us", type=float, default=10.0)
    p.add_argument("--ib-gbps", type=float, default=50.0,
                   help="InfiniBand bandwidth per GPU and direction, GB/s")
    p.add_argument("--ib-latency-us", type=float, default=20.0)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=3.0,
                   help="fewer timed repeats (at least one) when they would exceed this")
    p.add_argument("--out", default=common.DEFAULT_OUT, help="output directory")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes on CPU: checks that everything runs; numbers meaningless")
    args = p.parse_args(argv)
    if args.smoke:
        args.device = args.device or "cpu"
        args.tokens_per_rank, args.head_dim, args.hq, args.hkv = 16, 16, 4, 2
        args.dtype, args.warmup, args.iters = "fp32", 1, 2
        if args.worlds == [2, 4, 8, 16, 32]:
            args.worlds = [2, 4, 8]
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.tokens_per_rank % 2:
        p.error("--tokens-per-rank must be even (zigzag and the helper schedule cut each "
                "rank's tokens in two chunks)")
    if args.hq % args.hkv:
        p.error("--hq must be a multiple of --hkv")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.smoke:
        torch.set_num_threads(1)   # tiny kernels: thread wake-ups would dominate the timings
    torch.manual_seed(0)
    dt = common.DTYPES[args.dtype]
    probe = torch.empty(1, 2, args.hq, args.head_dim, dtype=dt, device=device)
    kprobe = torch.empty(1, 2, args.hkv, args.head_dim, dtype=dt, device=device)
    backend_name = get_backend(args.backend, probe, kprobe, kprobe).name
    header = [
        f"device: {common.device_name(device)}; backend: {backend_name}; dtype: {args.dtype}",
        f"per rank: batch {args.batch}, {args.tokens_per_rank} tokens, Hq {args.hq}, "
        f"Hkv {args.hkv}, head_dim {args.head_dim}",
        f"links: NVLink {args.nvlink_gbps:g} GB/s + {args.nvlink_latency_us:g} us, "
        f"InfiniBand {args.ib_gbps:g} GB/s + {args.ib_latency_us:g} us, "
        f"{args.gpus_per_node} GPUs/node",
    ]
    if device.type == "cpu":
        header.append("CPU run (smoke test): these numbers say nothing about GPU performance.")
    print("\n".join(header), flush=True)
    t_start = time.perf_counter()
    timer = Timer(args, device)
    mono = Mono(args, device, args.batch, args.hq, args.hkv, args.head_dim, dt)
    print("single-GPU view:", flush=True)
    eff, steps = efficiency_rows(args, device, timer, mono)
    print("Ulysses x ring splits (model):", flush=True)
    splits = split_rows(args, device, timer, mono)

    os.makedirs(args.out, exist_ok=True)
    intro = "\n".join(f"- {h}" for h in header)
    eff_md = (f"# Schedule efficiency (single-GPU view)\n\n{intro}\n\n"
              + common.markdown_table(EFF_COLUMNS, eff) + "\n")
    split_md = (f"# Predicted throughput per Ulysses x ring split (communication model)\n\n"
                f"{intro}\n\n" + common.markdown_table(SPLIT_COLUMNS, splits) + "\n")
    with open(os.path.join(args.out, "schedule_efficiency.md"), "w") as f:
        f.write(eff_md)
    with open(os.path.join(args.out, "schedule_splits.md"), "w") as f:
        f.write(split_md)
    common.write_csv(os.path.join(args.out, "schedule_efficiency.csv"), EFF_COLUMNS, eff)
    common.write_csv(os.path.join(args.out, "schedule_steps.csv"), STEP_COLUMNS, steps)
    common.write_csv(os.path.join(args.out, "schedule_splits.csv"), SPLIT_COLUMNS, splits)
    print()
    print(eff_md)
    print(split_md)
    print(common.save_plot(os.path.join(args.out, "schedule.png"),
                           lambda plt: plot(plt, eff, splits, args.clusters), args.no_plot))
    print(f"tables written to {args.out} ({time.perf_counter() - t_start:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
