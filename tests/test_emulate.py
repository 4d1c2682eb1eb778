"""The csrc kernels on the host CPU: backend ``emulate`` (distattn._emulate, csrc/emulate/).

The same kernel text nvcc compiles, built with DISTATTN_EMULATE over host models of mma.sync,
ldmatrix, cp.async, shuffles and barriers, every CUDA thread a fiber of an emulated CTA whose
shared memory is checked for races. These tests run the GPU checks of tests/kernel_checks.py
through it, then ``dist_flash_attn(..., backend="emulate")`` on gloo CPU ranks:

- kernels vs fp64, fp16 and bf16, head_dim 64 and 128 and MLA's (D, Dv) = (192, 128),
  FlashAttention's rule (error at most 2x PyTorch math's error in the same dtype, plus a small
  atol), poisoned outputs; lengths that cross the 64-row/column tiles with ragged tails, causal
  offsets, windows, softcap, documents, rows that see nothing, GQA and MQA;
- the fused ring step (forward_into / backward_into) against forward + merge and fp64;
- the distributed matrix slice: ring, Ulysses and USP meshes, three layouts, causal, GQA.

Shapes are small (the emulator runs ~10^5 CUDA threads a second) but cross tile boundaries.
"""
from __future__ import annotations

import zlib

import pytest
import torch

import distattn
import kernel_checks as kc
from dist_cases import Case, Meshes, dense_attention, mesh_shapes, visibility
from distattn.kernels import Mask, get_backend
from distattn.kernels.mask import Piece
from distattn.layout import local_indices
from distattn.kernels.emulate import EmulateBackend, extension_error
from spawn import run_world

EXT_ERROR = extension_error()
pytestmark = [pytest.mark.skipif(EXT_ERROR is not None, reason=f"emulate absent: {EXT_ERROR}"),
              pytest.mark.usefixtures("all_cores")]   # the emulator runs CTAs on every core

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.fixture(scope="module")
def be():
    return EmulateBackend()


# ---------------------------------------------------------------------------------------------
# The backend itself
# ---------------------------------------------------------------------------------------------
def test_auto_never_picks_emulate_and_emulate_is_selectable():
    q = torch.randn(1, 8, 2, 64, dtype=torch.bfloat16)
    assert get_backend("auto", q, q, q).name != "emulate"
    assert get_backend("emulate", q, q, q).name == "emulate"


def test_absent_extension_raises_clearly(monkeypatch):
    import distattn.kernels.emulate as emu
    monkeypatch.setattr(emu, "_emulate", None)
    q = torch.randn(1, 8, 2, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="backend='emulate' is not available.*not built"):
        get_backend("emulate", q, q, q)


def test_bad_inputs_raise_python_errors(be):
    kc.check_bad_inputs(be, "cpu")
    assert be.head_dims() == (64, 128)
    assert be.head_dim_pairs() == ((64, 64), (128, 128), (192, 128))


# ---------------------------------------------------------------------------------------------
# Kernels against fp64
# ---------------------------------------------------------------------------------------------
# Offsets: full, diagonal, stripe's strictly-lower block, rows 0..16 empty, a band wider than a
# tile on either side, and everything hidden; sliding windows (bands with a lower bound):
# narrower than a tile, one that hides the last keys from the first rows and the first keys
# from the last, and one that starts right of the diagonal (rows at the end see nothing).
MASKS = [Mask.none(), Mask.causal(0), Mask.causal(-1), Mask.causal(-17), Mask.causal(5),
         Mask.causal(70), Mask.causal(-130), Mask.band(-9, 0), Mask.band(-70, 40),
         Mask.band(3, 90)]
# (Sq, Sk, Hq, Hkv): one token, ragged tails on both sides of the 64-tiles, GQA and MQA.
SHAPES = [(1, 1, 2, 2), (17, 130, 4, 1), (130, 17, 6, 3), (130, 130, 4, 2)]


# Every mask at head_dim 64; at 128 and at MLA's (D, Dv) = (192, 128) (same code, other tile
# sizes; at (192, 128) V, O, dO and dV have another width than Q, K, dQ and dK) the ones that
# make tiles skip, partial and full in different places, a window among them.
# (q/k head dim, v head dim)
DIMS = {"d64": (64, 64), "d128": (128, 128), "d192v128": (192, 128)}
SOME_MASKS = [m for m in MASKS if m.kind == "none"
              or (m.kind == "causal" and m.offset in (0, -17, 70))
              or (m.kind == "band" and m.pieces[0].lo == -70)]
MASKS_BY_D = ([("d64", m) for m in MASKS] + [("d128", m) for m in SOME_MASKS]
              + [("d192v128", m) for m in SOME_MASKS])


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("dims,mask", MASKS_BY_D, ids=[f"{n}-{m!r}" for n, m in MASKS_BY_D])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_backward_against_fp64(be, dtype, dims, mask, shape):
    d, d_v = DIMS[dims]
    kc.check_forward_backward(be, "cpu", dtype, d, shape, mask, d_v=d_v)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("dims", list(DIMS))
@pytest.mark.parametrize("mask", [Mask.none(), Mask.causal(-17), Mask.band(-20, 10)], ids=repr)
def test_softcap_against_fp64(be, dtype, dims, mask):
    """softcap (Gemma 2: scores c * tanh(s / c)) in the forward and in dS of the backward;
    c = 2 caps the scaled scores of unit-variance inputs hard."""
    d, d_v = DIMS[dims]
    kc.check_forward_backward(be, "cpu", dtype, d, (130, 97, 4, 2), mask, softcap=2.0, d_v=d_v)


def documents(sq, sk, cuts, causal):
    """Block-diagonal pieces: document i is rows/keys [cuts[i], cuts[i+1]) (clipped to the
    block), causal inside its diagonal square or not."""
    pieces = tuple(Piece(a, min(b, sq), a, min(b, sk), None, 0 if causal else None)
                   for a, b in zip(cuts[:-1], cuts[1:]) if a < min(sq, sk))
    return Mask(pieces)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dims", ["d64", "d192v128"])
def test_documents_in_one_varlen_launch(be, dtype, causal, dims):
    """Packed documents of a block (pieces with disjoint rows and keys, one of 1 token, one
    crossing two tiles) in one fwd and one bwd call against fp64; through the backend the
    forward and backward are one launch each (bwd: delta, dK/dV and dQ kernels)."""
    d, d_v = DIMS[dims]
    mask = documents(150, 150, (0, 1, 40, 41, 130, 150), causal)
    kc.check_forward_backward(be, "cpu", dtype, d, (150, 150, 4, 2), mask, d_v=d_v)
    gen = torch.Generator().manual_seed(7)
    q, k = (kc.rand((1, 150, 2, d), dtype, gen, "cpu") for _ in range(2))
    v = kc.rand((1, 150, 2, d_v), dtype, gen, "cpu")
    before = be._ext.launch_count()
    out, lse = be.forward(q, k, v, scale=d ** -0.5, mask=mask)
    assert be._ext.launch_count() - before == 1 and out.shape == (1, 150, 2, d_v)
    before = be._ext.launch_count()
    be.backward(out, q, k, v, out, lse, scale=d ** -0.5, mask=mask)
    assert be._ext.launch_count() - before == 3


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("softcap", [0.0, 3.0], ids=["nocap", "cap3"])
def test_pieces_sharing_rows_merge_in_the_epilogue(be, dtype, softcap):
    """A query row meeting several key ranges (pieces that share rows: a document split by a
    ring step, a window crossing a boundary) takes one launch per group of disjoint pieces,
    merged by the fused epilogue; more than max_pieces_per_launch pieces split over launches.
    Both against the reference backend in fp64 (FlashAttention's rule through the backend)."""
    sq = sk = 140
    shared = Mask((Piece(0, 70, 0, 60, None, None), Piece(0, 70, 60, 140, -50, 5),
                   Piece(70, 140, 0, 140, -90, -10)))
    many = documents(sq, sk, tuple(range(0, 141, 4)), causal=True)   # 35 pieces
    assert len(many.pieces) > be._ext.max_pieces_per_launch
    gen = torch.Generator().manual_seed(8)
    q = kc.rand((2, sq, 4, 64), dtype, gen, "cpu")
    k, v = (kc.rand((2, sk, 2, 64), dtype, gen, "cpu") for _ in range(2))
    dout = kc.rand(q.shape, dtype, gen, "cpu")
    for mask, launches in ((shared, 2), (many, 2)):
        before = be._ext.launch_count()
        out, lse = be.forward(q, k, v, scale=0.125, mask=mask, softcap=softcap)
        assert be._ext.launch_count() - before == launches
        grads = be.backward(dout, q, k, v, out, lse, scale=0.125, mask=mask, softcap=softcap)
        ref = kc.reference(q, k, v, dout, 0.125, mask, softcap)
        math = kc.math_in_dtype(q, k, v, dout, 0.125, mask, softcap)
        kc.assert_close_2x("out", out, math[0], ref[0], 1e-3)
        kc.assert_lse(lse, ref[1], math[1])
        for name, got, m, r in zip(("dq", "dk", "dv"), grads, math[2:], ref[2:]):
            kc.assert_close_2x(name, got, m, r, kc.grad_atol(r))


def test_binding_refuses_pieces_that_share_rows(be):
    q = torch.randn(1, 20, 2, 64).bfloat16()
    out, lse = torch.empty_like(q), torch.empty(1, 2, 20)
    two = [(0, 10, 0, 10, None, None), (5, 15, 10, 20, None, None)]
    with pytest.raises(ValueError, match="pieces 0 and 1 share query rows"):
        be._ext.fwd(q, q, q, out, lse, 0.125, two, 0.0)
    keys = [(0, 10, 0, 10, None, None), (10, 20, 5, 15, None, None)]
    be._ext.fwd(q, q, q, out, lse, 0.125, keys, 0.0)  # the forward may share keys
    g = torch.empty(1, 20, 2, 64)
    with pytest.raises(ValueError, match="pieces 0 and 1 share keys"):
        be._ext.bwd(out, q, q, q, out, lse, g, torch.empty_like(g), torch.empty_like(g), 0.125,
                    keys, 0.0, False)
    with pytest.raises(ValueError, match="needs lo <= hi"):
        be._ext.fwd(q, q, q, out, lse, 0.125, [(0, 20, 0, 20, 5, 2)], 0.0)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_backend_api_and_strided_views(be, dtype):
    kc.check_backend_api_and_strided_views(be, "cpu", dtype, s=133)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_merge_kernel_matches_torch_merge(be, dtype):
    kc.check_merge_kernel(be, "cpu", dtype)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "stripe"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("heads", [(2, 2), (4, 1)], ids=["mha", "mqa"])
def test_fused_ring_equals_unfused_and_reference(be, layout, causal, heads):
    # 24-token zigzag chunks: ragged tiles in every block
    kc.check_fused_ring(be, "cpu", layout, causal, heads, world=4, seq=8 * 24, d=64)


@pytest.mark.parametrize("layout,causal,heads", [("zigzag", True, (2, 2)),
                                                 ("stripe", False, (4, 1))],
                         ids=["zigzag-causal-mha", "stripe-full-mqa"])
def test_fused_ring_mla(be, layout, causal, heads):
    """MLA's (192, 128): the fused epilogues merge and add at V's head dim (out_acc, dV)."""
    kc.check_fused_ring(be, "cpu", layout, causal, heads, world=4, seq=8 * 12, d=192,
                        dtype=torch.float16 if causal else torch.bfloat16, d_v=128)


# ---------------------------------------------------------------------------------------------
# dist_flash_attn(..., backend="emulate") on gloo CPU ranks
# ---------------------------------------------------------------------------------------------
CHUNK = {2: 33, 4: 17}  # tokens per zigzag chunk: 132 and 136 tokens, local blocks cross tiles


def emulate_cases(world: int) -> list[Case]:
    """Every mesh shape and placement x layout x causal (contiguous causal with both the
    helper and the plain ring schedule); heads, head_dim, batch and dtype cycle."""
    cases, i = [], 0
    for u, r, placement in mesh_shapes(world):
        for layout in ("contiguous", "zigzag", "stripe"):
            for causal in (False, True):
                schedules = ("auto", "ring") if layout == "contiguous" and causal else ("auto",)
                for schedule in schedules:
                    cases.append(Case(world, u, r, placement, layout, causal, 4,
                                      (4, 2, 1)[i % 3], (64, 128)[(i // 3) % 2],
                                      (1, 2)[(i // 2) % 2], ("bf16", "fp16")[i % 2], "emulate",
                                      schedule))
                    i += 1
    return cases


# (causal, window, softcap, docs): sliding windows narrower and wider than a tile, an
# asymmetric non-causal window, softcap, packed documents (alone, and with a window and
# softcap together).
VARIANTS = (
    (True, (20, 0), 0.0, ""),
    (False, (10, 70), 0.0, ""),
    (True, None, 2.0, ""),
    (False, None, 0.0, "random"),
    (True, (4, 0), 1.5, "mixed"),
)


def variant_cases(world: int) -> list[Case]:
    """Every mesh and layout (packed with documents) runs one variant, cycling."""
    cases, i = [], 0
    for u, r, placement in mesh_shapes(world):
        for layout in ("contiguous", "zigzag", "stripe", "packed"):
            causal, window, softcap, docs = VARIANTS[i % len(VARIANTS)]
            docs = docs or ("one" if layout == "packed" else "")
            cases.append(Case(world, u, r, placement, layout, causal, 4, (4, 2, 1)[i % 3], 64,
                              1, ("bf16", "fp16")[i % 2], "emulate", "auto", docs, window,
                              softcap))
            i += 1
    return cases


def _errors(got, math_val, ref):
    """(kernel error, math error, max |ref|) over the entries where ref is finite."""
    fin = torch.isfinite(ref)
    got, math_val, ref = got[fin], math_val[fin], ref[fin]
    return (kc.max_err(got, ref), kc.max_err(math_val, ref),
            ref.abs().max().item() if ref.numel() else 0.0)


def _attention_and_grads(q, k, v, dout, visible, softcap):
    """(out, lse, dq, dk, dv) of plain tensor math in q's dtype (dist_cases.dense_attention)."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = dense_attention(q, k, v, visible, softcap=softcap)
    return (out.detach(), lse.detach(), *torch.autograd.grad(out, (q, k, v), dout))


def run_emulate_case(case: Case, mesh) -> dict:
    """One case on this rank: errors of the SP result and of single-device PyTorch math in the
    same dtype, both against fp64 on the full tensors, restricted to this rank's real tokens
    (layouts with documents add padding slots)."""
    dtype = DTYPES[case.dtype]
    gen = torch.Generator().manual_seed(zlib.crc32(case.id.encode()))
    cu = case.cu_seqlens
    S = case.seq_len if cu else 2 * case.world * CHUNK[case.world]
    B, D = case.batch, case.head_dim
    q, k, v, dout = (kc.rand(shape, dtype, gen, "cpu") for shape in
                     ((B, S, case.hq, D), (B, S, case.hkv, D), (B, S, case.hkv, case.dv),
                      (B, S, case.hq, case.dv)))
    visible = visibility(S, cu, case.causal, case.window)
    ref = _attention_and_grads(*(t.double() for t in (q, k, v, dout)), visible, case.softcap)
    math = _attention_and_grads(q, k, v, dout, visible, case.softcap)

    def local(t, dim=1):
        return distattn.shard(t, mesh, dim=dim, layout=case.layout, cu_seqlens=cu)

    real = local_indices(S, mesh, case.layout, cu) >= 0
    ql, kl, vl = (local(t).clone().requires_grad_() for t in (q, k, v))
    out, lse = distattn.dist_flash_attn(ql, kl, vl, mesh=mesh, causal=case.causal,
                                        layout=case.layout, backend=case.backend,
                                        schedule=case.schedule, return_lse=True,
                                        cu_seqlens=cu, window=case.window,
                                        softcap=case.softcap or None)
    out.backward(local(dout))
    got = (out, lse, ql.grad, kl.grad, vl.grad)
    res = {"dtype_ok": out.dtype == dtype and ql.grad.dtype == dtype and lse.dtype == torch.float32,
           "lse_inf_ok": torch.equal(torch.isinf(lse[:, :, real]),
                                     torch.isinf(local(ref[1], dim=2)[:, :, real]))}
    for i, name in enumerate(("out", "lse", "dq", "dk", "dv")):
        pick = (lambda t: t[:, :, real]) if name == "lse" else (lambda t: t[:, real])
        dim = 2 if name == "lse" else 1
        res[name] = _errors(pick(got[i].detach()), pick(local(math[i], dim)),
                            pick(local(ref[i], dim)))
    return res


def run_emulate_cases(rank: int, world: int, cases: list[Case]) -> dict:
    meshes = Meshes()
    return {c.id: run_emulate_case(c, meshes.get(c.ulysses, c.placement)) for c in cases}


def cases_for(world: int) -> list[Case]:
    return emulate_cases(world) + variant_cases(world)


DIST_CASES = [c for w in (2, 4) for c in cases_for(w)]


@pytest.fixture(scope="module")
def world_results():
    cache = {}

    def get(world):
        if world not in cache:
            cache[world] = run_world(world, run_emulate_cases, cases_for(world))
        return cache[world]
    return get


@pytest.mark.parametrize("case", DIST_CASES, ids=[c.id for c in DIST_CASES])
def test_dist_flash_attn_emulate_matches_fp64(world_results, case):
    for rank, res in enumerate(world_results(case.world)):
        r = res[case.id]
        kc.assert_dist_rule(rank, r)


def test_dist_matrix_covers_meshes_layouts_and_heads():
    seen = lambda attr: {getattr(c, attr) for c in DIST_CASES}
    assert {(c.world, c.ulysses, c.ring, c.placement) for c in DIST_CASES} == {
        (w, u, r, p) for w in (2, 4) for u, r, p in mesh_shapes(w)}
    assert seen("causal") == {False, True}
    assert seen("hkv") == {4, 2, 1} and seen("head_dim") == {64, 128}
    assert seen("dtype") == {"bf16", "fp16"} and seen("schedule") == {"auto", "ring"}
    assert seen("layout") >= {"packed"} and {c.docs for c in DIST_CASES} >= {"one", "mixed",
                                                                             "random"}
    assert any(c.window for c in DIST_CASES) and any(c.softcap for c in DIST_CASES)


# ---------------------------------------------------------------------------------------------
# The binding refuses outputs that share memory with inputs or with each other
# ---------------------------------------------------------------------------------------------
def test_aliased_outputs_are_refused(be):
    ext = be._ext
    gen = torch.Generator().manual_seed(5)
    q = kc.rand((1, 70, 2, 64), torch.bfloat16, gen, "cpu")
    lse = torch.empty(1, 2, 70)
    whole, causal = [(0, 70, 0, 70, None, None)], [(0, 70, 0, 70, None, 0)]
    with pytest.raises(ValueError, match="out shares memory with q"):
        ext.fwd(q, q, q, q, lse, 0.125, whole, 0.0)
    big = torch.empty(1, 71, 2, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="out shares memory with k"):
        ext.fwd(q, big[:, 1:], q, big[:, :70], lse, 0.125, whole, 0.0)  # shifted by one row
    with pytest.raises(ValueError, match="expanded view"):
        ext.fwd(q, q, q, torch.empty(1, 1, 2, 64, dtype=q.dtype).expand(1, 70, 2, 64), lse,
                0.125, whole, 0.0)
    acc = torch.zeros(1, 70, 2, 64)
    with pytest.raises(ValueError, match="out_acc shares memory with lse_acc"):
        ext.fwd_acc(q, q, q, acc, acc.view(-1)[:140].view(1, 2, 70), 0.125, whole, 0.0)
    out, lse = be.forward(q, q, q, scale=0.125, mask=Mask.causal(0))
    g = torch.zeros(1, 70, 2, 64)
    with pytest.raises(ValueError, match="dq shares memory with dk"):
        ext.bwd(out, q, q, q, out, lse, g, g, torch.zeros_like(g), 0.125, causal, 0.0, False)


def test_dk_dv_in_one_packed_buffer_are_not_aliases(be):
    """Two halves of one [B, S, 2, H, D] buffer share storage but no element: allowed, and
    the same gradients as separate tensors."""
    gen = torch.Generator().manual_seed(6)
    q, k, v, dout = (kc.rand((1, 70, 2, 64), torch.bfloat16, gen, "cpu") for _ in range(4))
    out, lse = be.forward(q, k, v, scale=0.125, mask=Mask.causal(0))
    dq, dk, dv = be.backward(dout, q, k, v, out, lse, scale=0.125, mask=Mask.causal(0))
    packed = torch.zeros(1, 70, 2, 2, 64)
    dq2 = torch.zeros(1, 70, 2, 64)
    be.backward_into(dout, q, k, v, out, lse, dq2, packed[:, :, 0], packed[:, :, 1],
                     scale=0.125, mask=Mask.causal(0))
    assert torch.equal(dq2, dq) and torch.equal(packed[:, :, 0], dk)
    assert torch.equal(packed[:, :, 1], dv)
