"""Fault scenarios on a real gloo group, and a harness that records how every rank ends.

``spawn.run_world`` stops at the first failing rank; here failures are the point, so
``run_ranks`` lets every process run to its end (or death), and each rank writes its outcome
per scenario to a file as soon as the scenario ends: an ``os._exit`` loses nothing written
before it. Scenarios run one after another in one world (spawning costs seconds); each has
its own mesh, built up front, since a failed collective leaves its groups unusable. A barrier
on a separate file store, with a long timeout, starts every scenario on all ranks together.
"""
from __future__ import annotations

import datetime
import json
import os
import tempfile
import time
import traceback

import torch

from spawn import process_context

# The mesh timeout of the scenarios: short, but long enough for a healthy call on a busy
# 2-core machine.
TIMEOUT_S = 4.0
LAST_RANK = 3   # the rank that disagrees, skips or dies


def _worker(rank: int, world: int, tmp: str, env: dict, scenarios: list) -> None:
    import torch.distributed as dist

    os.environ.clear()
    os.environ.update(env)    # the caller's, as at the call (the fork server's is older)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    store = dist.FileStore(f"{tmp}/barrier", world)
    store.set_timeout(datetime.timedelta(seconds=90))
    results = {"pid": os.getpid()}
    ctx = ScenarioContext(rank, world, store)
    meshes = {name: ctx.build_mesh() for name in scenarios}   # every group made in step
    for name in scenarios:
        ctx.barrier(name)
        start = time.monotonic()
        try:
            value = SCENARIOS[name](ctx, meshes[name])
            results[name] = {"kind": "ok", "value": value}
        except Exception as exc:  # the test asserts on the type and the message
            results[name] = {"kind": type(exc).__name__, "message": str(exc),
                             "is_runtime": isinstance(exc, RuntimeError),
                             "trace": traceback.format_exc(limit=3)}
        results[name]["seconds"] = time.monotonic() - start
        _write(tmp, rank, results)


def _write(tmp: str, rank: int, results: dict) -> None:
    part = f"{tmp}/rank{rank}.json.part"
    with open(part, "w") as f:
        json.dump(results, f)
    os.replace(part, f"{tmp}/rank{rank}.json")


def run_ranks(world: int, scenarios: list, deadline_s: float) -> list:
    """Run ``scenarios`` (names in ``SCENARIOS``) on ``world`` gloo processes. Returns, per
    rank, {"exitcode", "killed" (still alive at the deadline), scenario name -> outcome}."""
    ctx = process_context()
    with tempfile.TemporaryDirectory(prefix="distattn_faults_") as tmp:
        procs = [ctx.Process(target=_worker, args=(r, world, tmp, dict(os.environ), scenarios))
                 for r in range(world)]
        for p in procs:
            p.start()
        end = time.monotonic() + deadline_s
        for p in procs:
            p.join(timeout=max(0.0, end - time.monotonic()))
        out = []
        for r, p in enumerate(procs):
            killed = p.is_alive()
            if killed:
                p.kill()
                p.join()
            path = f"{tmp}/rank{r}.json"
            res = json.load(open(path)) if os.path.exists(path) else {}
            res.update(exitcode=p.exitcode, killed=killed)
            out.append(res)
    return out


class ScenarioContext:
    """What a scenario needs besides its mesh: this rank, inputs, a store barrier."""

    def __init__(self, rank: int, world: int, store):
        self.rank, self.world, self.store = rank, world, store

    def build_mesh(self):
        import distattn
        return distattn.SPMesh.build(ulysses_degree=2,
                                     timeout=datetime.timedelta(seconds=TIMEOUT_S))

    def barrier(self, name: str) -> None:
        if self.store.add(f"arrived/{name}", 1) == self.world:
            self.store.set(f"go/{name}", "1")
        self.store.wait([f"go/{name}"])

    def qkv(self, seq_local: int = 4, requires_grad: bool = False):
        gen = torch.Generator().manual_seed(self.rank)
        q, k, v = (torch.randn(1, seq_local, 4, 8, generator=gen, dtype=torch.float64)
                   for _ in range(3))
        return [t.requires_grad_(requires_grad) for t in (q, k, v)]

    @property
    def odd(self) -> bool:
        return self.rank == LAST_RANK


class _CheckOff:
    """DISTATTN_CHECK=0 (agree on change only) for a with-block (read on every call)."""

    def __enter__(self):
        self.old = os.environ.get("DISTATTN_CHECK")
        os.environ["DISTATTN_CHECK"] = "0"

    def __exit__(self, *exc):
        if self.old is None:
            del os.environ["DISTATTN_CHECK"]
        else:
            os.environ["DISTATTN_CHECK"] = self.old


class _DieAt:
    """A profiler whose span kills the process at one step: a rank dying mid-call."""

    def __init__(self, pass_name: str, step: int):
        self.target, self.pass_name = (pass_name, step), "forward"

    def span(self, phase, step, device):
        import contextlib
        if phase == "compute" and (self.pass_name, step) == self.target:
            os._exit(17)
        return contextlib.nullcontext()


def _attn(mesh, q, k, v, **kw):
    import distattn
    return distattn.dist_flash_attn(q, k, v, mesh=mesh, layout="zigzag", **kw)


def causal(ctx, mesh):
    """Rank 3 passes causal=False: ValueError everywhere; then a good call on the same mesh
    must still work (the agreement left the ranks in step)."""
    q, k, v = ctx.qkv()
    try:
        _attn(mesh, q, k, v, causal=not ctx.odd)
    except ValueError as exc:
        _attn(mesh, q, k, v, causal=True)
        raise exc
    return "no error"


def local_error(ctx, mesh):
    """Only rank 3 passes a bad argument: every rank raises its error."""
    _attn(mesh, *ctx.qkv(), causal=True, softmax_scale=-1.0 if ctx.odd else None)
    return "no error"


def window(ctx, mesh):
    """Rank 3 passes another sliding window: the same local shapes and message sizes, a
    silently different result without the agreement."""
    _attn(mesh, *ctx.qkv(), causal=True, window=(2, 0) if ctx.odd else (3, 0))
    return "no error"


def backward_skipped(ctx, mesh):
    """Rank 3 runs without autograd: caught at the forward, not as a hang in the backward."""
    with torch.set_grad_enabled(not ctx.odd):
        out = _attn(mesh, *ctx.qkv(requires_grad=True), causal=True)
        if out.requires_grad:
            out.sum().backward()
    return "no error"


def length(ctx, mesh):
    """First call on the mesh, rank 3 holds 8 local tokens: a ValueError at once."""
    _attn(mesh, *ctx.qkv(8 if ctx.odd else 4), causal=True)
    return "no error"


def documents(ctx, mesh):
    """Rank 3 passes other document boundaries (of the same total length, so its local
    shapes agree): a ValueError naming cu_seqlens at once."""
    cu_seqlens = [0, 5, 16] if ctx.odd else [0, 16]
    _attn(mesh, *ctx.qkv(), causal=True, cu_seqlens=cu_seqlens)
    return "no error"


def _call(ctx, mesh, seq_local: int = 4, **kw):
    """Forward and backward of one causal call (a good one, unless the arguments differ)."""
    out = _attn(mesh, *ctx.qkv(seq_local, requires_grad=True), causal=True, **kw)
    out.sum().backward()


def length_steady(ctx, mesh):
    """After a good call, rank 3 alone changes to 8 local tokens: a ValueError at once on
    every rank (every call agrees)."""
    _call(ctx, mesh)
    _call(ctx, mesh, 8 if ctx.odd else 4)
    return "no error"


def length_steady_on_change(ctx, mesh):
    """DISTATTN_CHECK=0, after a good call: rank 3 alone changes to 8 local tokens. It
    waits in the agreement, the others in the attention's first exchange: a distattn error
    after the timeout, never a backend abort on a size mismatch."""
    with _CheckOff():
        return length_steady(ctx, mesh)


def skip(ctx, mesh):
    """After a good call: rank 3 skips the next one (and waits at the barrier). The others
    wait in the next call's agreement."""
    _call(ctx, mesh)
    if ctx.odd:
        return "skipped"
    _call(ctx, mesh)
    return "no error"


def skip_on_change(ctx, mesh):
    """DISTATTN_CHECK=0, after a good call: rank 3 skips the next one. The others wait in
    the attention's first exchange."""
    with _CheckOff():
        return skip(ctx, mesh)


def _global_qkv(seq: int = 16, heads: int = 4, dim: int = 8):
    """The same fp64 q, k, v [1, seq, heads, dim] on every rank, and one-process causal
    attention on them (plain tensor math)."""
    gen = torch.Generator().manual_seed(1234)
    q, k, v = (torch.randn(1, seq, heads, dim, generator=gen, dtype=torch.float64)
               for _ in range(3))
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * dim ** -0.5
    s = s.masked_fill(~torch.ones(seq, seq, dtype=torch.bool).tril(), float("-inf"))
    return q, k, v, torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)


def _outcome(fn) -> dict:
    start = time.monotonic()
    try:
        value = fn()
        out = {"kind": "ok", "value": value}
    except Exception as exc:
        out = {"kind": type(exc).__name__, "message": str(exc)}
    out["seconds"] = time.monotonic() - start
    return out


def catch_and_continue(ctx, mesh):
    """A training loop that catches errors and goes on: at call 1 only rank 3 passes
    window=(-5, 0). Returns, per call, the outcome and the max error of the output against
    one-process attention (every good call must be exact on every rank)."""
    import distattn
    q, k, v, ref = _global_qkv()
    local = [distattn.shard(t, mesh, layout="zigzag") for t in (q, k, v, ref)]

    def step(i):
        bad = ctx.odd and i == 1
        out = _attn(mesh, *local[:3], causal=True, window=(-5, 0) if bad else None)
        return float((out - local[3]).abs().max())

    return [_outcome(lambda: step(i)) for i in range(5)]


# case -> what rank 3 passes instead of a good call's arguments (inputs or keywords)
ONE_RANK_ERRORS = {
    "dtype": dict(dtype=torch.float32),
    "shape": dict(seq=8),
    "causal": dict(causal=False),
    "cu_seqlens": dict(cu_seqlens=[0, 5, 16]),
    "window": dict(window=(-5, 0)),
    "softcap": dict(softcap=-1.0),
    "sinks": dict(sinks=torch.zeros(3, dtype=torch.float64)),
    "layout": dict(layout="stripe"),
    "schedule": dict(schedule="sideways"),
    "backend": dict(backend="gpu"),
    "scale": dict(softmax_scale=-1.0),
    "requires_grad": dict(requires_grad=False),
}


def one_rank_errors(ctx, mesh):
    """After a good call, for every case of ONE_RANK_ERRORS: rank 3 alone makes the bad call
    (every rank must raise, fast), then every rank makes a good call (it must be exact)."""
    import distattn
    q, k, v, ref = _global_qkv()
    good = [distattn.shard(t, mesh, layout="zigzag") for t in (q, k, v, ref)]

    def call(case=None):
        bad = dict(ONE_RANK_ERRORS[case]) if case and ctx.odd else {}
        dtype = bad.pop("dtype", torch.float64)
        seq = bad.pop("seq", 4)
        grad = bad.pop("requires_grad", True)
        kw = {"causal": True, "layout": "zigzag", **bad}
        if seq == 4:
            inputs = [t.to(dtype) for t in good[:3]]
        else:
            inputs = [torch.zeros(1, seq, 4, 8, dtype=dtype) for _ in range(3)]
        inputs = [t.detach().requires_grad_(grad) for t in inputs]
        out = distattn.dist_flash_attn(*inputs, mesh=mesh, **kw)
        out.sum().backward()
        return float((out.detach() - good[3]).abs().max())

    results = {"first": _outcome(call)}
    for case in ONE_RANK_ERRORS:
        results[case] = {"bad": _outcome(lambda: call(case)), "after": _outcome(call)}
    return results


def unshard_disagreements(ctx, mesh):
    """unshard with another layout, dtype or width on rank 3: every rank raises a named
    ValueError before any data moves; then a good unshard returns the full tensor."""
    import distattn
    x = torch.arange(16 * 8, dtype=torch.float64).view(1, 16, 8)
    local = distattn.shard(x, mesh, layout="zigzag")
    cases = {"layout": lambda: dict(layout="stripe"), "dtype": lambda: dict(t=local.float()),
             "width": lambda: dict(t=local[..., :4])}

    def call(case=None):
        bad = cases[case]() if case and ctx.odd else {}
        full = distattn.unshard(bad.get("t", local), mesh, layout=bad.get("layout", "zigzag"))
        return bool(torch.equal(full, x))

    results = {case: _outcome(lambda: call(case)) for case in cases}
    results["after"] = _outcome(call)
    return results


def die(ctx, mesh):
    """After a good call: rank 3 exits (os._exit) at ring step 1 of the forward. The others
    get a CommunicationError; their next call on the mesh names the earlier failure."""
    from distattn.comm import CommunicationError
    _call(ctx, mesh)
    try:
        _call(ctx, mesh, profiler=_DieAt("forward", 1) if ctx.odd else None)
    except CommunicationError as first:
        second = _outcome(lambda: _call(ctx, mesh))
        raise CommunicationError(f"{first} || then: {second['kind']}: "
                                 f"{second.get('message')} ({second['seconds']:.2f} s)")
    return "no error"


def mask(ctx, mesh):
    """The transformers mask function: only rank 3's shard of the attention mask has
    padding. Every rank raises, before the attention's collectives."""
    from distattn.integrations.transformers import _make_mask
    attention_mask = torch.ones(1, 4, dtype=torch.long)
    if ctx.odd:
        attention_mask[0, -1] = 0
    result = _make_mask("distattn", mesh)(batch_size=1, q_length=4, kv_length=4,
                                          attention_mask=attention_mask)
    _attn(mesh, *ctx.qkv(), causal=True)
    return f"mask {result}"


def timeouts(ctx, mesh):
    """Timeouts the groups carry: inherited from the default group (60 s here), or the
    explicit one of build, and from_device_mesh's."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import distattn
    from distattn.mesh import group_timeout

    def seconds(m):
        groups = [m.control_group, m.ulysses_group, m.ring_group]
        return [m.timeout.total_seconds()] + [group_timeout(g).total_seconds() for g in groups
                                              if g is not None]

    inherited = distattn.SPMesh.build(ulysses_degree=2)
    dm = init_device_mesh("cpu", (2, 2), mesh_dim_names=("sp_r", "sp_u"))
    from_dm = distattn.SPMesh.from_device_mesh(dm)
    short = distattn.SPMesh.from_device_mesh(dm, timeout=datetime.timedelta(seconds=9))
    ring = distattn.SPMesh.build(timeout=datetime.timedelta(seconds=7))
    try:
        distattn.SPMesh.build(ulysses_degree=2, timeout=5)
        bad = "accepted"
    except ValueError as exc:   # checked before any group is created, on every rank
        bad = str(exc)
    out = _attn(from_dm, *ctx.qkv(), causal=True)      # the new groups work
    dist.barrier()
    return {"explicit": seconds(mesh), "inherited": seconds(inherited),
            "device_mesh": seconds(from_dm), "device_mesh_short": seconds(short),
            "ring": seconds(ring), "own_control_group": ring.control_group is not ring.ring_group,
            "shape": list(out.shape), "bad_timeout": bad}


SCENARIOS = {f.__name__: f for f in (
    timeouts, causal, local_error, window, backward_skipped, mask, documents, length,
    length_steady, length_steady_on_change, skip, skip_on_change, catch_and_continue,
    one_rank_errors, unshard_disagreements, die)}
