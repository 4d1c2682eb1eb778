"""MLA (DeepSeek V2/V3, Kimi K2): V's head dim differs from q/k's. A shape rule of the block
contract (out has V's head dim, lse unchanged, default scale 1/sqrt(D_qk)), through ring,
helper, Ulysses (even and uneven heads), USP, every layout, documents, windows, softcap and
sinks. fp64 against the dense reference at 1e-10 on gloo worlds 2/4/8 (a subset on 8).

The csrc kernels at MLA's (D, Dv) = (192, 128), through backend "emulate" (the same kernel
text on the CPU CTA emulator): ``dist_flash_attn`` on gloo worlds 2 and 4 in bf16 and fp16,
against fp64 by FlashAttention's rule (tests/test_emulate.py has the single-block checks)."""
import pytest
import torch

from dist_cases import DOC_SETS, Case, mesh_shapes, run_attention_cases
from distattn.layout import ring_layout
import kernel_checks as kc
from spawn import run_world

LAYOUTS = ("contiguous", "zigzag", "stripe", "packed")
VARIANTS = ((True, None, 0.0, False), (False, (3, 2), 0.0, False), (True, (4, 0), 1.5, True),
            (True, None, 0.0, True))


def _cases(world):
    cases, i = [], 0
    shapes = list(mesh_shapes(world)) if world < 8 else [(1, 8, "ulysses_inner"),
                                                        (2, 4, "ulysses_inner"),
                                                        (8, 1, "ulysses_inner")]
    for u, r, placement in shapes:
        for layout in LAYOUTS if world < 8 else ("zigzag", "packed"):
            causal, window, softcap, sinks = VARIANTS[i % len(VARIANTS)]
            docs = ("mixed", "random", "")[i % 3] if layout != "packed" else "random"
            hq, hkv = ((8, 2), (6, 3), (4, 4))[i % 3]     # (6, 3) is uneven at u = 4 and 8
            if hq < u:
                hq, hkv = 2 * u, 2
            seq = DOC_SETS[docs](world)[-1] if docs else 2 * world * 3
            helper = (layout == "contiguous" and causal and r > 1 and not docs and not window
                      and ring_layout(layout, seq, r, u).part_len % 2 == 0)
            for schedule in (("ring", "helper") if helper else ("auto",)):
                cases.append(Case(world, u, r, placement, layout, causal, hq, hkv,
                                  (24, 16)[i % 2], 1, "fp64", ("torch", "reference")[i % 2],
                                  schedule, docs, window, softcap, sinks, (16, 8)[i % 2]))
            i += 1
    return cases


ALL = [c for w in (2, 4, 8) for c in _cases(w)]
_results = {}


@pytest.mark.parametrize("case", ALL, ids=[c.id for c in ALL])
def test_mla_matches_fp64(case):
    if case.world not in _results:
        _results[case.world] = run_world(case.world, run_attention_cases, _cases(case.world))
    for rank, res in enumerate(_results[case.world]):
        errs = res[case.id]
        if errs["padding"]:
            assert errs["inert"], f"rank {rank}: a padding slot got a value or a gradient"
        for name in ("out", "lse", "dq", "dk", "dv") + (("dsinks",) if case.sinks else ()):
            assert errs[name] <= 1e-10, f"rank {rank}: {name} relative error {errs[name]:.3e}"


def test_block_backends_take_v_head_dim():
    """One block, no communication: torch and reference give out [.., Dv] and the same
    numbers as plain math with scale 1/sqrt(D_qk)."""
    from distattn.kernels import get_backend
    from distattn.kernels.mask import Mask
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 5, 4, 12, generator=g, dtype=torch.float64)
    k = torch.randn(1, 7, 2, 12, generator=g, dtype=torch.float64)
    v = torch.randn(1, 7, 2, 20, generator=g, dtype=torch.float64)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(2, 2)) * 12 ** -0.5
    ref = torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v.repeat_interleave(2, 2))
    for name in ("torch", "reference"):
        out, lse = get_backend(name, q, k, v).forward(q, k, v, scale=12 ** -0.5,
                                                      mask=Mask.none())
        assert out.shape == (1, 5, 4, 20)
        assert torch.allclose(out, ref, atol=1e-12) and torch.allclose(
            lse, s.logsumexp(-1), atol=1e-12)


def test_kernel_backends_take_192_128_and_refuse_other_pairs():
    """The csrc kernels are instantiated for MLA's (D, Dv) = (192, 128): emulate (and cuda,
    the same check on distattn._C) accept it and refuse other pairs with a clear error in
    check(), which prepare() runs before any communication. "auto" picks no new backend."""
    from distattn.kernels import get_backend
    from distattn.kernels.cuda import head_dim_pairs
    from distattn.kernels.emulate import EmulateBackend
    be = EmulateBackend()
    if be.unavailable():
        pytest.skip(f"emulate extension not built: {be.unavailable()}")
    assert (192, 128) in be.head_dim_pairs()
    q = torch.randn(1, 4, 2, 192, dtype=torch.bfloat16)
    v = torch.randn(1, 4, 2, 128, dtype=torch.bfloat16)
    be.check(q, q, v)
    assert get_backend("emulate", q, q, v).name == "emulate"
    assert get_backend("auto", q, q, v).name in ("torch", "reference")
    for d, dv in ((64, 32), (128, 192), (192, 64)):
        with pytest.raises(ValueError, match="MLA"):
            be.check(q[..., :d], q[..., :d], torch.randn(1, 4, 2, dv, dtype=torch.bfloat16))

    class Old:  # an extension built before head_dim_pairs existed
        @staticmethod
        def head_dims():
            return [64, 128]
    assert head_dim_pairs(Old) == ((64, 64), (128, 128))


# ---------------------------------------------------------------------------------------------
# The kernels at (192, 128) through backend "emulate" on gloo worlds 2 and 4
# ---------------------------------------------------------------------------------------------
def _emulate_cases(world):
    """Ring (zigzag causal, plain-ring schedule on contiguous causal), Ulysses with a window,
    USP with packed documents; GQA and MQA; bf16 and fp16."""
    if world == 2:
        return [Case(2, 1, 2, "ulysses_inner", "zigzag", True, 4, 2, 192, 1, "bf16", "emulate",
                     v_head_dim=128),
                Case(2, 1, 2, "ulysses_inner", "contiguous", True, 2, 1, 192, 2, "fp16",
                     "emulate", "ring", v_head_dim=128),
                Case(2, 2, 1, "ulysses_inner", "stripe", False, 4, 2, 192, 1, "fp16",
                     "emulate", window=(10, 30), v_head_dim=128)]
    return [Case(4, 2, 2, "ring_inner", "zigzag", True, 4, 1, 192, 1, "bf16", "emulate",
                 softcap=2.0, v_head_dim=128),
            Case(4, 2, 2, "ulysses_inner", "packed", True, 4, 2, 192, 1, "fp16", "emulate",
                 docs="mixed", window=(20, 0), v_head_dim=128)]


EMULATE = [c for w in (2, 4) for c in _emulate_cases(w)]
_emulate_results = {}


@pytest.mark.parametrize("case", EMULATE, ids=[c.id for c in EMULATE])
def test_mla_emulate_kernels_match_fp64(case):
    from distattn.kernels.emulate import extension_error
    if extension_error():
        pytest.skip(f"emulate extension not built: {extension_error()}")
    from test_emulate import run_emulate_cases
    if case.world not in _emulate_results:
        _emulate_results[case.world] = run_world(case.world, run_emulate_cases,
                                                 _emulate_cases(case.world))
    for rank, res in enumerate(_emulate_results[case.world]):
        r = res[case.id]
        kc.assert_dist_rule(rank, r)
