"""Checks of the csrc kernels, shared by the GPU tests (tests/test_cuda_kernels.py, backend
``cuda``) and the host tests (tests/test_emulate.py, backend ``emulate``: the same kernels on
the CPU CTA emulator). Each check takes the backend object and the device to run on.

Rule (FlashAttention's): the kernel's max error against fp64 is at most twice the error of
plain PyTorch math in the same dtype (also against fp64), plus a small atol; no NaN anywhere.
Inputs are random (never zeros); outputs are poisoned with NaN before each kernel run so a
row the kernel forgets to write fails the check.
"""
from __future__ import annotations

import math

import pytest
import torch

from distattn.kernels import Mask
from distattn.kernels.base import BlockAttention
from distattn.kernels.reference import ReferenceBackend
from distattn.merge import merge_ as torch_merge_


def rand(shape, dtype, gen, device):
    # Random, never zero, unit variance.
    return torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)


def generator(device, seed):
    return torch.Generator(device=device).manual_seed(seed)


def math_in_dtype(q, k, v, dout, scale, mask, softcap=0.0):
    """Attention written out in q's dtype (what "PyTorch math in the same dtype" means):
    (out, lse, dq, dk, dv), all in q's dtype except lse."""
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    g = q.shape[2] // k.shape[2]
    kk, vv = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, kk) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    visible = mask.dense(q.shape[1], k.shape[1], device=q.device)
    sees_some = visible.any(dim=-1, keepdim=True)  # [Sq, 1]
    s = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s.float(), dim=-1)  # -inf for rows that see nothing
    # Rows that see nothing: softmax of zeros, then weight 0 (no NaN, zero gradients).
    p = torch.softmax(s.masked_fill(~sees_some, 0.0), dim=-1) * sees_some
    out = torch.einsum("bhqk,bkhd->bqhd", p, vv)
    out.backward(dout)
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


def reference(q, k, v, dout, scale, mask, softcap=0.0):
    """fp64 ground truth (out, lse, dq, dk, dv)."""
    ref = ReferenceBackend()
    q64, k64, v64, do64 = (t.double() for t in (q, k, v, dout))
    out, lse = ref.forward(q64, k64, v64, scale=scale, mask=mask, softcap=softcap)
    dq, dk, dv = ref.backward(do64, q64, k64, v64, out, lse, scale=scale, mask=mask,
                              softcap=softcap)
    return out, lse, dq, dk, dv


def max_err(x, ref):
    return (x.double() - ref).abs().max().item() if x.numel() else 0.0


def assert_close_2x(name, got, math_val, ref, atol):
    assert not torch.isnan(got).any(), f"{name}: NaN in kernel output"
    err, err_math = max_err(got, ref), max_err(math_val, ref)
    bound = 2 * err_math + atol
    assert err <= bound, f"{name}: kernel err {err:.3g} > 2 x math err {err_math:.3g} + {atol:g}"


def assert_lse(got, ref_lse, math_lse, atol=1e-3):
    assert not torch.isnan(got).any(), "lse: NaN"
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(got), empty), "lse: -inf rows differ from the reference"
    assert (got[empty] < 0).all(), "lse: +inf where -inf expected"
    fin = ~empty
    if fin.any():
        assert_close_2x("lse", got[fin], math_lse[fin], ref_lse[fin], atol)


def grad_atol(ref):
    return 1e-3 + 1e-3 * ref.abs().max().item()


def assert_dist_rule(rank: int, r: dict) -> None:
    """A distributed emulate result ``r`` (per name: error vs fp64, the same-dtype math
    error, the reference's max) meets FlashAttention's rule on ``rank``: dtypes kept, the
    same -inf lse rows, every error within 2 x the math error + a small atol."""
    assert r["dtype_ok"], f"rank {rank}: output, gradient or lse dtype changed"
    assert r["lse_inf_ok"], f"rank {rank}: rows with lse = -inf differ from the reference"
    for name in ("out", "lse", "dq", "dk", "dv"):
        err, err_math, ref_max = r[name]
        atol = 1e-3 if name in ("out", "lse") else 1e-3 + 1e-3 * ref_max
        assert err <= 2 * err_math + atol, (
            f"rank {rank}: {name} err {err:.3g} > 2 x math err {err_math:.3g} + {atol:.2g}")


def ext_pieces(mask: Mask, sq: int, sk: int) -> list[tuple]:
    """The extension's pieces (q0, q1, k0, k1, lo, hi) of a mask: each piece's full span (rows
    that see nothing included, so the kernel handles them), band in piece coordinates."""
    out = []
    for p in mask.simplify(sq, sk).pieces:
        q0, q1, k0, k1 = p.span(sq, sk)
        local = p.shifted(q0, k0)
        out.append((q0, q1, k0, k1, local.lo, local.hi))
    return out


def check_forward_backward(be, device, dtype, d, shape, mask, softcap=0.0, seed=0, d_v=None):
    """The extension's fwd and bwd (one call each, so the mask's pieces must have disjoint
    rows and keys) on poisoned outputs against fp64, FlashAttention's rule. ``d`` is q/k's
    head dim, ``d_v`` V's (and out's; default ``d``; MLA: (192, 128))."""
    sq, sk, hq, hkv = shape
    d_v = d if d_v is None else d_v
    b = 2 if sq * sk < 10 ** 6 else 1
    gen = generator(device, seed)
    q = rand((b, sq, hq, d), dtype, gen, device)
    k = rand((b, sk, hkv, d), dtype, gen, device)
    v = rand((b, sk, hkv, d_v), dtype, gen, device)
    dout = rand((b, sq, hq, d_v), dtype, gen, device)
    scale = d ** -0.5
    ext = be._ext

    simple = mask.simplify(sq, sk)
    out = torch.full_like(dout, float("nan"))
    lse = torch.full((b, hq, sq), float("nan"), device=device)
    dq = torch.full(q.shape, float("nan"), device=device)
    dk = torch.full(k.shape, float("nan"), device=device)
    dv = torch.full(v.shape, float("nan"), device=device)
    pieces = ext_pieces(simple, sq, sk)
    ext.fwd(q, k, v, out, lse, scale, pieces, softcap)
    ext.bwd(dout, q, k, v, out, lse, dq, dk, dv, scale, pieces, softcap, False)
    if device != "cpu":
        torch.cuda.synchronize()

    r_out, r_lse, r_dq, r_dk, r_dv = reference(q, k, v, dout, scale, mask, softcap)
    m_out, m_lse, m_dq, m_dk, m_dv = math_in_dtype(q, k, v, dout, scale, mask, softcap)
    assert_close_2x("out", out, m_out, r_out, atol=1e-3)
    assert_lse(lse, r_lse, m_lse)
    empty_rows = torch.isinf(r_lse).transpose(1, 2)  # [B, Sq, Hq]
    assert (out[empty_rows] == 0).all(), "rows that see nothing must have out == 0"
    for name, got, m, r in (("dq", dq, m_dq, r_dq), ("dk", dk, m_dk, r_dk),
                            ("dv", dv, m_dv, r_dv)):
        assert_close_2x(name, got, m, r, atol=grad_atol(r))


def check_bad_inputs(be, device):
    """The backend's check and the extension refuse bad inputs with Python errors naming them."""
    q = torch.randn(1, 8, 2, 64, device=device, dtype=torch.float16)
    out = torch.empty_like(q)
    lse = torch.empty(1, 2, 8, device=device)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        be.check(q.float(), q.float(), q.float())
    with pytest.raises(ValueError, match="head_dim"):
        be.check(q[..., :48], q[..., :48], q[..., :48])
    with pytest.raises(ValueError, match="multiple"):
        be.check(q, q[:, :, :1].repeat(1, 1, 3, 1), q[:, :, :1].repeat(1, 1, 3, 1))
    good = dict(q=q, k=q, v=q, out=out, lse=lse, scale=0.125,
                pieces=[(0, 8, 0, 8, None, None)], softcap=0.0)
    bad = [dict(out=out.float()), dict(lse=lse.half()), dict(scale=-1.0),
           dict(softcap=float("nan")), dict(q=q[:, :, :, ::2].contiguous()[..., :32]),
           dict(pieces=[(0, 9, 0, 8, None, None)])]
    if device != "cpu":
        bad.append(dict(k=q.cpu()))
    for change in bad:
        with pytest.raises((TypeError, ValueError, RuntimeError)):
            be._ext.fwd(**{**good, **change})


def check_backend_api_and_strided_views(be, device, dtype, s=333):
    """Through the backend object: q/k/v sliced out of a packed qkv buffer, lse written into a
    slice of a bigger buffer by the fused step, results equal to contiguous inputs, and a
    deterministic backward."""
    gen = generator(device, 1)
    b, h, d = 2, 4, 128
    qkv = rand((b, s, 3, h, d), dtype, gen, device)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    mask = Mask.causal(3)
    out, lse = be.forward(q, k, v, scale=0.1, mask=mask)
    out_c, lse_c = be.forward(q.contiguous(), k.contiguous(), v.contiguous(), scale=0.1,
                              mask=mask)
    assert torch.equal(out, out_c) and torch.equal(lse, lse_c)
    # accumulators as slices of bigger buffers
    big_out = torch.full((b, s + 5, h, d), float("nan"), device=device)
    big_lse = torch.full((b, h, s + 7), float("nan"), device=device)
    out_acc, lse_acc = big_out[:, 5:], big_lse[:, :, 2:2 + s]
    out_acc.zero_()
    lse_acc.fill_(float("-inf"))
    be.forward_into(q, k, v, out_acc, lse_acc, scale=0.1, mask=mask)
    torch.testing.assert_close(out_acc.to(dtype), out, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(lse_acc, lse, atol=1e-5, rtol=1e-5)
    assert torch.isnan(big_out[:, :5]).all() and torch.isnan(big_lse[:, :, :2]).all(), \
        "the fused step wrote outside its views"
    dout = rand(q.shape, dtype, gen, device)
    g1 = be.backward(dout, q, k, v, out, lse, scale=0.1, mask=mask)
    g2 = be.backward(dout, q, k, v, out, lse, scale=0.1, mask=mask)
    for a, c in zip(g1, g2):
        assert torch.equal(a, c), "backward must be deterministic"


def check_merge_kernel(be, device, dtype):
    """The standalone merge kernel equals the torch merge, guards included."""
    gen = generator(device, 2)
    b, s, h, d = 2, 77, 3, 40
    out_acc = torch.randn(b, s, h, d, device=device, generator=gen)
    lse_acc = torch.randn(b, h, s, device=device, generator=gen)
    out_blk = torch.randn(b, s, h, d, device=device, generator=gen).to(dtype)
    lse_blk = torch.randn(b, h, s, device=device, generator=gen)
    lse_acc[:, :, :5] = float("-inf")
    out_acc[:, :5] = float("nan")  # a dead accumulator must not leak NaN
    lse_blk[:, :, 3:9] = float("-inf")
    want_out, want_lse = out_acc.clone(), lse_acc.clone()
    want_out[:, :5] = 0
    torch_merge_(want_out, want_lse, out_blk, lse_blk)
    be.merge_(out_acc, lse_acc, out_blk, lse_blk)
    both_empty = torch.isinf(want_lse)
    assert torch.equal(torch.isinf(lse_acc), both_empty)
    torch.testing.assert_close(lse_acc[~both_empty], want_lse[~both_empty], atol=1e-5, rtol=1e-5)
    live = ~both_empty.transpose(1, 2)
    assert not torch.isnan(out_acc[live]).any()
    torch.testing.assert_close(out_acc[live], want_out[live], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# The fused ring step over a simulated ring (all ranks' blocks in one process)
# ---------------------------------------------------------------------------------------------
def segments(layout, rank, world, seq):
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


def positions(layout, rank, world, seq):
    return torch.cat([torch.arange(p, p + step * n, step) for _, n, p, step in
                      segments(layout, rank, world, seq)])


def block_mask(qseg, kseg, causal):
    """Mask between two runs with the same step: key j visible to query i iff
    kpos0 + step*j <= qpos0 + step*i, i.e. causal((qpos0 - kpos0) // step)."""
    if not causal:
        return Mask.none()
    (_, _, qp, step), (_, _, kp, _) = qseg, kseg
    return Mask.causal((qp - kp) // step)


def ring(backend_fwd_into, backend_bwd_into, q, k, v, dout, out_final, lse_final, layout,
         world, causal, scale):
    """Run every rank's ring steps with the given step functions, all on q's device; returns
    the per-rank (out, lse) accumulators and the global (dq, dk, dv) in sequence order."""
    b, seq, hq, d = q.shape
    hkv, d_v = k.shape[2], v.shape[3]
    acc = dict(device=q.device, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    pos = [positions(layout, r, world, seq).to(q.device) for r in range(world)]
    segs = [segments(layout, r, world, seq) for r in range(world)]

    def blocks(r, s):  # (query slice, key slice, mask) of rank r's queries x rank s's keys
        for qseg in segs[r]:
            for kseg in segs[s]:
                yield (slice(qseg[0], qseg[0] + qseg[1]), slice(kseg[0], kseg[0] + kseg[1]),
                       block_mask(qseg, kseg, causal))

    dq = torch.zeros(b, seq, hq, d, **acc)
    dk = torch.zeros(b, seq, hkv, d, **acc)
    dv = torch.zeros(b, seq, hkv, d_v, **acc)
    outs, lses = [], []
    for r in range(world):
        q_r = q[:, pos[r]]
        out_acc = torch.zeros(b, len(pos[r]), hq, d_v, **acc)
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
            dv_s = torch.zeros(b, len(pos[s]), hkv, d_v, **acc)
            for qs, ks, mask in blocks(r, s):
                backend_bwd_into(do_r[:, qs], q_r[:, qs], k_s[:, ks], v_s[:, ks], out_r[:, qs],
                                 lse_r[:, :, qs], dq_r[:, qs], dk_s[:, ks], dv_s[:, ks],
                                 scale=scale, mask=mask)
            dk[:, pos[s]] += dk_s
            dv[:, pos[s]] += dv_s
        dq[:, pos[r]] += dq_r
    return outs, lses, dq, dk, dv


def check_fused_ring(be, device, layout, causal, heads, world, seq, d, dtype=torch.bfloat16,
                     d_v=None):
    """The fused ring step (forward_into / backward_into in the kernels) equals the unfused one
    (forward + merge, backward + add) and fp64 attention over the whole sequence. ``d_v``:
    V's head dim (default ``d``)."""
    hq, hkv = heads
    d_v = d if d_v is None else d_v
    gen = generator(device, 3)
    q = rand((1, seq, hq, d), dtype, gen, device)
    k = rand((1, seq, hkv, d), dtype, gen, device)
    v = rand((1, seq, hkv, d_v), dtype, gen, device)
    dout = rand((1, seq, hq, d_v), dtype, gen, device)
    scale = d ** -0.5
    full_mask = Mask.causal(0) if causal else Mask.none()
    out_final, lse_final = be.forward(q, k, v, scale=scale, mask=full_mask)

    def unfused_fwd(*a, **kw):
        BlockAttention.forward_into(be, *a, **kw)

    def unfused_bwd(*a, **kw):
        BlockAttention.backward_into(be, *a, **kw)

    fused = ring(be.forward_into, be.backward_into, q, k, v, dout, out_final, lse_final,
                 layout, world, causal, scale)
    plain = ring(unfused_fwd, unfused_bwd, q, k, v, dout, out_final, lse_final, layout,
                 world, causal, scale)
    r_out, r_lse, r_dq, r_dk, r_dv = reference(q, k, v, dout, scale, full_mask)
    m_out, m_lse, m_dq, m_dk, m_dv = math_in_dtype(q, k, v, dout, scale, full_mask)
    for r in range(world):
        pos = positions(layout, r, world, seq).to(device)
        for name, (outs, lses) in (("fused", fused[:2]), ("unfused", plain[:2])):
            assert not torch.isnan(outs[r]).any(), f"{name} rank {r}: NaN"
            assert_close_2x(f"{name} out rank {r}", outs[r], m_out[:, pos], r_out[:, pos], 1e-3)
            assert_lse(lses[r], r_lse[:, :, pos], m_lse[:, :, pos])
        torch.testing.assert_close(fused[0][r], plain[0][r], atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(fused[1][r], plain[1][r], atol=1e-4, rtol=1e-4)
    for name, i, m, ref in (("dq", 2, m_dq, r_dq), ("dk", 3, m_dk, r_dk), ("dv", 4, m_dv, r_dv)):
        atol = grad_atol(ref)
        assert_close_2x(f"fused {name}", fused[i], m, ref, atol)
        assert_close_2x(f"unfused {name}", plain[i], m, ref, atol)
        torch.testing.assert_close(fused[i], plain[i], atol=1e-4 + 1e-4 * math.sqrt(seq),
                                   rtol=1e-3)
