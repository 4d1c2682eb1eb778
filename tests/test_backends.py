"""Block-attention backends (reference, torch) and the merge, on one process."""
import pytest
import torch

from distattn.kernels import Mask, ReferenceBackend, TorchBackend, get_backend
from distattn.kernels.torch_sdpa import causal_pieces
from distattn.merge import merge_, new_accumulators

MASKS = [Mask.none(), Mask.causal(0), Mask.causal(-1), Mask.causal(2), Mask.causal(-3),
         Mask.causal(1), Mask.causal(-9), Mask.causal(9), Mask.empty()]
SHAPES = [(5, 7), (6, 6), (9, 5), (1, 1), (1, 4), (4, 1)]


def _inputs(sq, sk, hq, hkv, d=8, b=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)
    return mk(b, sq, hq, d), mk(b, sk, hkv, d), mk(b, sk, hkv, d), mk(b, sq, hq, d)


def _dense_reference(q, k, v, scale, mask):
    """Independent math: expand K/V heads and use a dense mask (no grouped view)."""
    g = q.shape[2] // k.shape[2]
    kk, vv = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, kk) * scale
    vis = mask.dense(q.shape[1], k.shape[1])
    s = s.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.nan_to_num(torch.exp(s - lse.unsqueeze(-1)), nan=0.0)
    return torch.einsum("bhqk,bkhd->bqhd", p, vv), lse


@pytest.mark.parametrize("mask", MASKS, ids=repr)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)])
def test_backends_match_independent_math(mask, shape, heads):
    sq, sk = shape
    q, k, v, dout = _inputs(sq, sk, *heads)
    scale = 0.37
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = _dense_reference(*leaves, scale, mask)
    ref_grads = torch.autograd.grad(ref_out, leaves, dout, allow_unused=True,
                                    materialize_grads=True)
    for backend in (ReferenceBackend(), TorchBackend()):
        out, lse = backend.forward(q, k, v, scale=scale, mask=mask)
        assert lse.dtype == torch.float64 and out.dtype == q.dtype
        assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), backend.name
        assert not torch.isnan(out).any() and not torch.isnan(lse).any()
        fin = torch.isfinite(ref_lse)
        torch.testing.assert_close(lse[fin], ref_lse[fin], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out, ref_out.detach(), rtol=1e-12, atol=1e-12)
        grads = backend.backward(dout, q, k, v, ref_out.detach(), ref_lse.detach(),
                                 scale=scale, mask=mask)
        for name, g, rg in zip("qkv", grads, ref_grads):
            torch.testing.assert_close(g.double(), rg, rtol=1e-11, atol=1e-11,
                                       msg=f"{backend.name} d{name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_backend_low_precision_within_2x_of_pytorch_math(dtype):
    q, k, v, _ = _inputs(33, 33, 4, 2, d=32, dtype=dtype, seed=3)
    ref, _ = _dense_reference(q.double(), k.double(), v.double(), 0.2, Mask.causal(0))
    math_same_dtype, _ = _dense_reference(q.float(), k.float(), v.float(), 0.2, Mask.causal(0))
    math_err = (math_same_dtype.to(dtype).double() - ref).abs().max().item()
    out, lse = TorchBackend().forward(q, k, v, scale=0.2, mask=Mask.causal(0))
    assert lse.dtype == torch.float32 and out.dtype == dtype
    err = (out.double() - ref).abs().max().item()
    assert err <= 2 * math_err + 1e-5, (err, math_err)


def test_causal_pieces_cover_each_visible_pair_once():
    for sq in range(1, 7):
        for sk in range(1, 7):
            for off in range(-8, 9):
                mask = Mask.causal(off)
                count = torch.zeros(sq, sk, dtype=torch.int64)
                for p in causal_pieces(mask, sq, sk):
                    if p.causal:
                        assert p.q1 - p.q0 == p.k1 - p.k0
                        count[p.q0:p.q1, p.k0:p.k1] += Mask.causal(0).dense(p.q1 - p.q0,
                                                                           p.k1 - p.k0)
                    else:
                        count[p.q0:p.q1, p.k0:p.k1] += 1
                assert torch.equal(count, mask.dense(sq, sk).long()), (sq, sk, off)


def test_merge_equals_joint_softmax_and_is_stable():
    q, k, v, _ = _inputs(6, 10, 2, 2)
    full_out, full_lse = ReferenceBackend().forward(q, k, v, scale=0.5, mask=Mask.none())
    out_acc, lse_acc = new_accumulators(q, torch.float64)
    for ks in (slice(0, 3), slice(3, 10)):
        o, l = ReferenceBackend().forward(q, k[:, ks], v[:, ks], scale=0.5, mask=Mask.none())
        merge_(out_acc, lse_acc, o, l)
    torch.testing.assert_close(out_acc, full_out, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(lse_acc, full_lse, rtol=1e-13, atol=1e-13)
    # -inf on either side, both sides, and huge magnitudes: exact, never NaN
    out_acc, lse_acc = new_accumulators(q, torch.float32)
    empty_o, empty_l = new_accumulators(q, torch.float32)
    merge_(out_acc, lse_acc, empty_o, empty_l)
    assert torch.isneginf(lse_acc).all() and (out_acc == 0).all()
    o = torch.randn(out_acc.shape)
    l = torch.full(lse_acc.shape, 1e30)
    merge_(out_acc, lse_acc, o, l)
    assert torch.equal(out_acc, o) and torch.equal(lse_acc, l)
    merge_(out_acc, lse_acc, empty_o, empty_l)
    assert torch.equal(out_acc, o) and torch.equal(lse_acc, l)


def test_auto_backend_choice_and_errors():
    q, k, v, _ = _inputs(4, 4, 2, 2)
    assert get_backend("auto", q, k, v).name == "torch"
    assert get_backend("reference", q, k, v).name == "reference"
    with pytest.raises(ValueError, match="backend must be one of"):
        get_backend("fast", q, k, v)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="backend='cuda' is not available"):
            get_backend("cuda", q, k, v)


def test_mask_validation():
    with pytest.raises(ValueError):
        Mask("diagonal")
    with pytest.raises(ValueError):
        Mask((3,))
    assert Mask.causal(5).simplify(3, 4) == Mask.none()
    assert Mask.causal(-3).simplify(3, 4) == Mask.empty()


def test_backend_without_windows_or_softcap_is_refused_by_name(monkeypatch):
    """A backend that cannot run bands or softcap is refused before any communication (the
    cuda backend today); "auto" never picks one for such a call."""
    import distattn.kernels as kernels

    class NoBands(ReferenceBackend):
        name = "nobands"
        supports_bands = False
        supports_softcap = False

    q, k, v, _ = _inputs(4, 4, 2, 2)
    monkeypatch.setattr(kernels, "_get_backend", lambda *a: NoBands())
    with pytest.raises(ValueError, match="sliding windows and softcap.*'torch' or 'reference'"):
        kernels.get_backend("cuda", q, k, v, window=True, softcap=True)
    assert kernels.get_backend("cuda", q, k, v).name == "nobands"


@pytest.mark.parametrize("native_gqa", [True, False])
@pytest.mark.parametrize("mask", [Mask.none(), Mask.causal(0), Mask.causal(-3),
                                  Mask.causal(2)], ids=repr)
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)])
def test_torch_ring_step_into_strided_accumulators(monkeypatch, native_gqa, mask, heads):
    """TorchBackend.forward_into / backward_into (the ring step: each kernel call merged or
    added straight into the accumulators) on strided accumulator views that already hold a
    partial result, GQA in one call (CPU native) and per group, vs the reference backend."""
    from distattn.kernels import torch_sdpa
    monkeypatch.setattr(torch_sdpa, "_NATIVE_GQA_CPU", native_gqa and torch_sdpa._NATIVE_GQA_CPU)
    sq, sk = 9, 7
    q, k, v, dout = _inputs(sq, sk, *heads)
    out_f, lse_f = ReferenceBackend().forward(q, k, v, scale=0.3, mask=Mask.none())
    got, want = [], []
    for backend, sink in ((TorchBackend(), got), (ReferenceBackend(), want)):
        g = torch.Generator().manual_seed(3)
        out_acc = torch.randn(2, sq + 2, heads[0], 8, generator=g, dtype=torch.float64)[:, 2:]
        lse_acc = torch.randn(2, heads[0], sq + 2, generator=g, dtype=torch.float64)[:, :, 2:]
        backend.forward_into(q, k, v, out_acc, lse_acc, scale=0.3, mask=mask)
        accs = [torch.randn(2, n + 1, h, 8, generator=g, dtype=torch.float64)[:, 1:]
                for n, h in ((sq, heads[0]), (sk, heads[1]), (sk, heads[1]))]
        backend.backward_into(dout, q, k, v, out_f, lse_f, *accs, scale=0.3, mask=mask)
        sink += [out_acc, lse_acc, *accs]
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11, msg=name)
