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
import torch.multiprocessing as mp

# The mesh timeout of the scenarios: short, but long enough for a healthy call on a busy
# 2-core machine.
TIMEOUT_S = 4.0
LAST_RANK = 3   # the rank that disagrees, skips or dies


def _worker(rank: int, world: int, tmp: str, scenarios: list) -> None:
    import torch.distributed as dist

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
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="distattn_faults_") as tmp:
        procs = [ctx.Process(target=_worker, args=(r, world, tmp, scenarios))
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


class _CheckOn:
    """DISTATTN_CHECK=1 for the duration of a with-block (the variable is read per call)."""

    def __enter__(self):
        self.old = os.environ.get("DISTATTN_CHECK")
        os.environ["DISTATTN_CHECK"] = "1"

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


def check_causal(ctx, mesh):
    """DISTATTN_CHECK=1, rank 3 passes causal=False: ValueError everywhere; then a good call
    on the same mesh must still work (the check left the ranks in step)."""
    q, k, v = ctx.qkv()
    with _CheckOn():
        try:
            _attn(mesh, q, k, v, causal=not ctx.odd)
        except ValueError as exc:
            _attn(mesh, q, k, v, causal=True)
            raise exc
    return "no error"


def check_length(ctx, mesh):
    """DISTATTN_CHECK=1, rank 3 holds 8 local tokens, the others 4."""
    with _CheckOn():
        _attn(mesh, *ctx.qkv(8 if ctx.odd else 4), causal=True)
    return "no error"


def check_local_error(ctx, mesh):
    """DISTATTN_CHECK=1, only rank 3 passes a bad argument: every rank raises its error."""
    with _CheckOn():
        _attn(mesh, *ctx.qkv(), causal=True, softmax_scale=-1.0 if ctx.odd else None)
    return "no error"


def check_window(ctx, mesh):
    """DISTATTN_CHECK=1, rank 3 passes another sliding window: the same local shapes and
    message sizes, a silently different result without the check."""
    with _CheckOn():
        _attn(mesh, *ctx.qkv(), causal=True, window=(2, 0) if ctx.odd else (3, 0))
    return "no error"


def check_backward_skipped(ctx, mesh):
    """DISTATTN_CHECK=1, rank 3 runs without autograd: caught at the forward, not as a hang
    in the backward."""
    with _CheckOn(), torch.set_grad_enabled(not ctx.odd):
        out = _attn(mesh, *ctx.qkv(requires_grad=True), causal=True)
        if out.requires_grad:
            out.sum().backward()
    return "no error"


def length(ctx, mesh):
    """No check, first call on the mesh, rank 3 holds 8 local tokens: distattn agrees on the
    arguments of a call that differs from the last agreed one, so a ValueError at once."""
    _attn(mesh, *ctx.qkv(8 if ctx.odd else 4), causal=True)
    return "no error"


def documents(ctx, mesh):
    """No check, first call on the mesh: rank 3 passes other document boundaries (of the
    same total length, so its local shapes agree): a ValueError naming cu_seqlens at once."""
    cu_seqlens = [0, 5, 16] if ctx.odd else [0, 16]
    _attn(mesh, *ctx.qkv(), causal=True, cu_seqlens=cu_seqlens)
    return "no error"


def _call(ctx, mesh, seq_local: int = 4, **kw):
    """Forward and backward of one causal call (a good one, unless the arguments differ)."""
    out = _attn(mesh, *ctx.qkv(seq_local, requires_grad=True), causal=True, **kw)
    out.sum().backward()


def length_steady(ctx, mesh):
    """No check, after a good call: rank 3 alone changes to 8 local tokens. It waits in the
    agreement, the others in the attention's first exchange: a distattn error after the
    timeout, never a backend abort on a size mismatch."""
    _call(ctx, mesh)
    _call(ctx, mesh, 8 if ctx.odd else 4)
    return "no error"


def skip(ctx, mesh):
    """No check, after a good call: rank 3 skips the next one (and waits at the barrier)."""
    _call(ctx, mesh)
    if ctx.odd:
        return "skipped"
    _call(ctx, mesh)
    return "no error"


def skip_check(ctx, mesh):
    """DISTATTN_CHECK=1, after a good call: rank 3 skips the next one."""
    with _CheckOn():
        return skip(ctx, mesh)


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


def die(ctx, mesh):
    """No check, after a good call: rank 3 exits (os._exit) at ring step 1 of the forward."""
    _call(ctx, mesh)
    _call(ctx, mesh, profiler=_DieAt("forward", 1) if ctx.odd else None)
    return "no error"


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
    timeouts, check_causal, check_length, check_local_error, check_window,
    check_backward_skipped, mask, documents, length, length_steady, skip, skip_check, die)}
