"""The ``cuda`` backend (csrc kernels) against the fp64 reference.

Every GPU test is ``@pytest.mark.cuda`` and skips when ``distattn._C`` or a GPU is missing.
Rule (FlashAttention's): the kernel's max error against fp64 is at most twice the error of
plain PyTorch math in the same dtype (also against fp64), plus a small atol; no NaN anywhere.
Inputs are random (never zeros); outputs are poisoned with NaN before each kernel run so a
row the kernel forgets to write fails the test.

The CPU tests at the top check that a build without the extension says so clearly.
"""
from __future__ import annotations

import math

import pytest
import torch

from distattn.kernels import Mask, get_backend
from distattn.kernels.base import BlockAttention
from distattn.kernels.cuda import CudaBackend, extension_error
from distattn.kernels.reference import ReferenceBackend

EXT_ERROR = extension_error()
needs_gpu = pytest.mark.skipif(EXT_ERROR is not None, reason=f"cuda backend absent: {EXT_ERROR}")


# ---------------------------------------------------------------------------------------------
# CPU: the absent extension is reported, never a crash or a silent fallback.
# ---------------------------------------------------------------------------------------------
def test_extension_error_is_a_reason_or_none():
    err = extension_error()
    assert err is None or (isinstance(err, str) and err and "\n" not in err)
    if err is None:
        assert torch.cuda.is_available()


def test_get_backend_cuda_raises_clearly_when_absent():
    if extension_error() is None:
        pytest.skip("the extension is available here")
    q = torch.randn(1, 4, 2, 64)
    with pytest.raises(RuntimeError, match="backend='cuda' is not available"):
        get_backend("cuda", q, q, q)
    assert CudaBackend().applicable(q, q, q) is False
    # auto never picks it without the extension
    assert get_backend("auto", q, q, q).name != "cuda"


def test_check_names_the_argument_on_cpu_tensors():
    q = torch.randn(1, 4, 2, 64)
    with pytest.raises((RuntimeError, ValueError), match="cuda"):
        CudaBackend().check(q, q, q)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def _rand(shape, dtype, gen, device="cuda"):
    # Random, never zero; a little larger than unit variance so softmax is not flat.
    return (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * 1.0
            ).to(dtype)


def _math_in_dtype(q, k, v, dout, scale, mask):
    """Attention written out in q's dtype (what "PyTorch math in the same dtype" means):
    (out, lse, dq, dk, dv), all in q's dtype except lse."""
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    g = q.shape[2] // k.shape[2]
    kk, vv = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, kk) * scale
    visible = mask.dense(q.shape[1], k.shape[1], device=q.device)
    sees_some = visible.any(dim=-1, keepdim=True)  # [Sq, 1]
    s = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s.float(), dim=-1)  # -inf for rows that see nothing
    # Rows that see nothing: softmax of zeros, then weight 0 (no NaN, zero gradients).
    p = torch.softmax(s.masked_fill(~sees_some, 0.0), dim=-1) * sees_some
    out = torch.einsum("bhqk,bkhd->bqhd", p, vv)
    out.backward(dout)
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


def _reference(q, k, v, dout, scale, mask):
    """fp64 ground truth (out, lse, dq, dk, dv)."""
    ref = ReferenceBackend()
    q64, k64, v64, do64 = (t.double() for t in (q, k, v, dout))
    out, lse = ref.forward(q64, k64, v64, scale=scale, mask=mask)
    dq, dk, dv = ref.backward(do64, q64, k64, v64, out, lse, scale=scale, mask=mask)
    return out, lse, dq, dk, dv


def _max_err(x, ref):
    return (x.double() - ref).abs().max().item() if x.numel() else 0.0


def _assert_close_2x(name, got, math_val, ref, atol):
    assert not torch.isnan(got).any(), f"{name}: NaN in kernel output"
    err, err_math = _max_err(got, ref), _max_err(math_val, ref)
    bound = 2 * err_math + atol
    assert err <= bound, f"{name}: kernel err {err:.3g} > 2 x math err {err_math:.3g} + {atol:g}"


def _assert_lse(got, ref_lse, math_lse, atol=1e-3):
    assert not torch.isnan(got).any(), "lse: NaN"
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(got), empty), "lse: -inf rows differ from the reference"
    assert (got[empty] < 0).all(), "lse: +inf where -inf expected"
    fin = ~empty
    if fin.any():
        _assert_close_2x("lse", got[fin], math_lse[fin], ref_lse[fin], atol)


MASKS = [Mask.none(), Mask.causal(0), Mask.causal(-1), Mask.causal(-17), Mask.causal(5),
         Mask.causal(100), Mask.causal(-1500)]
# (Sq, Sk, Hq, Hkv): odd lengths, GQA and MQA, one-token blocks.
SHAPES = [(1, 1, 2, 2), (17, 17, 4, 2), (17, 1000, 4, 1), (1000, 17, 6, 3),
          (1000, 1000, 4, 4), (4097, 4097, 2, 1)]


def _run_case(dtype, d, shape, mask, seed=0):
    sq, sk, hq, hkv = shape
    b = 2 if sq * sk < 10 ** 6 else 1
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = _rand((b, sq, hq, d), dtype, gen)
    k = _rand((b, sk, hkv, d), dtype, gen)
    v = _rand((b, sk, hkv, d), dtype, gen)
    dout = _rand((b, sq, hq, d), dtype, gen)
    scale = d ** -0.5
    from distattn import _C  # noqa: PLC0415  (only importable with the extension)

    simple = mask.simplify(sq, sk)
    causal = simple.kind == "causal"
    offset = simple.offset if causal else 0
    out = torch.full_like(q, float("nan"))
    lse = torch.full((b, hq, sq), float("nan"), device="cuda")
    if simple.kind == "empty":
        out.zero_()
        lse.fill_(float("-inf"))
    else:
        _C.fwd(q, k, v, out, lse, scale, causal, offset)
    dq = torch.full(q.shape, float("nan"), device="cuda")
    dk = torch.full(k.shape, float("nan"), device="cuda")
    dv = torch.full(v.shape, float("nan"), device="cuda")
    if simple.kind == "empty":
        for t in (dq, dk, dv):
            t.zero_()
    else:
        _C.bwd(dout, q, k, v, out, lse, dq, dk, dv, scale, causal, offset, False)
    torch.cuda.synchronize()

    r_out, r_lse, r_dq, r_dk, r_dv = _reference(q, k, v, dout, scale, mask)
    m_out, m_lse, m_dq, m_dk, m_dv = _math_in_dtype(q, k, v, dout, scale, mask)
    _assert_close_2x("out", out, m_out, r_out, atol=1e-3)
    _assert_lse(lse, r_lse, m_lse)
    empty_rows = torch.isinf(r_lse).transpose(1, 2)  # [B, Sq, Hq]
    assert (out[empty_rows] == 0).all(), "rows that see nothing must have out == 0"
    for name, got, m, r in (("dq", dq, m_dq, r_dq), ("dk", dk, m_dk, r_dk),
                            ("dv", dv, m_dv, r_dv)):
        _assert_close_2x(name, got, m, r, atol=1e-3 + 1e-3 * r.abs().max().item())


# ---------------------------------------------------------------------------------------------
# GPU: forward, lse and gradients
# ---------------------------------------------------------------------------------------------
@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("mask", MASKS, ids=repr)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_backward_against_fp64(dtype, d, mask, shape):
    _run_case(dtype, d, shape, mask)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_backend_api_and_strided_views(dtype):
    """Through CudaBackend: q/k/v sliced out of a packed qkv buffer, lse written into a slice of
    a bigger buffer by the fused step, results equal to contiguous inputs."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    b, s, h, d = 2, 333, 4, 128
    qkv = _rand((b, s, 3, h, d), dtype, gen)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    be = get_backend("cuda", q, k, v)
    from distattn.kernels import CUDA_KERNELS_VERIFIED
    assert be.name == "cuda"
    # auto picks the kernels once they are marked verified on hardware (issue 3)
    assert (get_backend("auto", q, k, v).name == "cuda") == CUDA_KERNELS_VERIFIED
    mask = Mask.causal(3)
    out, lse = be.forward(q, k, v, scale=0.1, mask=mask)
    out_c, lse_c = be.forward(q.contiguous(), k.contiguous(), v.contiguous(), scale=0.1,
                              mask=mask)
    assert torch.equal(out, out_c) and torch.equal(lse, lse_c)
    # accumulators as slices of bigger buffers
    big_out = torch.full((b, s + 5, h, d), float("nan"), device="cuda")
    big_lse = torch.full((b, h, s + 7), float("nan"), device="cuda")
    out_acc, lse_acc = big_out[:, 5:], big_lse[:, :, 2:2 + s]
    out_acc.zero_()
    lse_acc.fill_(float("-inf"))
    be.forward_into(q, k, v, out_acc, lse_acc, scale=0.1, mask=mask)
    torch.testing.assert_close(out_acc.to(dtype), out, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(lse_acc, lse, atol=1e-5, rtol=1e-5)
    assert torch.isnan(big_out[:, :5]).all() and torch.isnan(big_lse[:, :, :2]).all(), \
        "the fused step wrote outside its views"
    dout = _rand(q.shape, dtype, gen)
    g1 = be.backward(dout, q, k, v, out, lse, scale=0.1, mask=mask)
    g2 = be.backward(dout, q, k, v, out, lse, scale=0.1, mask=mask)
    for a, c in zip(g1, g2):
        assert torch.equal(a, c), "backward must be deterministic"


@pytest.mark.cuda
@needs_gpu
def test_bad_inputs_raise_python_errors():
    from distattn import _C  # noqa: PLC0415
    q = torch.randn(1, 8, 2, 64, device="cuda", dtype=torch.float16)
    out = torch.empty_like(q)
    lse = torch.empty(1, 2, 8, device="cuda")
    be = CudaBackend()
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        be.check(q.float(), q.float(), q.float())
    with pytest.raises(ValueError, match="head_dim"):
        be.check(q[..., :48], q[..., :48], q[..., :48])
    with pytest.raises(ValueError, match="multiple"):
        be.check(q, q[:, :, :1].repeat(1, 1, 3, 1), q[:, :, :1].repeat(1, 1, 3, 1))
    with pytest.raises((TypeError, ValueError, RuntimeError)):
        _C.fwd(q, q, q, out.float(), lse, 0.125, False, 0)   # out dtype
    with pytest.raises((TypeError, ValueError, RuntimeError)):
        _C.fwd(q, q, q, out, lse.half(), 0.125, False, 0)    # lse dtype
    with pytest.raises((TypeError, ValueError, RuntimeError)):
        _C.fwd(q, q.cpu(), q, out, lse, 0.125, False, 0)     # device
    with pytest.raises((TypeError, ValueError, RuntimeError)):
        _C.fwd(q, q, q, out, lse, -1.0, False, 0)            # scale
    with pytest.raises((TypeError, ValueError, RuntimeError)):
        _C.fwd(q[:, :, :, ::2].contiguous()[..., :32], q, q, out, lse, 0.1, False, 0)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_merge_kernel_matches_torch_merge(dtype):
    gen = torch.Generator(device="cuda").manual_seed(2)
    b, s, h, d = 2, 77, 3, 40
    out_acc = torch.randn(b, s, h, d, device="cuda", generator=gen)
    lse_acc = torch.randn(b, h, s, device="cuda", generator=gen)
    out_blk = torch.randn(b, s, h, d, device="cuda", generator=gen).to(dtype)
    lse_blk = torch.randn(b, h, s, device="cuda", generator=gen)
    lse_acc[:, :, :5] = float("-inf")
    out_acc[:, :5] = float("nan")  # a dead accumulator must not leak NaN
    lse_blk[:, :, 3:9] = float("-inf")
    from distattn.merge import merge_  # noqa: PLC0415
    want_out, want_lse = out_acc.clone(), lse_acc.clone()
    want_out[:, :5] = 0
    merge_(want_out, want_lse, out_blk, lse_blk)
    CudaBackend.merge_(out_acc, lse_acc, out_blk, lse_blk)
    both_empty = torch.isinf(want_lse)
    assert torch.equal(torch.isinf(lse_acc), both_empty)
    torch.testing.assert_close(lse_acc[~both_empty], want_lse[~both_empty], atol=1e-5, rtol=1e-5)
    live = ~both_empty.transpose(1, 2)
    assert not torch.isnan(out_acc[live]).any()
    torch.testing.assert_close(out_acc[live], want_out[live], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# GPU: the fused ring step over a simulated ring (all ranks' blocks on one GPU)
# ---------------------------------------------------------------------------------------------
def _segments(layout, rank, world, seq):
    """This rank's local tokens as runs (local_start, length, first global position, step)."""
    n = seq // world
    if layout == "contiguous":
        return [(0, n, rank * n, 1)]
    if layout == "zigzag":
        c = seq // (2 * world)
        return [(0, c, rank * c, 1), (c, c, (2 * world - 1 - rank) * c, 1)]
    if layout == "stripe":
        return [(0, n, rank, world)]
    raise ValueError(layout)


def _positions(layout, rank, world, seq):
    return torch.cat([torch.arange(p, p + step * n, step) for _, n, p, step in
                      _segments(layout, rank, world, seq)])


def _block_mask(qseg, kseg, causal):
    """Mask between two runs with the same step: key j visible to query i iff
    kpos0 + step*j <= qpos0 + step*i, i.e. causal((qpos0 - kpos0) // step)."""
    if not causal:
        return Mask.none()
    (_, _, qp, step), (_, _, kp, _) = qseg, kseg
    return Mask.causal((qp - kp) // step)


def _ring(backend_fwd_into, backend_bwd_into, q, k, v, dout, out_final, lse_final, layout,
          world, causal, scale):
    """Run every rank's ring steps with the given step functions, all on q's device; returns
    the per-rank (out, lse) accumulators and the global (dq, dk, dv) in sequence order."""
    b, seq, hq, d = q.shape
    hkv = k.shape[2]
    acc = dict(device=q.device, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    pos = [_positions(layout, r, world, seq).to(q.device) for r in range(world)]
    segs = [_segments(layout, r, world, seq) for r in range(world)]

    def blocks(r, s):  # (query slice, key slice, mask) of rank r's queries x rank s's keys
        for qseg in segs[r]:
            for kseg in segs[s]:
                yield (slice(qseg[0], qseg[0] + qseg[1]), slice(kseg[0], kseg[0] + kseg[1]),
                       _block_mask(qseg, kseg, causal))

    dq = torch.zeros(b, seq, hq, d, **acc)
    dk = torch.zeros(b, seq, hkv, d, **acc)
    dv = torch.zeros(b, seq, hkv, d, **acc)
    outs, lses = [], []
    for r in range(world):
        q_r = q[:, pos[r]]
        out_acc = torch.zeros(b, len(pos[r]), hq, d, **acc)
        lse_acc = torch.full((b, hq, len(pos[r])), float("-inf"), **acc)
        for s in range(world):
            k_s, v_s = k[:, pos[s]], v[:, pos[s]]
            for qs, ks, mask in blocks(r, s):
                backend_fwd_into(q_r[:, qs], k_s[:, ks], v_s[:, ks], out_acc[:, qs],
                                 lse_acc[:, :, qs], scale=scale, mask=mask)
        outs.append(out_acc)
        lses.append(lse_acc)
    # Backward with the final out/lse of the full attention, as the ring executor does.
    for r in range(world):
        q_r, do_r = q[:, pos[r]], dout[:, pos[r]]
        out_r, lse_r = out_final[:, pos[r]], lse_final[:, :, pos[r]]
        dq_r = torch.zeros(b, len(pos[r]), hq, d, **acc)
        for s in range(world):
            k_s, v_s = k[:, pos[s]], v[:, pos[s]]
            dk_s = torch.zeros(b, len(pos[s]), hkv, d, **acc)
            dv_s = torch.zeros(b, len(pos[s]), hkv, d, **acc)
            for qs, ks, mask in blocks(r, s):
                backend_bwd_into(do_r[:, qs], q_r[:, qs], k_s[:, ks], v_s[:, ks], out_r[:, qs],
                                 lse_r[:, :, qs], dq_r[:, qs], dk_s[:, ks], dv_s[:, ks],
                                 scale=scale, mask=mask)
            dk[:, pos[s]] += dk_s
            dv[:, pos[s]] += dv_s
        dq[:, pos[r]] += dq_r
    return outs, lses, dq, dk, dv


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "stripe"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_ring_simulation_is_exact_with_reference_backend(layout, causal):
    """CPU check of the simulation itself (block masks of each layout): with the fp64
    reference backend the simulated ring reproduces full attention to 1e-10."""
    world, seq = 4, 8 * 5
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(1, seq, 2, 8, dtype=torch.float64, generator=gen)
    k = torch.randn(1, seq, 1, 8, dtype=torch.float64, generator=gen)
    v = torch.randn(1, seq, 1, 8, dtype=torch.float64, generator=gen)
    dout = torch.randn(1, seq, 2, 8, dtype=torch.float64, generator=gen)
    be = ReferenceBackend()
    mask = Mask.causal(0) if causal else Mask.none()
    out, lse = be.forward(q, k, v, scale=0.3, mask=mask)
    outs, lses, dq, dk, dv = _ring(be.forward_into, be.backward_into, q, k, v, dout, out, lse,
                                   layout, world, causal, 0.3)
    for r in range(world):
        pos = _positions(layout, r, world, seq)
        torch.testing.assert_close(outs[r], out[:, pos], atol=1e-10, rtol=0)
        torch.testing.assert_close(lses[r], lse[:, :, pos], atol=1e-10, rtol=0)
    for got, want in zip((dq, dk, dv), be.backward(dout, q, k, v, out, lse, scale=0.3,
                                                   mask=mask)):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "stripe"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("heads", [(4, 4), (4, 1)], ids=["mha", "mqa"])
def test_fused_ring_equals_unfused_and_reference(layout, causal, heads):
    world, seq, d = 4, 8 * 131, 64  # 131-token zigzag chunks: ragged tiles everywhere
    hq, hkv = heads
    dtype = torch.bfloat16
    gen = torch.Generator(device="cuda").manual_seed(3)
    q = _rand((1, seq, hq, d), dtype, gen)
    k = _rand((1, seq, hkv, d), dtype, gen)
    v = _rand((1, seq, hkv, d), dtype, gen)
    dout = _rand((1, seq, hq, d), dtype, gen)
    scale = d ** -0.5
    be = CudaBackend()
    full_mask = Mask.causal(0) if causal else Mask.none()
    out_final, lse_final = be.forward(q, k, v, scale=scale, mask=full_mask)

    def unfused_fwd(*a, **kw):
        BlockAttention.forward_into(be, *a, **kw)

    def unfused_bwd(*a, **kw):
        BlockAttention.backward_into(be, *a, **kw)

    fused = _ring(be.forward_into, be.backward_into, q, k, v, dout, out_final, lse_final,
                  layout, world, causal, scale)
    plain = _ring(unfused_fwd, unfused_bwd, q, k, v, dout, out_final, lse_final, layout,
                  world, causal, scale)
    r_out, r_lse, r_dq, r_dk, r_dv = _reference(q, k, v, dout, scale, full_mask)
    m_out, m_lse, m_dq, m_dk, m_dv = _math_in_dtype(q, k, v, dout, scale, full_mask)
    for r in range(world):
        pos = _positions(layout, r, world, seq).cuda()
        for name, (outs, lses) in (("fused", fused[:2]), ("unfused", plain[:2])):
            assert not torch.isnan(outs[r]).any(), f"{name} rank {r}: NaN"
            _assert_close_2x(f"{name} out rank {r}", outs[r], m_out[:, pos], r_out[:, pos], 1e-3)
            _assert_lse(lses[r], r_lse[:, :, pos], m_lse[:, :, pos])
        torch.testing.assert_close(fused[0][r], plain[0][r], atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(fused[1][r], plain[1][r], atol=1e-4, rtol=1e-4)
    for name, i, m, ref in (("dq", 2, m_dq, r_dq), ("dk", 3, m_dk, r_dk), ("dv", 4, m_dv, r_dv)):
        atol = 1e-3 + 1e-3 * ref.abs().max().item()
        _assert_close_2x(f"fused {name}", fused[i], m, ref, atol)
        _assert_close_2x(f"unfused {name}", plain[i], m, ref, atol)
        torch.testing.assert_close(fused[i], plain[i], atol=1e-4 + 1e-4 * math.sqrt(seq),
                                   rtol=1e-3)
