"""Argument checking (raised on every rank before any communication) and SPMesh."""
import pytest

from dist_cases import run_error_cases, run_mesh_checks
from spawn import run_world

# name -> (exception type, words the message must contain)
EXPECTED = {
    "q_not_tensor": ("TypeError", ["q", "torch.Tensor"]),
    "q_3d": ("ValueError", ["q", "4-D"]),
    "int_dtype": ("TypeError", ["q", "int64", "float16"]),
    "mixed_dtype": ("TypeError", ["same dtype"]),
    "kv_shape": ("ValueError", ["k and v", "same shape"]),
    "batch": ("ValueError", ["batch"]),
    "seq": ("ValueError", ["local tokens", "same layout"]),
    "head_dim": ("ValueError", ["head_dim"]),
    "gqa_ratio": ("ValueError", ["multiple of k/v heads"]),
    "ulysses_heads": ("ValueError", ["ulysses_degree=2", "Hq=1", "degree <= Hq"]),
    "zigzag_odd_local": ("ValueError", ["zigzag", "multiple of 2", "cu_seqlens=[0, length]"]),
    "layout": ("ValueError", ["layout", "'snake'"]),
    "schedule": ("ValueError", ["schedule", "'fastest'"]),
    "helper_zigzag": ("ValueError", ["schedule='helper'", "layout='zigzag'", "schedule='ring'"]),
    "helper_full": ("ValueError", ["schedule='helper'", "causal=False"]),
    "helper_odd_local": ("ValueError", ["ring_degree=4", "even"]),
    "profiler_type": ("TypeError", ["profiler"]),
    "backend": ("ValueError", ["backend", "'triton'"]),
    "scale": ("ValueError", ["softmax_scale"]),
    "causal_type": ("TypeError", ["causal"]),
    "mesh_type": ("TypeError", ["mesh"]),
    "cuda_missing": ("RuntimeError", ["backend='cuda'", "not available"]),
    "cu_not_increasing": ("ValueError", ["cu_seqlens", "strictly increasing", "entry 2"]),
    "cu_not_from_zero": ("ValueError", ["cu_seqlens", "start at 0"]),
    "cu_not_ints": ("ValueError", ["cu_seqlens", "ints"]),
    "cu_differs_from_shard": ("ValueError", ["4 local tokens", "gives every rank 5",
                                             "same cu_seqlens"]),
    "cu_with_batch": ("ValueError", ["cu_seqlens", "batch 2", "batch 1"]),
    "packed_without_cu": ("ValueError", ["layout='packed'", "cu_seqlens"]),
    "window_negative": ("ValueError", ["window left=-2", "-1 for unbounded"]),
    "window_shape": ("ValueError", ["window", "pair"]),
    "softcap_zero": ("ValueError", ["softcap", "positive"]),
    "softcap_negative": ("ValueError", ["softcap", "-30.0"]),
    "sinks_shape": ("ValueError", ["sinks", "[4]", "(5,)"]),
    "sinks_dtype": ("TypeError", ["sinks", "floating", "int64"]),
    "shard_cu_past_tensor": ("ValueError", ["cu_seqlens ends at 20", "16 tokens"]),
    "unshard_cu_differs": ("ValueError", ["4 tokens", "gives every rank 5", "cu_seqlens"]),
    "build_bad_degree": ("ValueError", ["ulysses_degree=3", "divisor of 4"]),
    "build_bad_product": ("ValueError", ["2 * 4 != 4"]),
    "build_bad_placement": ("ValueError", ["placement", "'diagonal'"]),
    "device_mesh_bad_dim": ("ValueError", ["ulysses_dim='sp_u'", "sp_dim="]),
    "good_call_after_errors": ("ok", []),
}


@pytest.fixture(scope="module")
def error_results():
    return run_world(4, run_error_cases)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_argument_raises_clearly_on_every_rank(error_results, name):
    kind, words = EXPECTED[name]
    for rank, res in enumerate(error_results):
        got_kind, msg = res[name]
        assert got_kind == kind, f"rank {rank}: {name} raised {got_kind}: {msg}"
        for w in words:
            assert w in msg, f"rank {rank}: {name} message lacks {w!r}: {msg}"


def test_every_error_case_is_expected(error_results):
    assert set(error_results[0]) == set(EXPECTED)


def test_mesh_placements_and_device_mesh():
    res = run_world(4, run_mesh_checks)
    # ulysses_inner: u = g % 2, r = g // 2; ring_inner: r = g % 2, u = g // 2
    for g, r in enumerate(res):
        assert r["ulysses_inner"][:2] == (g % 2, g // 2)
        assert r["ulysses_inner"][2] == [g - g % 2, g - g % 2 + 1]
        assert r["ulysses_inner"][3] == [g % 2, g % 2 + 2]
        assert r["ring_inner"][:2] == (g // 2, g % 2)
        assert r["ring_inner"][2] == [g % 2, g % 2 + 2]
        assert r["ring_inner"][3] == [g - g % 2, g - g % 2 + 1]
        # a (sp_r, sp_u) device mesh has sp_u fastest: the same as ulysses_inner
        assert r["device_mesh"][:6] == r["ulysses_inner"]
        assert r["device_mesh"][6] == "ulysses_inner"
        errs = r["device_mesh_attention"]
        assert all(errs[n] <= 1e-10 for n in ("out", "lse", "dq", "dk", "dv")), errs
        # (dp, sp): ranks 0-1 and 2-3 are two rings; sp_dim= split 2 x 2 like build
        assert r["dp_sp"] == (1, 2, [g - g % 2, g - g % 2 + 1])
        assert r["sp_dim"] == (2, 2, r["ulysses_inner"][2], r["ulysses_inner"][3])
        errs = r["sp_dim_attention"]
        assert all(errs[n] <= 1e-10 for n in ("out", "lse", "dq", "dk", "dv")), errs


def test_ulysses_all_to_all_is_differentiable():
    from dist_cases import run_ulysses_collectives
    for res in run_world(4, run_ulysses_collectives):
        assert res == {"layout": True, "inverse": True, "grad": True}
