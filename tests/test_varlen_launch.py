"""Varlen launches (distattn/kernels/varlen.py) and the torch backend's varlen path.

On CPU:
- the launch builder against ``Mask.dense`` by brute force: every visible pair of a block is
  shown by exactly one launch sequence, no hidden pair by any (random masks, and the document
  masks of real layouts);
- the backend's varlen path end to end, with the ATen varlen ops replaced by ``StandIn``: float64
  CPU code written from FlashAttention-2's varlen semantics (per-sequence bottom-right windows
  with the kernel's normalisations, GQA, lse [Hq, total_q], out = 0 / lse = +inf for a row with
  no key) and stricter than the kernel where the backend must not depend on it (it checks the
  arguments and leaves gradients of filler sequences as NaN).

On a GPU (``pytest -m cuda tests/test_varlen_launch.py``): the same cases through PyTorch's real
varlen flash ops in fp16/bf16.
"""
import random

import pytest
import torch

from distattn.kernels import Mask, ReferenceBackend, TorchBackend
from distattn.kernels.mask import Piece
from distattn.kernels.torch_sdpa import FlashVarlenOps
from distattn.kernels.varlen import MAX_SEQUENCES, arrays, launches
from distattn.layout import ring_layout
from distattn.plan import ring_plan
from fake_cuda import mesh  # noqa: F401  (a one-rank gloo mesh)


# -- FlashAttention-2's varlen semantics, written out -----------------------------------------
def flash_window(left, right, is_causal, max_q, max_k):
    """The (left, right) FA2 applies, after mha_varlen_fwd / set_params_fprop normalise them:
    both -1 (no window) or both >= 0."""
    left = -1 if left is None else left
    right = (0 if is_causal else -1) if right is None else right
    if max_q == 1:
        is_causal = False
    if is_causal:
        right = 0
    if left >= max_k:
        left = -1
    if right >= max_k:
        right = -1
    if left < 0 and right >= 0:
        left = max_k
    if left >= 0 and right < 0:
        right = max_k
    return left, right


def flash_visible(nq, nk, left, right):
    """[nq, nk] bool: query i of the sequence sees key j (bottom-right aligned window)."""
    i = torch.arange(nq).unsqueeze(1)
    j = torch.arange(nk).unsqueeze(0)
    if left < 0 and right < 0:
        return torch.ones(nq, nk, dtype=torch.bool)
    shift = i + nk - nq
    return (j >= shift - left) & (j <= shift + right)


def _sequences(cu_q, cu_k):
    cq, ck = cu_q.tolist(), cu_k.tolist()
    return [(cq[s], cq[s + 1], ck[s], ck[s + 1]) for s in range(len(cq) - 1)]


class StandIn:
    """CPU float64 stand-in for ``aten._flash_attention_forward`` / ``_backward`` (varlen)."""

    def __init__(self):
        self.calls = []

    def _check(self, query, key, value, cu_q, cu_k, max_q, max_k, dropout_p):
        assert query.dim() == key.dim() == value.dim() == 3
        assert all(t.stride(-1) == 1 for t in (query, key, value))
        assert query.shape[1] % key.shape[1] == 0 and key.shape == value.shape
        for cu, total in ((cu_q, query.shape[0]), (cu_k, key.shape[0])):
            assert cu.dtype == torch.int32 and cu.dim() == 1 and cu.is_contiguous()
            assert cu[0] == 0 and cu[-1] == total and bool((cu[1:] >= cu[:-1]).all())
        assert cu_q.numel() == cu_k.numel() and 1 <= cu_q.numel() - 1 <= MAX_SEQUENCES
        assert max_q >= 2, "max_q == 1 takes FA2's single-query path, not emulated"
        assert max_q >= int((cu_q[1:] - cu_q[:-1]).max()) and \
            max_k >= int((cu_k[1:] - cu_k[:-1]).max())
        assert dropout_p == 0.0

    @staticmethod
    def _scores(query, key, a, b, c, d, scale, left, right):
        hq, hkv = query.shape[1], key.shape[1]
        qs = query[a:b].reshape(b - a, hkv, hq // hkv, -1)
        s = torch.einsum("qhgd,khd->hgqk", qs, key[c:d]) * scale
        vis = flash_visible(b - a, d - c, left, right)
        return s.masked_fill(~vis, float("-inf")), vis

    def forward(self, query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
                is_causal, return_debug_mask, *, scale=None, window_size_left=None,
                window_size_right=None, seqused_k=None, alibi_slopes=None, block_table=None,
                num_splits=None):
        self._check(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p)
        assert not return_debug_mask and seqused_k is None and alibi_slopes is None
        self.calls.append(("forward", query, key, value))
        left, right = flash_window(window_size_left, window_size_right, is_causal, max_q, max_k)
        hq, total = query.shape[1], query.shape[0]
        out = torch.zeros_like(query)
        lse = torch.full((hq, total), float("inf"), dtype=torch.float64)
        for a, b, c, d in _sequences(cum_seq_q, cum_seq_k):
            if a == b or c == d:     # no query: nothing; no key: out 0, lse +inf (FA2)
                continue
            s, vis = self._scores(query, key, a, b, c, d, scale, left, right)
            l = torch.logsumexp(s, -1)                       # [hkv, g, nq]
            p = torch.where(vis, torch.exp(s - l.unsqueeze(-1)), torch.zeros(()))
            p = torch.nan_to_num(p, nan=0.0)
            out[a:b] = torch.einsum("hgqk,khd->qhgd", p, value[c:d]).reshape(b - a, hq, -1)
            lse[:, a:b] = torch.where(torch.isfinite(l), l, float("inf")).reshape(hq, b - a)
        return out, lse, torch.zeros(2), torch.zeros(()), torch.empty(0)

    def backward(self, grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q,
                 max_k, dropout_p, is_causal, rng_state, unused, *, scale=None,
                 window_size_left=None, window_size_right=None):
        self._check(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p)
        assert out.dtype == grad_out.dtype == query.dtype
        assert out.shape == grad_out.shape == query.shape
        assert logsumexp.shape == (query.shape[1], query.shape[0]) and logsumexp.is_contiguous()
        self.calls.append(("backward", query, key, value))
        left, right = flash_window(window_size_left, window_size_right, is_causal, max_q, max_k)
        hq, hkv = query.shape[1], key.shape[1]
        g = hq // hkv
        # Rows of sequences without keys, keys of sequences without queries: unspecified.
        dq, dk, dv = (torch.full_like(t, float("nan")) for t in (query, key, value))
        for a, b, c, d in _sequences(cum_seq_q, cum_seq_k):
            if a == b or c == d:
                continue
            s, vis = self._scores(query, key, a, b, c, d, scale, left, right)
            lse = logsumexp[:, a:b].reshape(hkv, g, b - a).unsqueeze(-1)
            p = torch.where(vis, torch.exp(s - lse), torch.zeros(()))   # lse = +inf: p = 0
            do = grad_out[a:b].reshape(b - a, hkv, g, -1)
            o = out[a:b].reshape(b - a, hkv, g, -1)
            dp = torch.einsum("qhgd,khd->hgqk", do, value[c:d])
            delta = (do * o).sum(-1).permute(1, 2, 0).unsqueeze(-1)
            ds = p * (dp - delta)
            dq[a:b] = (torch.einsum("hgqk,khd->qhgd", ds, key[c:d]) * scale).reshape(b - a, hq, -1)
            qs = query[a:b].reshape(b - a, hkv, g, -1)
            dk[c:d] = torch.einsum("hgqk,qhgd->khd", ds, qs) * scale
            dv[c:d] = torch.einsum("hgqk,qhgd->khd", p, do)
        return dq, dk, dv

    def ops(self):
        return FlashVarlenOps(self.forward, self.backward, ("cpu",), (torch.float64,))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only contend (on a shared 2-core machine, 1000x)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def standin(monkeypatch):
    s = StandIn()
    monkeypatch.setattr(TorchBackend, "varlen_ops", s.ops())
    return s


# -- masks ------------------------------------------------------------------------------------
def _cuts(rng, n, parts):
    inner = sorted(rng.sample(range(1, n), min(parts, n - 1))) if n > 1 else []
    bounds = [0] + inner + [n]
    return list(zip(bounds[:-1], bounds[1:]))


def random_mask(rng, sq, sk):
    """Disjoint band pieces: cells of a random row partition x key partition (so pieces share
    rows and keys), each with random bounds on j - i, some cells left out."""
    pieces = []
    for q0, q1 in _cuts(rng, sq, rng.randint(0, 4)):
        for k0, k1 in _cuts(rng, sk, rng.randint(0, 4)):
            if rng.random() < 0.3:
                continue
            lo = rng.choice([None, None, rng.randint(-sq, sk)])
            hi = rng.choice([None, rng.randint(-sq, sk)])
            pieces.append(Piece(q0, q1, k0, k1, lo, hi))
    return Mask(tuple(pieces))


def document_masks():
    """(mask, n) of every ring step of real layouts with documents: n x n blocks."""
    out = []
    docs = [(0, 7, 40, 41, 100), (0, 1, 2, 3, 50, 97), (0, 64), (0, 30, 31, 64)]
    for layout in ("contiguous", "zigzag", "stripe", "packed"):
        for cu in docs:
            for world in (2, 4):
                lay = ring_layout(layout, cu[-1], world, 1, cu_seqlens=cu)
                for causal, window in ((True, None), (False, None), (True, (5, 0)),
                                       (False, (3, 4))):
                    plan = ring_plan(lay, causal=causal, window=window)
                    for r in range(world):
                        out.extend((m, lay.part_len) for m in plan.masks(r))
    return out


# -- (1) the launch builder ------------------------------------------------------------------
def check_cover(mask, sq, sk, batch):
    """Every visible pair of ``batch`` stacked blocks shown by exactly one sequence."""
    count = torch.zeros(batch * sq, batch * sk, dtype=torch.int64)
    for L in launches(mask, sq, sk):
        a = arrays(L, batch, sq, sk)
        assert L.left >= -1 and L.right >= -1
        assert a.total_q == (batch - 1) * sq + L.q1 - L.q0
        assert a.total_k == (batch - 1) * sk + L.k1 - L.k0
        left, right = flash_window(L.left, L.right, L.is_causal, a.max_q, a.max_k)
        for q0, q1, k0, k1 in _sequences(torch.tensor(a.cu_q), torch.tensor(a.cu_k)):
            if q1 > q0 and k1 > k0:
                rows, cols = L.q0 + q0, L.k0 + k0
                count[rows:rows + q1 - q0, cols:cols + k1 - k0] += \
                    flash_visible(q1 - q0, k1 - k0, left, right)
        band_rows = sorted(i - L.q0 for b in L.bands for i in range(b.q0, b.q1))
        band_keys = sorted(j - L.k0 for b in L.bands for j in range(b.k0, b.k1))
        assert list(a.keep_q or range(L.q1 - L.q0)) == band_rows
        assert list(a.keep_k or range(L.k1 - L.k0)) == band_keys
    dense = mask.dense(sq, sk).long()
    assert torch.equal(count, torch.block_diag(*[dense] * batch)), mask


@pytest.mark.parametrize("seed", range(3))
def test_launches_cover_random_masks_exactly_once(seed):
    rng = random.Random(seed)
    for _ in range(150):
        sq, sk = rng.randint(1, 24), rng.randint(1, 24)
        check_cover(random_mask(rng, sq, sk), sq, sk, rng.choice([1, 1, 2, 3]))


def test_launches_cover_single_pieces_and_documents():
    for sq, sk in ((5, 7), (9, 5), (1, 4), (4, 1), (6, 6), (130, 3)):
        for off in range(-10, 11, 3):
            check_cover(Mask.causal(off), sq, sk, 2)
        for lo, hi in ((-2, 0), (-4, 3), (0, 0), (1, 5), (-300, 2)):
            check_cover(Mask.band(lo, hi), sq, sk, 1)
        check_cover(Mask.none(), sq, sk, 3)
        check_cover(Mask.empty(), sq, sk, 1)
    for mask, n in document_masks():
        check_cover(mask, n, n, 1)


def test_document_blocks_need_few_launches():
    """A layout's pieces of one document merge back into one band, so a causal diagonal block
    of any layout and document set is a single launch."""
    worst = {}
    docs = [(0, 7, 40, 41, 100), (0, 1, 2, 3, 50, 97), (0, 5, 9, 60, 61, 62, 64)]
    for layout in ("contiguous", "zigzag", "stripe", "packed"):
        for cu in docs:
            lay = ring_layout(layout, cu[-1], 4, 1, cu_seqlens=cu)
            plan = ring_plan(lay, causal=True)
            for r in range(4):
                for t, m in enumerate(plan.masks(r)):
                    n = len(launches(m, lay.part_len, lay.part_len))
                    worst[layout, t > 0] = max(worst.get((layout, t > 0), 0), n)
    assert all(n == 1 for (layout, off), n in worst.items() if not off), worst
    assert all(n <= 2 for n in worst.values()), worst


# -- (2) the backend's varlen path with the stand-in ------------------------------------------
def _inputs(b, sq, sk, hq, hkv, d=8, seed=0, stacked=True):
    g = torch.Generator().manual_seed(seed)
    mk = lambda s, h: torch.randn(b, s, h, d, generator=g, dtype=torch.float64)
    if stacked:
        return mk(sq, hq), mk(sk, hkv), mk(sk, hkv), mk(sq, hq)
    # Row views of longer tensors: the batch does not stack, so one unit per batch element.
    cut = lambda t, s: t[:, 3:3 + s]
    return (cut(mk(sq + 5, hq), sq), cut(mk(sk + 5, hkv), sk), cut(mk(sk + 5, hkv), sk),
            cut(mk(sq + 5, hq), sq))


def _poison_holes(mask, q, k, v, dout):
    """NaN in rows that see no key and keys no row sees (padding-like slots)."""
    dense = mask.dense(q.shape[1], k.shape[1])
    dead_q, dead_k = ~dense.any(1), ~dense.any(0)
    for t in (q, dout):
        t[:, dead_q] = float("nan")
    for t in (k, v):
        t[:, dead_k] = float("nan")
    return dead_q


def run_case(standin, mask, b, sq, sk, hq, hkv, seed=0, stacked=True):
    q, k, v, dout = _inputs(b, sq, sk, hq, hkv, seed=seed, stacked=stacked)
    dead = _poison_holes(mask, q, k, v, dout)
    scale = 0.41
    ref, tb = ReferenceBackend(), TorchBackend()
    tol = dict(rtol=1e-10, atol=1e-10)

    standin.calls.clear()
    out, lse = tb.forward(q, k, v, scale=scale, mask=mask)
    r_out, r_lse = ref.forward(q, k, v, scale=scale, mask=mask)
    n_launch = len(launches(mask, sq, sk))
    units = 1 if stacked else b
    assert len(standin.calls) == units * n_launch
    if stacked:   # q/k/v reach the kernel as views of the caller's tensors
        for _, cq, ck, cv in standin.calls:
            for got, mine in ((cq, q), (ck, k), (cv, v)):
                assert got.untyped_storage().data_ptr() == mine.untyped_storage().data_ptr()
    assert out.dtype == q.dtype and lse.dtype == torch.float64
    assert torch.equal(torch.isinf(lse), torch.isinf(r_lse))
    assert not torch.isnan(lse).any() and not torch.isnan(out[:, ~dead]).any()
    fin = torch.isfinite(r_lse)
    torch.testing.assert_close(lse[fin], r_lse[fin], **tol)
    torch.testing.assert_close(out[:, ~dead], r_out[:, ~dead], **tol)

    # The ring step: fold into accumulators that already hold something.
    g = torch.Generator().manual_seed(seed + 1)
    acc_o = torch.randn(out.shape, generator=g, dtype=torch.float64)
    acc_l = torch.randn(lse.shape, generator=g, dtype=torch.float64)
    acc_l[:, :, ::3] = float("-inf")
    acc_o[:, ::3] = 0
    mine_o, mine_l, ref_o, ref_l = acc_o.clone(), acc_l.clone(), acc_o.clone(), acc_l.clone()
    tb.forward_into(q, k, v, mine_o, mine_l, scale=scale, mask=mask)
    ref.forward_into(q, k, v, ref_o, ref_l, scale=scale, mask=mask)
    assert torch.equal(torch.isinf(mine_l), torch.isinf(ref_l))
    torch.testing.assert_close(mine_l[torch.isfinite(ref_l)], ref_l[torch.isfinite(ref_l)],
                               **tol)
    torch.testing.assert_close(mine_o, ref_o, **tol)

    # Backward with the final (out, lse) of these rows: here this block is all they see.
    f_out, f_lse = r_out.clone(), r_lse.clone()
    grads = tb.backward(dout, q, k, v, f_out, f_lse, scale=scale, mask=mask)
    r_grads = ref.backward(dout, q, k, v, f_out, f_lse, scale=scale, mask=mask)
    for name, got, want in zip("qkv", grads, r_grads):
        assert not torch.isnan(got).any(), name
        torch.testing.assert_close(got, want, **tol, msg=f"d{name}")
    accs = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (q, k, v)]
    mine, theirs = [a.clone() for a in accs], [a.clone() for a in accs]
    tb.backward_into(dout, q, k, v, f_out, f_lse, *mine, scale=scale, mask=mask)
    ref.backward_into(dout, q, k, v, f_out, f_lse, *theirs, scale=scale, mask=mask)
    for name, got, want in zip("qkv", mine, theirs):
        torch.testing.assert_close(got, want, **tol, msg=f"d{name} (into)")


HEADS = [(4, 4), (4, 2), (4, 1)]


@pytest.mark.parametrize("heads", HEADS)
def test_varlen_backend_single_pieces(standin, heads):
    masks = [Mask.none(), Mask.causal(0), Mask.causal(-2), Mask.causal(3), Mask.causal(-7),
             Mask.band(-3, 0), Mask.band(-2, 4), Mask.band(1, 6), Mask.empty()]
    for i, mask in enumerate(masks):
        run_case(standin, mask, 2, 9, 7, *heads, seed=i)
        run_case(standin, mask, 1, 5, 11, *heads, seed=i)


@pytest.mark.parametrize("heads", HEADS)
def test_varlen_backend_random_masks(standin, heads):
    rng = random.Random(sum(heads))
    for i in range(12):
        sq, sk = rng.randint(1, 20), rng.randint(1, 20)
        run_case(standin, random_mask(rng, sq, sk), rng.choice([1, 2]), sq, sk, *heads,
                 seed=i, stacked=rng.random() < 0.7)


def test_varlen_backend_document_masks(standin):
    rng = random.Random(5)
    cases = document_masks()
    for i, (mask, n) in enumerate(rng.sample(cases, 40)):
        run_case(standin, mask, 1, n, n, *HEADS[i % 3], seed=i)


def test_varlen_gaps_and_fillers(standin):
    """Rows and keys between the pieces of one launch (fillers), a long gap (cut into several
    fillers), and pieces sharing rows (two launches)."""
    mask = Mask((Piece(0, 3, 0, 2, None, None), Piece(5, 9, 4, 9, None, None),
                 Piece(200, 203, 150, 152, None, None), Piece(200, 203, 156, 160, None, -43)))
    launch_list = launches(mask, 210, 170)
    assert len(launch_list) == 2
    assert any(arrays(L, 2, 210, 170).sequences > 2 * len(L.bands) for L in launch_list)
    run_case(standin, mask, 2, 210, 170, 4, 2)
    run_case(standin, mask, 2, 210, 170, 2, 2, stacked=False)


def test_varlen_path_is_only_taken_where_configured(standin):
    q, k, v, dout = _inputs(1, 6, 6, 2, 2)
    TorchBackend().forward(q, k, v, scale=0.3, mask=Mask.causal(0), softcap=5.0)
    TorchBackend().forward(q.float(), k.float(), v.float(), scale=0.3, mask=Mask.causal(0))
    assert standin.calls == []
    TorchBackend().forward(q, k, v, scale=0.3, mask=Mask.causal(0))
    assert len(standin.calls) == 1


def test_varlen_wrong_lse_layout_raises(monkeypatch):
    s = StandIn()

    def padded_lse(*args, **kwargs):     # the padded [B, Hq, max_q] layout of older kernels
        out, lse, *rest = s.forward(*args, **kwargs)
        return (out, lse.unsqueeze(0), *rest)

    monkeypatch.setattr(TorchBackend, "varlen_ops",
                        FlashVarlenOps(padded_lse, s.backward, ("cpu",), (torch.float64,)))
    q, k, v, _ = _inputs(1, 6, 6, 2, 2)
    with pytest.raises(RuntimeError, match="unpadded varlen lse"):
        TorchBackend().forward(q, k, v, scale=0.3, mask=Mask.causal(0))


# -- on a GPU: the real kernels ---------------------------------------------------------------
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads", HEADS)
def test_real_varlen_kernels_match_reference(monkeypatch, dtype, heads):
    """PyTorch's varlen flash ops through the torch backend against the fp64 reference: out,
    lse, dq, dk, dv within twice the error of the per-piece path (the backend without varlen
    launches, same dtype) plus a small margin. The margins are a first guess, to be confirmed
    by the first GPU run."""
    assert TorchBackend.varlen_ops is not None, "this PyTorch lacks the varlen window arguments"
    margin = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2}[dtype]
    rng = random.Random(0)
    cases = [(Mask.causal(0), 2, 256, 256), (Mask.causal(-64), 2, 200, 300),
             (Mask.band(-50, 0), 1, 256, 256), (Mask.none(), 3, 100, 130)]
    cases += [(m, 1, n, n) for m, n in rng.sample(document_masks(), 12)]
    cases += [(random_mask(rng, 90, 70), 2, 90, 70) for _ in range(6)]
    hq, hkv = heads
    varlen_ops = TorchBackend.varlen_ops
    for mask, b, sq, sk in cases:
        g = torch.Generator().manual_seed(sq * sk)
        mk = lambda s, h: torch.randn(b, s, h, 64, generator=g, dtype=torch.float64)
        q64, k64, v64, do64 = mk(sq, hq), mk(sk, hkv), mk(sk, hkv), mk(sq, hq)
        q, k, v, dout = (t.to("cuda", dtype) for t in (q64, k64, v64, do64))
        ref = ReferenceBackend()
        r_out, r_lse = ref.forward(q64, k64, v64, scale=0.125, mask=mask)
        r_grads = ref.backward(do64, q64, k64, v64, r_out, r_lse, scale=0.125, mask=mask)
        results = {}
        for name, ops in (("varlen", varlen_ops), ("pieces", None)):
            monkeypatch.setattr(TorchBackend, "varlen_ops", ops)
            out, lse = TorchBackend().forward(q, k, v, scale=0.125, mask=mask)
            grads = TorchBackend().backward(dout, q, k, v, out, lse, scale=0.125, mask=mask)
            torch.cuda.synchronize()
            results[name] = [t.double().cpu() for t in (out, lse, *grads)]
        monkeypatch.setattr(TorchBackend, "varlen_ops", varlen_ops)
        assert torch.equal(torch.isinf(results["varlen"][1]), torch.isinf(r_lse)), mask
        fin = torch.isfinite(r_lse)
        for i, want in enumerate([r_out, r_lse, *r_grads]):
            got, base = results["varlen"][i], results["pieces"][i]
            if i == 1:
                got, base, want = got[fin], base[fin], want[fin]
            if want.numel() == 0:
                continue
            size = want.abs().max().item() + 1e-6
            err = (got - want).abs().max().item() / size
            err_pieces = (base - want).abs().max().item() / size
            assert err <= 2 * err_pieces + margin, (mask, "out lse dq dk dv".split()[i], err,
                                                    err_pieces)


def test_launch_metadata_is_built_before_the_ring_steps(standin, monkeypatch):
    """``prepare_launches`` (called by the ring executors before their first step) builds the
    device index arrays of every step's mask; the steps then copy nothing to the device, and a
    second call with the same plan builds nothing either."""
    import distattn.kernels.varlen as varlen_mod
    lay = ring_layout("zigzag", 40, 4, 1, [0, 7, 19, 20, 33, 40])
    plan = ring_plan(lay, causal=True)
    masks, n = plan.masks(1), lay.part_len
    q, k, v, _ = _inputs(1, n, n, 2, 1)
    tb = TorchBackend()
    varlen_mod.launch_tensors.cache_clear()
    for t, mask in enumerate(masks):
        tb.prepare_launches(mask, q, n, plan.key_len(1, t))
    built = varlen_mod.launch_tensors.cache_info().misses
    assert built == len(masks)
    copies = []
    real_tensor = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **kw: copies.append(a) or
                        real_tensor(*a, **kw))
    for _ in range(2):                       # two calls, every step
        out = torch.zeros(1, n, 2, 8, dtype=torch.float64)
        lse = torch.full((1, 2, n), float("-inf"), dtype=torch.float64)
        for t, mask in enumerate(masks):
            if plan.active(1)[t]:
                kk, vv = k[:, :plan.key_len(1, t)], v[:, :plan.key_len(1, t)]
                tb.forward_into(q, kk, vv, out, lse, scale=0.5, mask=mask)
    assert copies == [] and varlen_mod.launch_tensors.cache_info().misses == built


# -- a backend object the caller keeps ------------------------------------------------------
def test_a_backend_object_keeps_its_measured_pick_across_calls(standin, mesh):
    """``backend=TorchBackend(pick="measure")``: the first call measures (varlen launches vs
    per-piece calls, timer mocked), later calls reuse the choice; both exact to fp64."""
    import distattn
    timed = []

    def timer(fn, repeats):
        fn()
        timed.append(1)
        return float(len(timed))          # the first candidate timed is the fastest

    be = TorchBackend(pick="measure", timer=timer)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 24, 2, 8, generator=g, dtype=torch.float64) for _ in range(3))
    want = distattn.dist_flash_attn(q, k, v, mesh=mesh, causal=True, backend="reference")
    first = None
    for _ in range(2):
        out = distattn.dist_flash_attn(q, k, v, mesh=mesh, causal=True, backend=be)
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
        first = len(timed) if first is None else first
    assert first > 0 and be.picker.choice and len(timed) == first
    with pytest.raises(ValueError, match="BlockAttention"):
        distattn.dist_flash_attn(q, k, v, mesh=mesh, causal=True, backend=object())
