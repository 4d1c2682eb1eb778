"""The Hopper (sm_90a) kernels on the host CPU: backend ``emulate`` with arch ``sm90``.

csrc/kernels/fwd_sm90_kernel.cuh (producer warpgroup issuing TMA loads into an mbarrier ring,
two ping-pong consumer warpgroups on wgmma) runs on the CTA emulator's sm_90a models
(csrc/emulate/sm90_*.h): wgmma reads shared memory through the descriptor/swizzle model and
the async-proxy race check, mbarrier waits block, TMA zero-fills out-of-bounds rows. The
forward is checked against fp64 with FlashAttention's rule, as tests/test_emulate.py checks the
mma.sync kernels: head dims 64 and 128, fp16 and bf16, ragged tails on both sides of the
128-row / 128-key tiles, MHA/GQA/MQA, causal offsets (rows that see nothing included),
windows, softcap, documents in one varlen launch, pieces sharing rows (fused epilogue), the
fused ring step. The backward (csrc/kernels/bwd_sm90_kernel.cuh) runs the same matrix against
fp64 on its two Hopper kernels: dQ (bwd_q_sm90_kernel: Q, dO once by TMA, K/V tiles through an
mbarrier ring, wgmma SS for S and dP, RS for dQ += dS K) and dK/dV (bwd_kv_sm90_kernel: K, V once,
Q/dO tiles through the ring, SS for S^T and dP^T, RS for dV and dK), after the delta kernel; the
tests check with ``recent_kernels()`` that these three, in this order, were the backward's
launches.

Nothing here ran on a GPU. Select the path with ``EmulateBackend(arch="sm90")`` or, for a
whole process, ``DISTATTN_EMULATE_ARCH=sm90``.
"""
from __future__ import annotations

import pytest
import torch

import kernel_checks as kc
from distattn.kernels import Mask
from distattn.kernels.emulate import EmulateBackend, extension_error
from distattn.kernels.mask import Piece

EXT_ERROR = extension_error()
pytestmark = [pytest.mark.skipif(EXT_ERROR is not None, reason=f"emulate absent: {EXT_ERROR}"),
              pytest.mark.usefixtures("all_cores")]   # the emulator runs CTAs on every core

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
SM90 = "fwd_sm90_kernel"
SM90_BWD = "bwd_kv_sm90_kernel"
SM90_DQ = "bwd_q_sm90_kernel"


def assert_hopper_backward(ext):
    """The last three launches were the Hopper backward's: delta, the dQ kernel, the dK/dV
    kernel."""
    names = ext.recent_kernels()[-3:]
    assert len(names) == 3, names
    assert "delta_kernel<" in names[0] and SM90_DQ in names[1] and SM90_BWD in names[2], names


@pytest.fixture(scope="module")
def be():
    return EmulateBackend(arch="sm90")


def check_forward(be, dtype, d, shape, mask, softcap=0.0, seed=0, batch=2):
    """One fwd call of the extension on poisoned outputs against fp64 (FlashAttention's rule),
    and that the Hopper kernel ran it."""
    sq, sk, hq, hkv = shape
    gen = kc.generator("cpu", seed)
    q = kc.rand((batch, sq, hq, d), dtype, gen, "cpu")
    k = kc.rand((batch, sk, hkv, d), dtype, gen, "cpu")
    v = kc.rand((batch, sk, hkv, d), dtype, gen, "cpu")
    dout = kc.rand((batch, sq, hq, d), dtype, gen, "cpu")
    scale = d ** -0.5
    ext = be._ext
    out = torch.full_like(q, float("nan"))
    lse = torch.full((batch, hq, sq), float("nan"))
    ext.fwd(q, k, v, out, lse, scale, kc.ext_pieces(mask.simplify(sq, sk), sq, sk), softcap)
    assert SM90 in ext.last_kernel(), ext.last_kernel()
    r_out, r_lse = kc.reference(q, k, v, dout, scale, mask, softcap)[:2]
    m_out, m_lse = kc.math_in_dtype(q, k, v, dout, scale, mask, softcap)[:2]
    kc.assert_close_2x("out", out, m_out, r_out, atol=1e-3)
    kc.assert_lse(lse, r_lse, m_lse)
    empty_rows = torch.isinf(r_lse).transpose(1, 2)
    assert (out[empty_rows] == 0).all(), "rows that see nothing must have out == 0"


def test_arch_switch_selects_the_kernel():
    q = torch.randn(1, 8, 2, 64, dtype=torch.bfloat16)
    sm80, sm90 = EmulateBackend(arch="sm80"), EmulateBackend(arch="sm90")
    sm90.forward(q, q, q, scale=0.125, mask=Mask.none())
    assert SM90 in sm90._ext.last_kernel()
    sm80.forward(q, q, q, scale=0.125, mask=Mask.none())
    assert "fwd_kernel<" in sm80._ext.last_kernel()
    # MLA's (192, 128) has no Hopper kernel: the mma.sync one runs under arch sm90 too.
    q2, v2 = torch.randn(1, 8, 2, 192).bfloat16(), torch.randn(1, 8, 2, 128).bfloat16()
    sm90.forward(q2, q2, v2, scale=0.125, mask=Mask.none())
    assert "fwd_kernel<" in sm90._ext.last_kernel()
    with pytest.raises(ValueError, match="expected one of"):
        EmulateBackend(arch="sm70")


# (Sq, Sk, Hq, Hkv): one token, tails on both sides of the 128 tiles, GQA and MQA.
SHAPES = [(1, 1, 2, 2), (17, 130, 4, 1), (130, 17, 6, 3), (200, 260, 2, 1)]
# Full, diagonal, strictly lower, rows 0..16 empty, a band wider than a tile to the right,
# everything hidden, windows (narrow; wider than a tile on both sides; right of the diagonal).
MASKS = [Mask.none(), Mask.causal(0), Mask.causal(-1), Mask.causal(-17), Mask.causal(150),
         Mask.causal(-300), Mask.band(-9, 0), Mask.band(-140, 40), Mask.band(3, 90)]
# (70, 400): four key tiles, so both ring stages are refilled (the empty barriers' waits).
CASES = ([(64, m, s) for m in MASKS for s in SHAPES[1:3]] + [(64, Mask.none(), SHAPES[0])]
         + [(64, m, (70, 400, 2, 1)) for m in (Mask.none(), Mask.causal(300))]
         + [(128, m, s) for m in MASKS[:4] + MASKS[7:8] for s in (SHAPES[1], SHAPES[3])])


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("d,mask,shape", CASES,
                         ids=[f"d{d}-{m!r}-{'x'.join(map(str, s))}" for d, m, s in CASES])
def test_forward_against_fp64(be, dtype, d, mask, shape):
    check_forward(be, dtype, d, shape, mask, batch=1 if shape[0] * shape[1] > 10 ** 4 else 2)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("mask", [Mask.none(), Mask.causal(-17)], ids=repr)
def test_softcap_against_fp64(be, dtype, d, mask):
    check_forward(be, dtype, d, (130, 97, 4, 2), mask, softcap=2.0, batch=1)


def documents(sq, sk, cuts, causal):
    pieces = tuple(Piece(a, min(b, sq), a, min(b, sk), None, 0 if causal else None)
                   for a, b in zip(cuts[:-1], cuts[1:]) if a < min(sq, sk))
    return Mask(pieces)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_documents_in_one_varlen_launch(be, dtype, causal):
    """Packed documents (one of 1 token, one crossing the 128 tile) in one launch."""
    mask = documents(150, 150, (0, 1, 40, 41, 140, 150), causal)
    check_forward(be, dtype, 64, (150, 150, 4, 2), mask, batch=1)
    gen = torch.Generator().manual_seed(7)
    q, k, v = (kc.rand((1, 150, 2, 64), dtype, gen, "cpu") for _ in range(3))
    before = be._ext.launch_count()
    be.forward(q, k, v, scale=0.125, mask=mask)
    assert be._ext.launch_count() - before == 1


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_pieces_sharing_rows_merge_in_the_fused_epilogue(be, dtype):
    """Pieces that share rows: two launches, the second folded in by the fused epilogue."""
    shared = Mask((Piece(0, 70, 0, 60, None, None), Piece(0, 70, 60, 140, -50, 5),
                   Piece(70, 140, 0, 140, -90, -10)))
    gen = torch.Generator().manual_seed(8)
    q = kc.rand((1, 140, 4, 64), dtype, gen, "cpu")
    k, v = (kc.rand((1, 140, 2, 64), dtype, gen, "cpu") for _ in range(2))
    before = be._ext.launch_count()
    out, lse = be.forward(q, k, v, scale=0.125, mask=shared, softcap=3.0)
    assert be._ext.launch_count() - before == 2 and SM90 in be._ext.last_kernel()
    ref = kc.reference(q, k, v, q, 0.125, shared, 3.0)
    math = kc.math_in_dtype(q, k, v, q, 0.125, shared, 3.0)
    kc.assert_close_2x("out", out, math[0], ref[0], 1e-3)
    kc.assert_lse(lse, ref[1], math[1])


@pytest.mark.parametrize("layout,causal,heads", [("zigzag", True, (2, 2)),
                                                 ("stripe", False, (4, 1))])
def test_fused_ring_equals_unfused_and_reference(be, layout, causal, heads):
    """forward_into and backward_into (the fused ring step) on the Hopper kernels equal
    forward + merge, backward + add, and fp64 over the whole sequence."""
    kc.check_fused_ring(be, "cpu", layout, causal, heads, world=2, seq=4 * 24, d=64)
    assert_hopper_backward(be._ext)


# ---- the backward: Hopper dQ and dK/dV kernels --------------------------------------------------
def check_backward(be, dtype, d, shape, mask, softcap=0.0):
    """fwd + bwd of the extension against fp64 (FlashAttention's rule, tests/test_emulate.py's
    check), and that the Hopper dQ and dK/dV kernels ran the backward."""
    kc.check_forward_backward(be, "cpu", dtype, d, shape, mask, softcap)
    assert_hopper_backward(be._ext)


def test_arch_switch_selects_the_backward_kernel():
    q = torch.randn(1, 8, 2, 64, dtype=torch.bfloat16, requires_grad=True)
    sm80, sm90 = EmulateBackend(arch="sm80"), EmulateBackend(arch="sm90")
    g = torch.randn(1, 8, 2, 64, dtype=torch.bfloat16)
    for backend in (sm90, sm80):
        out, lse = backend.forward(q, q, q, scale=0.125, mask=Mask.none())
        backend.backward(g, q, q, q, out, lse, scale=0.125, mask=Mask.none())
        if backend is sm90:
            assert_hopper_backward(backend._ext)
        else:
            names = backend._ext.recent_kernels()[-2:]
            assert "bwd_kv_kernel<" in names[0] and "bwd_q_kernel<" in names[1], names
    # MLA's (192, 128): no Hopper kernel, the mma.sync backward runs under arch sm90 too.
    q2, v2 = torch.randn(1, 8, 2, 192).bfloat16(), torch.randn(1, 8, 2, 128).bfloat16()
    out, lse = sm90.forward(q2, q2, v2, scale=0.125, mask=Mask.none())
    sm90.backward(out, q2, q2, v2, out, lse, scale=0.125, mask=Mask.none())
    assert "bwd_q_kernel<" in sm90._ext.last_kernel()


# dK/dV: key tiles of 128 keys (2 warpgroups x 64), query stages of 64 rows (32 at hd128). dQ:
# query tiles of 128 rows (2 warpgroups x 64), key stages of 128 keys (64 at hd128). (200, 260)
# gives several tiles and ring rounds to both, (17, 130) three key stages to the hd128 dQ
# kernel; (17, 130) / (130, 17) ragged tails (at (130, 17) the dQ kernel's second query tile
# has a warpgroup wholly past the rows); GQA/MQA.
BWD_CASES = ([(64, m, s) for m in MASKS for s in SHAPES[1:3]] + [(64, Mask.none(), SHAPES[0])]
             + [(64, m, (200, 260, 2, 1)) for m in (Mask.none(), Mask.causal(0))]
             + [(128, m, s) for m in MASKS[:4] + MASKS[7:8] for s in (SHAPES[1], SHAPES[2])])


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("d,mask,shape", BWD_CASES,
                         ids=[f"d{d}-{m!r}-{'x'.join(map(str, s))}" for d, m, s in BWD_CASES])
def test_backward_against_fp64(be, dtype, d, mask, shape):
    check_backward(be, dtype, d, shape, mask)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("d", [64, 128])
def test_backward_softcap_against_fp64(be, dtype, d):
    check_backward(be, dtype, d, (130, 97, 4, 2), Mask.causal(-17), softcap=2.0)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_backward_documents_in_one_varlen_launch(be, causal):
    mask = documents(150, 150, (0, 1, 40, 41, 140, 150), causal)
    check_backward(be, torch.bfloat16, 64, (150, 150, 4, 2), mask)



@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_backward_strided_views_and_deterministic(be, dtype):
    """q/k/v as views of a packed qkv buffer (TMA strides), accumulators as slices, and two
    backward calls bitwise equal (hd128, causal offset 3, several tiles of both kernels)."""
    kc.check_backend_api_and_strided_views(be, "cpu", dtype, s=133)
    assert_hopper_backward(be._ext)
