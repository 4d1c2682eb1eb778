"""Host cost of distattn on CPU: plan building, per-step and per-call Python, aten ops per ring
step outside the attention kernel, and peak live tensor bytes per rank (issue 20).

Sections (all in one run, one table each; ``--out DIR`` also writes host_*.csv):

- ``plan``: a packed row of D documents over P ring ranks: time to build the layout, the
  plan's reach (steps + payloads), rank 0's masks, and the cached lookup a repeated call pays
  (``check_cu_seqlens`` + ``ring_layout`` + ``attention._plan``). ``reach before`` is the
  pairwise algorithm this issue replaced (kept in tests/test_plan_reach.py as the oracle).
- ``step``: ``ring_forward`` / ``ring_backward`` of rank 0 of a P-rank zigzag causal plan in one
  process, communication stubbed (the exchange posts nothing), on tiny tensors. ``python us``
  runs a backend whose block calls do nothing (distattn's own Python per step); ``torch us``
  the torch backend. Per step = (time(P) - time(P=2 plan)) / (steps(P) - 2), so the per-call
  part cancels; per call: the whole call of the P=2 plan (2 steps). Medians of repeats on a
  shared CPU: expect +-30% noise.
- ``ops``: ops dispatched per ring step (TorchDispatchMode), same differencing (P=8 vs P=2).
  In the step table, all aten ops and those outside the attention kernel (views included, as
  before). The ops table splits them by kind (``op_kind``): launches outside the attention
  kernel (ops that run a device kernel), attention launches, and views / metadata /
  allocations (no kernel). Its rows: CPU tensors (torch backend, and the null backend:
  distattn's own), and FAKE CUDA tensors (FakeTensorMode, tests/fake_cuda.py) for the null,
  torch and cuda backends -- what a GPU would launch per step, where the cuda backend's
  kernels are the distattn:: custom ops. On CUDA every call takes the non-finite path
  (nonfinite.py: flags cannot be read on the host), so its launches are included there.
- ``memory``: S tokens over ``--mem-ranks`` gloo processes vs one process, forward+backward:
  peak live bytes of tensors allocated during the call (a dispatch mode tracks storages),
  plus the caller's q/k/v/dout, in MiB and over the local q/k/v/out bytes. Split by owner:
  ``caller`` = q/k/v/dout + those of out, q.grad, k.grad, v.grad that were live at the peak
  (the gradient accumulators become the caller's gradients); ``distattn`` = the rest of the
  peak (saved head-sharded copies, travel buffers, partial sums, backend temporaries).

    python bench/host.py                      # everything (minutes on 2 cores)
    python bench/host.py --smoke --out /tmp/h # small, for tests/test_bench_smoke.py
    python bench/host.py --distattn /path/to/old/checkout   # "before" numbers of a revision
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time
import weakref
from types import SimpleNamespace

_ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
_ap.add_argument("--smoke", action="store_true", help="small sizes, seconds")
_ap.add_argument("--out", default=None, help="directory for host_*.csv")
_ap.add_argument("--distattn", default=None, help="import distattn from this checkout")
_ap.add_argument("--sections", default="plan,step,ops,memory")
_ap.add_argument("--stat", choices=("median", "min"), default="median",
                 help="per-call time of the step section: median or minimum of the repeats "
                      "(min is steadier on a loaded machine)")
_ap.add_argument("--repeats", type=int, default=None, help="step section repeats (7)")
_ap.add_argument("--mem-seq", type=int, default=8192)
_ap.add_argument("--mem-ranks", type=int, default=4)
ARGS = _ap.parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.distattn:   # ahead of this checkout (common then adds nothing)
    sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.path.insert(0, os.path.abspath(ARGS.distattn))

sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (also puts the repository root on sys.path)

import random  # noqa: E402
import statistics  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

import distattn  # noqa: E402
import distattn.ring as ring  # noqa: E402
from distattn import attention  # noqa: E402
from distattn.documents import check_cu_seqlens  # noqa: E402
from distattn.kernels import TorchBackend  # noqa: E402
from distattn.kernels.base import BlockAttention  # noqa: E402
from distattn.layout import ring_layout  # noqa: E402
from distattn.plan import _reach, ring_plan  # noqa: E402
from distattn.segments import attention_bounds  # noqa: E402

_TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")


STAT = statistics.median   # the step section's statistic (--stat)


def _median_s(fn, repeats: int, stat=statistics.median) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return stat(times)


def _documents(n: int, seed: int = 0) -> list:
    """n documents of 64..4096 tokens (a packed pretraining row)."""
    rng = random.Random(seed)
    cu = [0]
    for _ in range(n):
        cu.append(cu[-1] + rng.randint(64, 4096))
    return cu


# -- plan ---------------------------------------------------------------------------------------
def bench_plan(Ps, Ds, old_limit: int):
    sys.path.insert(0, _TESTS)
    try:
        from test_plan_reach import pairwise_reach
    except ImportError:
        pairwise_reach = None
    rows = []
    bounds = attention_bounds(True, None)
    for P in Ps:
        for D in Ds:
            cu = _documents(D, seed=P)
            t = time.perf_counter()
            lay = ring_layout("packed", cu[-1], P, 1, cu)
            t_lay = time.perf_counter() - t
            t_reach = _median_s(lambda: _reach(lay, bounds), 1)
            segs = sum(map(len, lay.parts))
            t_old = None
            if pairwise_reach is not None and segs * P <= old_limit:
                t_old = _median_s(lambda: pairwise_reach(lay, bounds), 1)
            t = time.perf_counter()
            plan = ring_plan(lay, True)
            plan.masks(0)
            t_masks = time.perf_counter() - t - t_reach
            attention._plan(lay, True, None, "ring")
            cu_list = list(cu)

            def lookup():
                for _ in range(20):
                    c = check_cu_seqlens(cu_list)
                    attention._plan(ring_layout("packed", c[-1], P, 1, c), True, None, "ring")
            t_hit = _median_s(lookup, 3) / 20
            rows.append({"P": P, "documents": D, "segments": segs, "steps": plan.steps,
                         "layout ms": 1e3 * t_lay, "reach ms": 1e3 * t_reach,
                         "reach before ms": "" if t_old is None else 1e3 * t_old,
                         "rank-0 masks ms": 1e3 * max(t_masks, 0.0),
                         "cached call us": 1e6 * t_hit})
    return rows


# -- step / ops -------------------------------------------------------------------------------
class _NoComm:
    """RingExchange stand-in: posts nothing (the travel buffers keep what they hold)."""

    def __init__(self, mesh):
        pass

    def start(self, send, recv, hops=1):
        return []

    def wait(self, handle, what=""):
        pass

    def all_sum(self, t, what=""):
        pass


class _ZeroPayloads(ring._Payloads):
    """Travel buffers that start finite (0), as received K/V would be: with nothing sent,
    uninitialised memory could hold NaN and send the next call down the non-finite path."""

    def __init__(self, *args):      # buffers made up front (revisions before 729ac38)
        super().__init__(*args)
        for buf in self.bufs:
            if buf is not None:
                buf.zero_()

    def _buf(self, i):              # buffers made when first used
        fresh = self.bufs[i] is None
        buf = super()._buf(i)
        if fresh:                   # the stub's own work: not counted as distattn's launches
            with _disable_current_modes():
                buf.zero_()
        return buf


class _NullBackend(BlockAttention):
    """Block calls that do nothing: what is left is distattn's own work per step."""
    name = "null"

    def forward_into(self, *a, **kw):
        pass

    def backward_into(self, *a, **kw):
        pass


def _cfg(P: int, backend):
    lay = ring_layout("zigzag", 16 * P, P, 1)
    plan = attention._plan(lay, True, None, "ring")
    mesh = SimpleNamespace(ring_rank=0, ring_degree=P, ulysses_degree=1)
    return ring.RingConfig(mesh, plan, backend, 0.35), lay.part_len


def _tensors(n: int, heads=(2, 2), dim: int = 16, dtype=torch.float32, device="cpu"):
    """q, k, v, dout; on "cuda" (fake tensors: their values are never read) no generator."""
    hq, hkv = heads
    if device != "cpu":
        return tuple(torch.randn(1, n, h, dim, device=device, dtype=dtype)
                     for h in (hq, hkv, hkv, hq))
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, n, h, dim, generator=g, dtype=dtype) for h in (hq, hkv, hkv, hq))


def _one_call(P: int, backend, **shape):
    """fn(pass) running rank 0's forward or backward of a P-rank plan (``shape``: heads,
    dim, dtype, device of the tensors, see ``_tensors``)."""
    cfg, n = _cfg(P, backend)
    q, k, v, dout = _tensors(n, **shape)
    out, lse = ring.ring_forward(q, k, v, _cfg(P, TorchBackend())[0])

    def run(which):
        if which == "fwd":
            ring.ring_forward(q, k, v, cfg)
        else:
            ring.ring_backward(dout, q, k, v, out, lse, cfg)
    return run, cfg.plan.steps


# What counts as what (``op_kind``): a *launch* is an op that runs a device kernel; views and
# metadata ops (``OpOverload.is_view``: view, slice, select, transpose, alias, unbind,
# as_strided, ...), metadata queries (prim.device) and bare allocations (empty*) launch
# nothing. ``zeros``/``full`` count as
# one launch (a fill), ``_local_scalar_dense`` as one (a device-to-host copy). The attention
# kernels (PyTorch's flash/cuDNN ops, this project's distattn::fwd/fwd_acc/bwd) are counted
# apart; distattn::merge is a launch outside them.
ATTENTION_OPS = ("flash_attention", "scaled_dot_product", "cudnn_attention", "distattn.fwd",
                 "distattn.bwd")
_aten = torch.ops.aten
ALLOCATIONS = frozenset((_aten.empty.memory_format, _aten.empty_like.default,
                         _aten.empty_strided.default, _aten.new_empty.default,
                         _aten.new_empty_strided.default))


def op_kind(func) -> str:
    """"attention", "launch" or "view" (see the rule above)."""
    name = str(func)
    if any(k in name for k in ATTENTION_OPS):
        return "attention"
    if func in ALLOCATIONS or getattr(func, "is_view", False) or name.startswith("prim."):
        return "view"
    return "launch"


class CountOps(TorchDispatchMode):
    """Ops dispatched while active, by ``op_kind``; ``launches`` names the launches. With
    ``device`` (a device type), a launch must touch a tensor on that device: an op on host
    tensors only (a wrapped Python scalar, ``scalar_tensor``) launches nothing there."""

    def __init__(self, device=None):
        super().__init__()
        self.device = device
        self.kinds = {"attention": 0, "launch": 0, "view": 0}
        self.launches = collections.Counter()

    @property
    def total(self) -> int:
        return sum(self.kinds.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        kind = op_kind(func)
        if kind == "launch" and self.device is not None and not any(
                isinstance(t, torch.Tensor) and t.device.type == self.device
                for t in tree_leaves((args, kwargs, out))):
            kind = "view"
        self.kinds[kind] += 1
        if kind == "launch":
            self.launches[str(func)] += 1
        return out


def _counts(run, which, device=None) -> CountOps:
    with CountOps(device) as c:
        run(which)
    return c


def _ops(run, which):
    c = _counts(run, which)
    return c.total, c.total - c.kinds["attention"]


def _cuda_backend():
    """The cuda backend as if distattn._C were built for a GPU here: on fake CUDA tensors its
    launches go to the distattn:: custom ops' fake implementations (kernels/ops.py)."""
    from distattn.kernels.cuda import CudaBackend
    return CudaBackend()


# (device, backend, heads (Hq, Hkv), head dim, dtype): the rows of the ops table. "fake cuda"
# traces the CUDA host path on FakeTensorMode tensors (tests/fake_cuda.py): what a GPU would
# launch, per backend (torch: PyTorch's varlen flash op; cuda: this project's kernels).
# "fake cuda, finite call" runs the same with the call's finite check forced to "finite" (the
# path a CPU call with finite inputs takes; on CUDA calls never take it today): the backend's
# own launches per step on a GPU, without the non-finite path's.
OPS_RUNS = (("cpu", "null", (2, 2), 16, torch.float32),
            ("cpu", "torch", (2, 2), 16, torch.float32),
            ("cpu", "torch", (4, 2), 16, torch.float32),
            ("fake cuda", "null", (4, 2), 64, torch.bfloat16),
            ("fake cuda", "torch", (4, 2), 64, torch.bfloat16),
            ("fake cuda", "cuda", (4, 2), 64, torch.bfloat16),
            ("fake cuda, finite call", "null", (4, 2), 64, torch.bfloat16),
            ("fake cuda, finite call", "torch", (4, 2), 64, torch.bfloat16),
            ("fake cuda, finite call", "cuda", (4, 2), 64, torch.bfloat16))


def _backend(name):
    return {"null": _NullBackend, "torch": TorchBackend, "cuda": _cuda_backend}[name]()


def step_counts(which: str, device: str, backend: str, heads, dim, dtype, P: int = 4):
    """Per ring step of rank 0 (zigzag causal, communication stubbed): the CountOps
    difference between a P-rank and a 2-rank plan over the step difference, as
    {"attention", "launch", "view"} -> ops/step plus "names" -> launches/step by op.
    Deterministic (no timer)."""
    import contextlib
    real, real_payloads = ring.RingExchange, ring._Payloads
    real_checks = ring.host_readable, ring._nonfinite_call
    ring.RingExchange, ring._Payloads = _NoComm, _ZeroPayloads
    if device.endswith("finite call"):
        ring.host_readable, ring._nonfinite_call = (lambda t: True), (lambda *a: False)
    if device.startswith("fake cuda"):
        sys.path.insert(0, _TESTS)
        from fake_cuda import fake_cuda
        mode = fake_cuda()
    else:
        mode = contextlib.nullcontext()
    shape = dict(heads=heads, dim=dim, dtype=dtype, device="cuda" if device != "cpu" else "cpu")
    # The launch arrays a real GPU run builds once per plan and caches (device_cache) are
    # rebuilt on every call while a dispatch mode is active; for counting, let the caches
    # work under the fake mode (fake CUDA entries only, cleared afterwards).
    caching = _cache_under_modes() if device != "cpu" else contextlib.nullcontext()
    try:
        with mode, caching:
            got = []
            for p in (2, P):
                run, steps = _one_call(p, _backend(backend), **shape)
                run(which)                           # warm caches (plans, launch arrays)
                got.append((steps, _counts(run, which, shape["device"])))
    finally:
        ring.RingExchange, ring._Payloads = real, real_payloads
        ring.host_readable, ring._nonfinite_call = real_checks
    (s2, c2), (sp, cp) = got
    per = {k: (cp.kinds[k] - c2.kinds[k]) / (sp - s2) for k in cp.kinds}
    per["names"] = {n: (cp.launches[n] - c2.launches[n]) / (sp - s2)
                    for n in cp.launches if cp.launches[n] != c2.launches[n]}
    return per


@__import__("contextlib").contextmanager
def _cache_under_modes():
    """nonfinite._pieces, varlen.launch_tensors (and torch_sdpa._no_rng_state) cached while the fake mode is on (their own
    device_cache bypasses itself then): a fresh lru_cache of each, dropped afterwards."""
    import functools
    from distattn import nonfinite
    from distattn.kernels import torch_sdpa, varlen
    places = [(nonfinite, "_pieces"), (varlen, "launch_tensors"),
              (torch_sdpa, "_no_rng_state")]
    places = [(m, n, getattr(m, n)) for m, n in places if hasattr(m, n)]
    for m, n, f in places:
        setattr(m, n, functools.lru_cache(None)(getattr(f, "uncached", f)))
    try:
        yield
    finally:
        for m, n, f in places:
            setattr(m, n, f)


def bench_ops(P: int):
    rows = []
    for which in ("fwd", "bwd"):
        for device, backend, heads, dim, dtype in OPS_RUNS:
            per = step_counts(which, device, backend, heads, dim, dtype, P)
            rows.append({"pass": which, "device": device, "backend": backend,
                         "Hq/Hkv": f"{heads[0]}/{heads[1]}", "D": dim,
                         "dtype": str(dtype).replace("torch.", ""),
                         "launches/step outside attention": per["launch"],
                         "attention launches/step": per["attention"],
                         "views, metadata, allocs/step": per["view"],
                         "launched ops": " ".join(f"{n.replace('aten.', '')}x{c:g}"
                                                  for n, c in sorted(per["names"].items()))})
    return rows


def bench_step(Ps, repeats: int, count_ops: bool):
    real, real_payloads = ring.RingExchange, ring._Payloads
    ring.RingExchange = _NoComm
    ring._Payloads = _ZeroPayloads
    rows = []
    try:
        for which in ("fwd", "bwd"):
            base = {}
            for name, backend in (("python", _NullBackend()), ("torch", TorchBackend())):
                run, steps = _one_call(2, backend)
                base[name] = (_median_s(lambda: run(which), repeats, STAT), steps,
                              _ops(run, which) if count_ops else (0, 0))
            for P in Ps:
                row = {"pass": which, "P": P}
                for name, backend in (("python", _NullBackend()), ("torch", TorchBackend())):
                    run, steps = _one_call(P, backend)
                    t = _median_s(lambda: run(which), repeats, STAT)
                    t2, s2, ops2 = base[name]
                    per_step = (t - t2) / (steps - s2) if steps > s2 else float("nan")
                    row[f"{name} us/step"] = 1e6 * per_step
                    if P == Ps[0]:
                        row[f"{name} us/call, P=2"] = 1e6 * t2   # whole call, 2 steps
                    if count_ops and name == "torch" and steps > s2:
                        total, outside = _ops(run, which)
                        row["aten ops/step"] = (total - ops2[0]) / (steps - s2)
                        row["outside kernel/step"] = (outside - ops2[1]) / (steps - s2)
                    if count_ops and name == "python" and steps > s2:
                        total, _ = _ops(run, which)
                        row["distattn ops/step"] = (total - ops2[0]) / (steps - s2)
                rows.append(row)
    finally:
        ring.RingExchange, ring._Payloads = real, real_payloads
    return rows


# -- memory -----------------------------------------------------------------------------------
class LiveBytes(TorchDispatchMode):
    """Peak bytes of the storages that tensors created inside the mode keep alive (a storage
    counts while any tracked tensor on it lives; storages of tensors from outside are not
    counted). Byte counts, not timers: deterministic for a given program.

    ``owned_at_peak(tensors)``: how many of the peak's bytes were the storages these tensors
    have now (still the same storage: alive from the peak to now), e.g. the caller's out and
    gradients; the rest of the peak is the callee's working set. Allocations inside one op
    (a kernel's own scratch) are not seen, only the tensors ops return."""

    def __init__(self, outside=()):
        super().__init__()
        self.outside = {t.untyped_storage().data_ptr() for t in outside}
        self.refs, self.size, self.gen, self.live, self.peak = {}, {}, {}, 0, 0
        self.at_peak, self._made = {}, 0

    def _drop(self, key):
        self.refs[key] -= 1
        if not self.refs[key]:
            self.live -= self.size.pop(key)
            del self.refs[key], self.gen[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                st = t.untyped_storage()
                key = st.data_ptr()
                if not key or key in self.outside:
                    continue
                if key not in self.refs:
                    self._made += 1
                    self.refs[key], self.size[key], self.gen[key] = 0, st.nbytes(), self._made
                    self.live += st.nbytes()
                self.refs[key] += 1
                weakref.finalize(t, self._drop, key)
        if self.live > self.peak:
            self.peak = self.live
            self.at_peak = {key: (self.gen[key], self.size[key]) for key in self.size}
        return out

    def owned_at_peak(self, tensors) -> int:
        seen, total = set(), 0
        for t in tensors:
            if t is None:
                continue
            key = t.untyped_storage().data_ptr()
            if key in seen or key not in self.at_peak:
                continue
            seen.add(key)
            gen, size = self.at_peak[key]
            if self.gen.get(key) == gen:
                total += size
        return total


def _mem_inputs(S: int, rank: int, world: int):
    g = torch.Generator().manual_seed(0)
    full = [torch.randn(1, S, 8, 64, generator=g) for _ in range(4)]   # q k v dout, fp32
    if world == 1:
        return full
    return [distattn.shard(t, None, dim=1, layout="zigzag").contiguous() for t in full]


def _mem_one(S: int, rank: int, world: int, ulysses: int) -> dict:
    mesh = distattn.SPMesh.build(ulysses_degree=ulysses, ring_degree=world // ulysses) \
        if world > 1 else None
    q, k, v, dout = _mem_inputs(S, rank, world)
    for t in (q, k, v):
        t.requires_grad_(True)
    kw = dict(mesh=mesh, causal=True, layout="zigzag", backend="torch")
    if world == 1:
        kw.pop("mesh")
        kw["layout"] = "contiguous"
    call = (lambda: distattn.dist_flash_attn(q, k, v, **kw)) if world > 1 else \
        (lambda: _single(q, k, v))
    call().backward(dout)                                   # warm-up
    for t in (q, k, v):
        t.grad = None
    with LiveBytes(outside=(q, k, v, dout)) as m:
        out = call()
        out.backward(dout)
        peak = m.peak
    mib = lambda x: x / 2**20
    local = 4 * q.numel() * q.element_size()                # q, k, v, out
    inputs = 4 * q.numel() * q.element_size()               # q, k, v, dout
    results = m.owned_at_peak((out, q.grad, k.grad, v.grad))  # the caller's, live at the peak
    work = peak - results
    return {"peak MiB": mib(peak + inputs), "caller MiB": mib(inputs + results),
            "distattn MiB": mib(work), "local qkvo MiB": mib(local),
            "peak / local qkvo": (peak + inputs) / local, "distattn / local qkvo": work / local}


def _single(q, k, v):
    """One process: the torch backend on the whole sequence (its block forward and backward,
    the same kernels the ring steps run)."""
    from distattn.kernels.mask import Mask

    class One(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            out, lse = TorchBackend().forward(q, k, v, scale=0.125, mask=Mask.causal(0))
            ctx.save_for_backward(q, k, v, out, lse)
            return out

        @staticmethod
        def backward(ctx, dout):
            q, k, v, out, lse = ctx.saved_tensors
            return tuple(g.to(q.dtype) for g in TorchBackend().backward(
                dout, q, k, v, out, lse, scale=0.125, mask=Mask.causal(0)))
    return One.apply(q, k, v)


def _mem_worker(rank, world, ulysses, S, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        queue.put((rank, _mem_one(S, rank, world, ulysses)))
    finally:
        dist.destroy_process_group()


def bench_memory(S: int, world: int):
    import socket
    rows = []
    single = _mem_one(S, 0, 1, 1)
    rows.append({"run": f"1 process, S={S}", **single})
    for ulysses in (1, 2):
        if world % ulysses:
            continue
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ctx = common.process_context()
        queue = ctx.Queue()
        procs = [ctx.Process(target=_mem_worker, args=(r, world, ulysses, S, port, queue))
                 for r in range(world)]
        for p in procs:
            p.start()
        got = dict(queue.get(timeout=600) for _ in procs)
        for p in procs:
            p.join(timeout=60)
        worst = max(got.values(), key=lambda r: r["peak MiB"])
        rows.append({"run": f"{world} ranks ({world // ulysses} ring x {ulysses} ulysses), "
                            f"busiest rank", **worst})
    return rows


def _print(title, rows):
    if not rows:
        return
    cols = list(rows[0])
    for r in rows:
        cols += [c for c in r if c not in cols]
    print(f"\n## {title}\n")
    print(common.markdown_table(cols, rows))
    return cols


def main(args):
    sections = set(args.sections.split(","))
    smoke = args.smoke
    results = {}
    print(f"host cost, torch {torch.__version__}, {os.cpu_count()} CPUs, distattn from "
          f"{os.path.dirname(os.path.dirname(os.path.abspath(distattn.__file__)))}")
    if "plan" in sections:
        results["plan"] = bench_plan((2, 8) if smoke else (2, 4, 8, 16, 32, 64),
                                     (10, 100) if smoke else (10, 100, 1000, 10000),
                                     old_limit=2000 if smoke else 2_000_000)
    if "step" in sections or "ops" in sections:
        global STAT
        STAT = min if args.stat == "min" else statistics.median
        repeats = args.repeats or (3 if smoke else 7)
        results["step"] = bench_step((4, 8) if smoke else (4, 8, 16, 32, 64),
                                     repeats=repeats, count_ops="ops" in sections)
    if "ops" in sections:
        results["ops"] = bench_ops(4 if smoke else 8)
    if "memory" in sections:
        results["memory"] = bench_memory(1024 if smoke else args.mem_seq, args.mem_ranks)
    for name, rows in results.items():
        cols = _print(name, rows)
        if args.out and rows:
            os.makedirs(args.out, exist_ok=True)
            common.write_csv(os.path.join(args.out, f"host_{name}.csv"), cols, rows)


if __name__ == "__main__":
    main(ARGS)
