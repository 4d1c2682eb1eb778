"""Sequence-parallel attention on real gloo process groups, against a float64 reference.

Every mesh shape of world sizes 1, 2, 4 and 8, both placements, three layouts, causal and
not, MHA/GQA/MQA, head_dim 32/64, batch 1/2, fp64 and fp32, torch and reference backends; and
the same meshes with packed documents (cu_seqlens, lengths that divide nothing, padding slots
that hold NaN) over all four layouts, fp64 to fp16.
One spawned world per world size runs all of its cases; each case is its own test item.
"""
import pytest

from dist_cases import (allgather_cases, attention_cases, document_cases, helper_cases,
                        run_attention_cases, run_layout_roundtrips, variant_cases)
from spawn import run_world

WORLDS = (1, 2, 4, 8)
HELPER_WORLDS = (2, 3, 4, 8)
VARIANT_WORLDS = (2, 4, 8)
ALLGATHER_WORLDS = (2, 4, 8)


def cases_for(world):
    """Everything one spawned world runs: the matrix and the explicit helper-schedule and
    all-gather-schedule cases."""
    return (attention_cases(world) + document_cases(world) if world in WORLDS else []) + \
        (variant_cases(world) if world in VARIANT_WORLDS else []) + \
        (helper_cases(world) if world in HELPER_WORLDS else []) + \
        (allgather_cases(world) if world in ALLGATHER_WORLDS else [])


TOL = {"fp64": 1e-10, "fp32": 1e-5}
LOW_PRECISION_ATOL = {"bf16": 2e-2, "fp16": 3e-3}


@pytest.fixture(scope="module")
def world_results():
    cache = {}

    def get(world):
        if world not in cache:
            cache[world] = run_world(world, run_attention_cases, cases_for(world))
        return cache[world]
    return get


ALL_CASES = [c for w in sorted(set(WORLDS) | set(HELPER_WORLDS)) for c in cases_for(w)]


@pytest.mark.parametrize("case", ALL_CASES, ids=[c.id for c in ALL_CASES])
def test_matches_fp64_reference(world_results, case):
    per_rank = [res[case.id] for res in world_results(case.world)]
    for rank, errs in enumerate(per_rank):
        assert errs["dtype_ok"], f"rank {rank}: output or gradient dtype changed"
        assert errs["shard_ok"], f"rank {rank}: shard() rows differ from its local_indices"
        expected_lse = "torch.float64" if case.dtype == "fp64" else "torch.float32"
        assert errs["lse_dtype"] == expected_lse
        if errs["padding"]:
            assert errs["inert"], f"rank {rank}: a padding slot got a value or a gradient"
        for name in ("out", "lse", "dq", "dk", "dv") + (("dsinks",) if case.sinks else ()):
            # FlashAttention's rule below fp32: at most 2x PyTorch math's error in the same
            # dtype (both against fp64), plus a small atol.
            tol = (TOL[case.dtype] if case.dtype in TOL else
                   2 * errs["math_err"][name] + LOW_PRECISION_ATOL[case.dtype])
            assert errs[name] <= tol, f"rank {rank}: {name} relative error {errs[name]:.3e}"


def test_case_matrix_covers_the_issue():
    """The matrix itself: every mesh shape, both placements, layouts, masks, head layouts,
    head dims, batches, dtypes and backends appear."""
    seen = lambda attr: {getattr(c, attr) for c in ALL_CASES}
    assert seen("world") == set(WORLDS) | set(HELPER_WORLDS)
    assert {(c.world, c.ulysses, c.ring) for c in ALL_CASES if c.world in WORLDS} == {
        (w, u, w // u) for w in WORLDS for u in range(1, w + 1) if w % u == 0}
    assert seen("placement") == {"ulysses_inner", "ring_inner"}
    assert seen("layout") == {"contiguous", "zigzag", "stripe", "packed"}
    assert seen("causal") == {False, True}
    assert seen("hkv") == {8, 2, 1}
    assert seen("head_dim") == {32, 64} and seen("batch") == {1, 2}
    assert seen("dtype") == {"fp64", "fp32", "bf16", "fp16"}
    assert seen("backend") == {"torch", "reference"}
    assert seen("schedule") == {"auto", "ring", "helper", "allgather"}
    assert {c.world for c in ALL_CASES if c.schedule == "helper"} == set(HELPER_WORLDS)
    docs = [c for c in ALL_CASES if c.docs]
    assert {(c.world, c.ulysses, c.ring, c.placement) for c in docs} == {
        (c.world, c.ulysses, c.ring, c.placement) for c in ALL_CASES if c.world in WORLDS}
    assert {(c.layout, c.causal) for c in docs} == {
        (lay, causal) for lay in ("contiguous", "zigzag", "stripe", "packed")
        for causal in (False, True)}
    assert {c.docs for c in docs} == {"mixed", "random", "one"}
    assert {c.hkv for c in docs} == {8, 2, 1}
    assert {c.dtype for c in docs} == {"fp64", "fp32", "bf16", "fp16"}
    assert {c.schedule for c in docs if c.layout == "contiguous" and c.causal} >= {"ring",
                                                                                  "helper"}
    variants = [c for c in ALL_CASES if c.window or c.softcap or c.sinks]
    assert {(c.world, c.ulysses, c.ring, c.placement, c.layout) for c in variants} == {
        (c.world, c.ulysses, c.ring, c.placement, c.layout) for c in docs if c.world > 1}
    assert {c.window for c in variants} >= {(2, 0), (7, 0), (3, 5), (2, 2), (4, 0)}
    assert any(c.window and c.softcap and c.sinks and c.docs == "mixed" for c in variants)
    assert any(c.window and c.schedule == "helper" for c in variants)
    gathered = [c for c in ALL_CASES if c.schedule == "allgather"]
    assert {c.world for c in gathered} == set(ALLGATHER_WORLDS)
    assert {(c.world, c.ulysses, c.ring, c.placement, c.layout) for c in gathered
            if c.world < 8} == {(c.world, c.ulysses, c.ring, c.placement, c.layout)
                                for c in docs if c.world in (2, 4)}
    assert {c.causal for c in gathered} == {False, True} and {c.hkv for c in gathered} == {
        8, 2, 1}
    assert any(c.docs and c.window for c in gathered) and any(c.sinks for c in gathered)
    assert any(c.v_head_dim for c in gathered) and any(c.ulysses > 1 for c in gathered
                                                       if c.world == 8)


@pytest.mark.parametrize("world", (2, 4, 8))
def test_shard_unshard_positions_roundtrip(world):
    per_rank = run_world(world, run_layout_roundtrips)
    for key in per_rank[0]:
        assert all(res[key][0] for res in per_rank), key
        if per_rank[0][key][1] is None:
            continue
        # positions of all ranks partition the sequence
        allpos = sorted(p for res in per_rank for p in res[key][1])
        assert allpos == list(range(len(allpos))), key
