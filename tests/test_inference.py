"""Sequence-parallel inference on real gloo worlds of 4 CPU processes: the core.

Core (``distattn.inference.ShardedKVCache``): a prompt of odd length is prefilled, then chunks
with pass-Q and pass-KV, then decode steps of 1 and 2 tokens, on two layers; every output
must equal causal attention over the whole sequence computed in one process (written out
densely on the full float64 tensors), to 1e-10, for ring 4, Ulysses 4 and USP 2x2 (both
placements), every layout, MHA/GQA/MQA, batch 1 and 2. The cache's placement (each token on
exactly one rank, about 1/P per rank), the bytes of a decode step's messages (the same for
short and long contexts, measured by wrapping torch.distributed) and the refusals (raised
before any collective) are checked too.

Windows (which cut), softcap and sinks are checked on the prompt and decode steps against a
dense float64 reference written out in the test.

No transformers here (its generation: tests/test_inference_transformers.py).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import zlib
from dataclasses import dataclass

import pytest
import torch

from spawn import run_world

from distattn.inference import count_sent_bytes

WORLD = 4
TOL = 1e-10


def _error(fn):
    """(exception type name, message), or None if ``fn`` did not raise."""
    try:
        fn()
    except Exception as exc:  # the parent asserts type and message
        return type(exc).__name__, str(exc)
    return None


def assert_refused(results: list, what: str, exc: str, words: str) -> None:
    """Every rank's ``refusals[what]`` is an ``exc`` whose message contains ``words``, raised
    with no collective issued."""
    for rank, r in enumerate(results):
        got = r["refusals"][what]
        assert got is not None, f"rank {rank}: {what} was not refused"
        assert got[0] == exc and words in got[1], (rank, got)
        assert r["refusals"]["collectives_during_errors"] == 0


# ---------------------------------------------------------------------------------------------
# the pass-KV / pass-Q rule (pure)
# ---------------------------------------------------------------------------------------------
def test_choose_strategy_rule():
    from distattn.inference import choose_strategy

    fp32 = dict(head_dim=128, elem_bytes=4, acc_bytes=4)
    assert choose_strategy(4096, 0, 32, 8, **fp32) == "pass_kv"          # a prompt: ring
    assert choose_strategy(1, 100_000, 32, 8, **fp32) == "pass_q"        # a short turn
    assert choose_strategy(50_000, 50_000, 32, 8, **fp32) == "pass_kv"   # half new
    # the threshold is the byte balance: new/(new+cached) vs 2*Hkv*D*e / (Hq*(D*e+(D+1)*a))
    hq, hkv, d = 32, 8, 128
    ratio = 2 * hkv * d * 4 / (hq * (d * 4 + (d + 1) * 4))
    cached = 100_000
    below = int(ratio * cached / (1 - ratio)) - 10      # new tokens just under the ratio
    assert choose_strategy(below, cached, hq, hkv, **fp32) == "pass_q"
    assert choose_strategy(below + 100, cached, hq, hkv, **fp32) == "pass_kv"
    # MQA makes moving K/V cheap: pass-KV already at 10% new tokens; MHA keeps pass-Q
    assert choose_strategy(10_000, 90_000, 32, 1, **fp32) == "pass_kv"
    assert choose_strategy(10_000, 90_000, 32, 32, **fp32) == "pass_q"


# ---------------------------------------------------------------------------------------------
# core: worker side
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CoreCase:
    ulysses: int
    placement: str
    layout: str
    hq: int
    hkv: int
    batch: int
    prompt: int          # odd lengths on purpose: the layouts need padding
    backend: str
    window: int | None = None      # left reach of a sliding window (decode steps only)
    softcap: float | None = None
    sinks: bool = False
    v_head_dim: int = 0            # MLA: V's head dim when it is not HEAD_DIM

    @property
    def id(self) -> str:
        variant = f"-dv{self.v_head_dim}" if self.v_head_dim else ""
        variant += "".join(f"-{name}" for name, on in (
            (f"window{self.window}", self.window is not None),
            (f"softcap{self.softcap}", self.softcap is not None), ("sinks", self.sinks)) if on)
        return (f"u{self.ulysses}r{WORLD // self.ulysses}-{self.placement}-{self.layout}-"
                f"h{self.hq}kv{self.hkv}-b{self.batch}-S{self.prompt}-{self.backend}{variant}")

    @property
    def steps(self) -> list:
        """After the prompt: every kind of step, or (with a window) one-token decode steps."""
        return DECODE_STEPS if self.window is not None else STEPS


def core_cases() -> list[CoreCase]:
    meshes = [(1, "ulysses_inner"), (4, "ulysses_inner"), (2, "ulysses_inner"),
              (2, "ring_inner")]
    cases, i = [], 0
    for u, placement in meshes:
        for layout in ("zigzag", "contiguous", "stripe"):
            hq, hkv = ((8, 8), (8, 2), (8, 1))[i % 3]
            cases.append(CoreCase(u, placement, layout, hq, hkv, (1, 2)[i % 2],
                                  (13, 22, 9, 17)[i % 4], ("torch", "reference")[(i // 2) % 2]))
            i += 1
    # windows (which cut), softcap and sinks
    cases += [CoreCase(1, "ulysses_inner", "zigzag", 8, 2, 2, 13, "torch", 4, 5.0, True),
              CoreCase(2, "ulysses_inner", "contiguous", 8, 1, 1, 22, "reference", 6, None,
                       True),
              CoreCase(4, "ulysses_inner", "stripe", 8, 8, 2, 9, "torch", 3, 5.0, False),
              CoreCase(1, "ulysses_inner", "contiguous", 8, 2, 1, 17, "torch", None, 5.0, True),
              CoreCase(2, "ring_inner", "zigzag", 8, 2, 2, 13, "reference", None, None, True)]
    # MLA (V's head dim 8 or 24, q/k's 16) and Ulysses degrees that split the heads unevenly
    cases += [CoreCase(1, "ulysses_inner", "zigzag", 8, 2, 1, 13, "torch", v_head_dim=8),
              CoreCase(4, "ulysses_inner", "contiguous", 8, 8, 2, 17, "reference",
                       v_head_dim=24),
              CoreCase(2, "ring_inner", "stripe", 8, 1, 1, 22, "torch", 4, 5.0, True, 8),
              CoreCase(4, "ulysses_inner", "zigzag", 6, 3, 1, 13, "torch", None, None, True),
              CoreCase(4, "ulysses_inner", "stripe", 6, 6, 2, 9, "reference", 3, None, False,
                       8),
              CoreCase(2, "ulysses_inner", "contiguous", 3, 3, 1, 22, "torch")]
    return cases


# After the prompt: (kind, strategy, new tokens). Chunks smaller than the group and decode
# steps of two tokens are included on purpose.
STEPS = [("sharded", "pass_q", 5), ("sharded", "pass_kv", 6), ("replicated", None, 1),
         ("replicated", None, 1), ("replicated", None, 2), ("sharded", "auto", 3),
         ("replicated", None, 1)]
DECODE_STEPS = [("replicated", None, 1)] * 4
LAYERS, HEAD_DIM = 2, 16


def dense_reference(q, k, v, left=None, softcap=None, sinks=None) -> torch.Tensor:
    """Causal attention over the whole sequence, written out densely in float64 (nothing
    from distattn): q [B, S, Hq, D], k/v [B, S, Hkv, D] -> [B, S, Hq, D]. ``left``: a key
    more than ``left`` positions back is hidden; ``softcap``: scores c*tanh(s/c); ``sinks``
    [Hq]: one more logit per head in the softmax, attached to no value."""
    b, s, hq, d = q.shape
    group = hq // k.shape[2]
    k, v = k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * d ** -0.5
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    i, j = torch.arange(s)[:, None], torch.arange(s)[None]
    visible = (j <= i) & ((j >= i - left) if left is not None else True)
    scores = scores.masked_fill(~visible, float("-inf"))
    if sinks is not None:
        scores = torch.cat([scores, sinks.view(1, hq, 1, 1).expand(b, hq, s, 1)], dim=-1)
    return torch.einsum("bhij,bjhd->bihd", scores.softmax(-1)[..., :s], v)


def _full_tensors(case: CoreCase, total: int):
    """Per layer: full q, k, v and the sink logits (or None)."""
    gen = torch.Generator().manual_seed(zlib.crc32(case.id.encode()))
    make = lambda h, d=HEAD_DIM: torch.randn(case.batch, total, h, d, generator=gen,
                                             dtype=torch.float64)
    return [(make(case.hq), make(case.hkv), make(case.hkv, case.v_head_dim or HEAD_DIM),
             torch.randn(case.hq, generator=gen, dtype=torch.float64) if case.sinks else None)
            for _ in range(LAYERS)]


def _rel(a, ref) -> float:
    if a.numel() == 0:
        return 0.0
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def run_core_case(case: CoreCase, mesh) -> dict:
    from distattn.inference import ShardedKVCache

    total = case.prompt + sum(n for *_, n in case.steps)
    tensors = _full_tensors(case, total)
    refs = [dense_reference(q, k, v, case.window, case.softcap, sinks)
            for q, k, v, sinks in tensors]
    variant = dict(window=None if case.window is None else (case.window, 0),
                   softcap=case.softcap)
    cache = ShardedKVCache(mesh, LAYERS, layout=case.layout, backend=case.backend)
    steps, errors, padding = [], [], []
    for kind, strategy, n in [("sharded", "auto", case.prompt)] + case.steps:
        step = (cache.begin_sharded(n, strategy) if kind == "sharded"
                else cache.begin_replicated(n))
        new = slice(step.start, step.start + n)
        pos = step.positions
        real = pos < step.start + n
        for layer, (q, k, v, sinks) in enumerate(tensors):
            out = cache.attend(layer, *(step.shard(t[:, new]) for t in (q, k, v)),
                               sinks=sinks, **variant)
            errors.append(_rel(out[:, real], refs[layer][:, pos[real]]))
            padding.append(float(out[:, ~real].abs().max()) if (~real).any() else 0.0)
        steps.append(step.kind)
    positions = cache.local_positions
    stored_ok = all(torch.equal(cache.layer_kv(layer)[0], tensors[layer][1][:, positions]) and
                    torch.equal(cache.layer_kv(layer)[1], tensors[layer][2][:, positions])
                    for layer in range(LAYERS))
    per_token = (HEAD_DIM + (case.v_head_dim or HEAD_DIM)) * case.hkv * case.batch * 8 * LAYERS
    return {"error": max(errors), "padding": max(padding), "kinds": steps,
            "counts": cache.counts, "positions": positions.tolist(), "stored_ok": stored_ok,
            "seq_len": cache.seq_len, "total": total, "nbytes": cache.nbytes(),
            "local_len": cache.local_len,
            "token_bytes": per_token}


def decode_bytes(mesh, prompt: int) -> dict:
    """Bytes this rank sends in a decode step (one layer; the second: steady state), counted
    two ways."""
    from distattn.inference import ShardedKVCache

    gen = torch.Generator().manual_seed(prompt)
    b, hq, hkv, d = 2, 8, 2, 16
    cache = ShardedKVCache(mesh, 1)
    step = cache.begin_sharded(prompt)
    qkv = [torch.randn(b, step.local_slots, h, d, generator=gen) for h in (hq, hkv, hkv)]
    cache.attend(0, *qkv)
    token = [torch.randn(b, 1, h, d, generator=gen) for h in (hq, hkv, hkv)]
    cache.begin_replicated(1)      # the first decode step also agrees on its new arguments
    cache.attend(0, *token)
    before = cache.comm.bytes_sent
    cache.begin_replicated(1)
    with count_sent_bytes() as wire:
        cache.attend(0, *token)
    return {"wire": wire["bytes"], "calls": wire["calls"],
            "counter": cache.comm.bytes_sent - before,
            "expected": b * hq * (d + 1) * 4}      # one packed partial: out and lse, fp32


def core_refusals(mesh) -> dict:
    """Bad calls on every rank: each must raise without any collective; then a good step."""
    import torch.distributed as dist

    from distattn.inference import ShardedKVCache

    q = torch.randn(1, 4, 4, 8)
    kv = torch.randn(1, 4, 2, 8)
    fresh = lambda: ShardedKVCache(mesh, 2)
    opened = fresh()
    step = opened.begin_sharded(8)
    windowed = ShardedKVCache(mesh, 1)      # a prompt, then a pass-Q chunk
    n = windowed.begin_sharded(8).local_slots
    windowed.attend(0, q[:, :1].expand(-1, n, -1, -1), kv[:, :1].expand(-1, n, -1, -1),
                    kv[:, :1].expand(-1, n, -1, -1))
    n = windowed.begin_sharded(4, "pass_q").local_slots
    chunk = [t[:, :1].expand(-1, n, -1, -1) for t in (q, kv, kv)]
    res = {}
    with count_sent_bytes() as wire:
        res["short_prompt"] = _error(lambda: fresh().begin_sharded(WORLD - 1))
        res["bad_strategy"] = _error(lambda: fresh().begin_sharded(8, "pass_z"))
        res["bad_layout"] = _error(lambda: ShardedKVCache(mesh, 2, layout="packed"))
        res["bad_layers"] = _error(lambda: ShardedKVCache(mesh, 0))
        res["no_step"] = _error(lambda: fresh().attend(0, q, kv, kv))
        res["wrong_local_len"] = _error(lambda: opened.attend(0, q[:, :3], kv[:, :3],
                                                              kv[:, :3]))
        res["bad_layer"] = _error(lambda: opened.attend(5, q[:, :step.local_slots],
                                                        kv[:, :step.local_slots],
                                                        kv[:, :step.local_slots]))
        res["gqa_ratio"] = _error(lambda: opened.attend(0, q[:, :step.local_slots, :3],
                                                        kv[:, :step.local_slots],
                                                        kv[:, :step.local_slots]))
        res["step_open"] = _error(lambda: opened.begin_replicated(1))
        # a window that cuts, on a chunk over cached tokens
        res["window_on_chunk"] = _error(lambda: windowed.attend(0, *chunk, window=(2, 0)))
    res["collectives_during_errors"] = wire["calls"]
    # ranks that disagree (rank 0 alone asks for a softcap): every rank raises, none hangs
    os.environ["DISTATTN_CHECK"] = "1"
    try:
        other = fresh()
        other.begin_replicated(1)
        res["disagreement"] = _error(lambda: other.attend(
            0, q[:, :1], kv[:, :1], kv[:, :1], softcap=5.0 if dist.get_rank() == 0 else None))
    finally:
        del os.environ["DISTATTN_CHECK"]
    n = step.local_slots
    for layer in range(2):
        opened.attend(layer, q[:, :n], kv[:, :n], kv[:, :n])
    res["repeat_layer_after_close"] = _error(lambda: opened.attend(0, q[:, :n], kv[:, :n],
                                                                   kv[:, :n]))
    opened.begin_replicated(1)
    two = lambda t: t[:, :1].expand(2, -1, -1, -1)
    res["mismatched_batch"] = _error(lambda: opened.attend(0, two(q), two(kv), two(kv)))
    for layer in range(2):   # the group is still in step: finish the decode step
        opened.attend(layer, q[:, :1], kv[:, :1], kv[:, :1])
    dist.barrier()
    res["good_after_errors"] = opened.seq_len
    return res


def core_worker(rank: int, world: int) -> dict:
    import distattn

    meshes = {}

    def mesh(u, placement):
        if (u, placement) not in meshes:
            meshes[(u, placement)] = distattn.SPMesh.build(ulysses_degree=u, placement=placement)
        return meshes[(u, placement)]

    results = {c.id: run_core_case(c, mesh(c.ulysses, c.placement)) for c in core_cases()}
    results["decode_bytes"] = {f"u{u}-S{S}": decode_bytes(mesh(u, "ulysses_inner"), S)
                               for u in (1, 2, 4) for S in (16, 256)}
    results["refusals"] = core_refusals(mesh(2, "ulysses_inner"))
    return results


# ---------------------------------------------------------------------------------------------
# core: assertions
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def core_results():
    return run_world(WORLD, core_worker)


@pytest.mark.parametrize("case", core_cases(), ids=lambda c: c.id)
def test_prefill_chunks_decode_match_one_process(core_results, case):
    for rank, r in enumerate(core_results):
        res = r[case.id]
        assert res["error"] <= TOL, f"rank {rank}: relative error {res['error']:.2e}"
        assert res["padding"] == 0.0, f"rank {rank}: padding slots got a result"
        expected = ["pass_kv"] + (["replicated"] * 4 if case.window is not None else
                                  ["pass_q", "pass_kv"] + ["replicated"] * 3)
        assert res["kinds"][:len(expected)] == expected
    # every rank agrees on the placement and the length
    assert all(r[case.id]["counts"] == core_results[0][case.id]["counts"] for r in core_results)
    assert all(r[case.id]["seq_len"] == r[case.id]["total"] for r in core_results)


@pytest.mark.parametrize("case", core_cases(), ids=lambda c: c.id)
def test_cache_holds_each_token_once_about_one_pth_per_rank(core_results, case):
    per_rank = [r[case.id] for r in core_results]
    total = per_rank[0]["total"]
    positions = sorted(p for res in per_rank for p in res["positions"])
    assert positions == list(range(total)), "every token on exactly one rank"
    counts = [c for row in per_rank[0]["counts"] for c in row]
    assert sorted(res["local_len"] for res in per_rank) == sorted(counts)
    for res in per_rank:
        held = len(res["positions"])
        assert held == res["local_len"]
        assert res["stored_ok"], "a rank's K/V are not those of its positions"
        # about 1/P: within the padding a layout adds per chunk (< 2P slots) of the mean
        assert abs(held - total / WORLD) <= 2 * WORLD, (held, total)
        # allocated memory: the tokens held plus at most a quarter for growth
        assert res["nbytes"] <= (held * 5 // 4 + 2) * res["token_bytes"]


def test_decode_messages_do_not_grow_with_context(core_results):
    for rank, r in enumerate(core_results):
        got = r["decode_bytes"]
        for u in (1, 2, 4):
            short, long = got[f"u{u}-S16"], got[f"u{u}-S256"]
            assert short["wire"] == long["wire"] > 0, (rank, u, short, long)
            assert short["calls"] == long["calls"]
            # the library's own count agrees with the wrapped collectives, and both are
            # one packed partial per other rank of each subgroup
            assert short["counter"] == short["wire"]
            others = (u - 1) + (WORLD // u - 1)
            assert short["wire"] == others * short["expected"]


@pytest.mark.parametrize("what,exc,words", [
    ("short_prompt", "ValueError", "fewer than the 4 ranks"),
    ("bad_strategy", "ValueError", "strategy"),
    ("bad_layout", "ValueError", "packed"),
    ("bad_layers", "ValueError", "num_layers"),
    ("no_step", "RuntimeError", "begin_sharded"),
    ("wrong_local_len", "ValueError", "step.shard"),
    ("bad_layer", "ValueError", "layer"),
    ("gqa_ratio", "ValueError", "multiple of k/v heads"),
    ("step_open", "RuntimeError", "still open"),
    ("window_on_chunk", "NotImplementedError", "sliding window (left=2)"),
    ("repeat_layer_after_close", "RuntimeError", "no step is open"),
    ("mismatched_batch", "ValueError", "differ from the cache"),
    ("disagreement", "ValueError", "'softcap'"),
])
def test_core_refuses_before_communicating(core_results, what, exc, words):
    assert_refused(core_results, what, exc, words)
    for r in core_results:
        assert r["refusals"]["good_after_errors"] == 9   # 8 prompt tokens + 1 decoded



# ---------------------------------------------------------------------------------------------
# the benchmark's smoke mode (data only, never timings)
# ---------------------------------------------------------------------------------------------
def test_bench_inference_smoke(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "bench/inference.py", "--smoke", "--worlds", "1,4",
                           "--out", str(tmp_path)], cwd=root, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / "inference.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {(int(r["P"]), int(r["context"])) for r in rows} == {(1, 64), (1, 256), (4, 64),
                                                                 (4, 256)}
    for r in rows:   # smoke heads: Hq 4, D 16, batch 1, fp32; ring of P
        assert int(r["decode bytes/step"]) == int(r["expected bytes/step"]) == \
            (int(r["P"]) - 1) * 4 * 17 * 4
        assert float(r["cache MiB/rank"]) <= 1.3 * float(r["full cache MiB"]) / int(r["P"]) + 0.01
    with open(tmp_path / "inference_chunks.csv", newline="") as f:
        chunks = list(csv.DictReader(f))
    assert len(chunks) == 4 * 3 and {r["auto picks"] for r in chunks} <= {"pass_kv", "pass_q"}
    for r in chunks:
        if int(r["P"]) > 1:
            assert float(r["pass_kv MiB sent"]) > 0 and float(r["pass_q MiB sent"]) > 0
