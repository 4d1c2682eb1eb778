"""MLA (DeepSeek V2/V3, Kimi K2): V's head dim differs from q/k's. A shape rule of the block
contract (out has V's head dim, lse unchanged, default scale 1/sqrt(D_qk)), through ring,
helper, Ulysses (even and uneven heads), USP, every layout, documents, windows, softcap and
sinks. fp64 against the dense reference at 1e-10 on gloo worlds 2/4/8 (a subset on 8)."""
import pytest
import torch

from dist_cases import DOC_SETS, Case, mesh_shapes, run_attention_cases
from distattn.layout import ring_layout
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


def test_kernel_backends_refuse_mla():
    """The csrc kernels have no (D, Dv) pair instantiated: emulate (and cuda) refuse with a
    clear error in check(), which prepare() runs before any communication."""
    from distattn.kernels.emulate import EmulateBackend
    be = EmulateBackend()
    if be.unavailable():
        pytest.skip(f"emulate extension not built: {be.unavailable()}")
    q = torch.randn(1, 4, 2, 64, dtype=torch.bfloat16)
    v = torch.randn(1, 4, 2, 32, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="MLA"):
        be.check(q, q, v)
