"""NaN and +-inf in q/k/v propagate as in one-process attention (docs/DESIGN.md, "Non-finite
inputs"), on a gloo world of 4 CPU processes.

One packed row of 8 documents; seven of them carry one kind of non-finite input each (NaN in
q, k, v; +inf in q; -inf and +inf in k; +inf and -inf in one element of v, which meet in the
rows that see both) at a real token, one head, one element, and the eighth stays finite.
Documents keep the effects apart. Every layout with the torch and reference backends (fp64)
and the emulated CUDA kernels (fp16), ring 4, plus the helper and all-gather schedules, USP
2 x 2, Ulysses 4 and non-causal attention. Padding slots hold NaN and must stay inert.

The reference is one process's attention in fp64, each row over exactly the keys it sees
(explicit softmax math; autograd for the gradients), with every non-finite element of k
replaced by NaN: that is distattn's documented rule for infinite keys (a row that sees one is
NaN), which differs from plain one-process attention only where an infinite key scores -inf
(one process then gives it weight 0). Checked: the NaN and +-inf positions of out, the NaN
positions of lse and the non-finite positions of dq/dk/dv equal the reference's, finite values
agree (1e-10 in fp64); and every NaN of plain one-process attention is a NaN here.
"""
import pickle

import pytest
import torch

from spawn import run_world

WORLD = 4
CU = (0, 5, 12, 15, 24, 30, 34, 42, 48)
HQ, HKV = 4, 2
NAN, INF = float("nan"), float("inf")
# (document, tensor, token offset in the document, head, element, value)
POISON = (
    (0, "q", 2, 1, 3, NAN),
    (1, "k", 4, 0, 0, NAN),
    (2, "v", 1, 1, 5, NAN),
    (3, "q", 6, 2, 1, INF),
    (4, "k", 0, 1, 2, -INF),
    (5, "v", 1, 0, 4, INF), (5, "v", 3, 0, 4, -INF), (5, "v", 2, 1, 0, INF),
    (6, "k", 5, 1, 7, INF),
)   # document 7 stays finite

# (layout, backend, ulysses degree, schedule, causal)
CASES = ([(lay, be, 1, "ring", True)
          for lay in ("contiguous", "zigzag", "stripe", "packed", "doc_contiguous",
                      "doc_zigzag")
          for be in ("torch", "reference", "emulate")]
         + [("contiguous", be, 1, "helper", True) for be in ("torch", "reference", "emulate")]
         + [("contiguous", "torch", 2, "helper", True), ("zigzag", "reference", 2, "ring", True),
            ("stripe", "torch", 4, "ring", True), ("packed", "emulate", 2, "ring", True),
            ("zigzag", "torch", 1, "ring", False), ("packed", "reference", 2, "ring", False)]
         + [("zigzag", "torch", 1, "allgather", True), ("packed", "emulate", 2, "allgather", True),
            ("stripe", "reference", 1, "allgather", False)])


def case_id(case):
    lay, be, u, sched, causal = case
    return f"{lay}-{be}-u{u}-{sched}-{'causal' if causal else 'full'}"


def dims(backend):
    """(dtype, head_dim): the emulated kernels run fp16 with head_dim 64."""
    return (torch.float16, 64) if backend == "emulate" else (torch.float64, 8)


def inputs(backend):
    """q, k, v, dout [1, S, H, D] (the case's dtype) with the poison applied."""
    dtype, d = dims(backend)
    gen = torch.Generator().manual_seed(11)
    shapes = {"q": (1, CU[-1], HQ, d), "k": (1, CU[-1], HKV, d), "v": (1, CU[-1], HKV, d)}
    t = {name: torch.randn(shape, generator=gen, dtype=torch.float64)
         for name, shape in shapes.items()}
    dout = torch.randn(shapes["q"], generator=gen, dtype=torch.float64)
    for doc, name, offset, head, elem, value in POISON:
        t[name][0, CU[doc] + offset, head, elem] = value
    return [x.to(dtype) for x in (t["q"], t["k"], t["v"], dout)]


def run_cases(rank, world, cases):
    import distattn
    from distattn.attention import dist_flash_attn
    from distattn.layout import local_indices

    meshes, results = {}, {}
    for case in cases:
        lay, be, u, sched, causal = case
        if u not in meshes:
            meshes[u] = distattn.SPMesh.build(ulysses_degree=u)
        mesh = meshes[u]
        q, k, v, dout = inputs(be)
        idx = local_indices(CU[-1], mesh, lay, CU)
        pad = idx < 0
        local = lambda t: distattn.shard(t, mesh, dim=1, layout=lay, cu_seqlens=CU).clone()
        ql, kl, vl = (local(t) for t in (q, k, v))
        for t in (ql, kl, vl):
            t[:, pad] = NAN
        ql, kl, vl = (t.requires_grad_() for t in (ql, kl, vl))
        dl = local(dout)
        out, lse = dist_flash_attn(ql, kl, vl, mesh=mesh, causal=causal, layout=lay,
                                   schedule=sched, backend=be, cu_seqlens=CU, return_lse=True)
        out.backward(dl)
        results[case_id(case)] = pickle.dumps({
            "idx": idx, "out": out.detach().double(), "lse": lse.double(),
            "dq": ql.grad.double(), "dk": kl.grad.double(), "dv": vl.grad.double()})
    return results


def visibility(causal):
    doc = torch.bucketize(torch.arange(CU[-1]), torch.tensor(CU[1:]), right=True)
    vis = doc.unsqueeze(1) == doc.unsqueeze(0)
    return vis & torch.ones_like(vis).tril() if causal else vis


def row_attention(q, k, v, visible):
    """One process, fp64: each row's softmax over exactly the keys it sees (no masked key
    enters any product), K/V heads repeated for GQA. (out [1, S, Hq, D], lse [1, Hq, S])."""
    g = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
    outs, lses = [], []
    for i in range(q.shape[1]):
        keys = visible[i].nonzero().flatten()
        s = torch.einsum("bhd,bkhd->bhk", q[:, i], k[:, keys]) * q.shape[-1] ** -0.5
        outs.append(torch.einsum("bhk,bkhd->bhd", torch.softmax(s, -1), v[:, keys]))
        lses.append(torch.logsumexp(s, -1))
    return torch.stack(outs, 1), torch.stack(lses, 2)


def reference(backend, causal, contract: bool):
    """(out, lse, dq, dk, dv) in fp64 from the case's (rounded) inputs; ``contract``: with
    non-finite k elements made NaN (distattn's rule for infinite keys)."""
    q, k, v, dout = (t.double() for t in inputs(backend))
    if contract:
        k = torch.where(torch.isfinite(k), k, NAN)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = row_attention(*leaves, visibility(causal))
    grads = torch.autograd.grad(out, leaves, dout)
    return (out.detach(), lse.detach()) + grads


@pytest.fixture(scope="module")
def results():
    per_rank = run_world(WORLD, run_cases, CASES)
    return [{key: pickle.loads(blob) for key, blob in res.items()} for res in per_rank]


def _same_class(name, got, ref, tol):
    """NaN, +inf and -inf at the same places, finite values within ``tol`` of the largest."""
    for test in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(test(got), test(ref)), \
            f"{name}: {test.__name__} at {test(got).nonzero().tolist()}, reference at " \
            f"{test(ref).nonzero().tolist()}"
    fin = torch.isfinite(ref)
    scale = ref[fin].abs().max().clamp_min(1.0)
    err = ((got - ref)[fin].abs().max() / scale).item()
    assert err <= tol, f"{name}: finite values differ by {err:.3e}"


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_nonfinite_like_one_process(results, case):
    lay, be, u, sched, causal = case
    ref_out, ref_lse, *ref_grads = reference(be, causal, contract=True)
    plain_out = reference(be, causal, contract=False)[0]
    tol = 1e-10 if dims(be)[0] == torch.float64 else 2e-2
    for rank, res in enumerate(results):
        r = res[case_id(case)]
        real, pad = r["idx"] >= 0, r["idx"] < 0
        tok = r["idx"][real]
        where = f"rank {rank}"
        # padding slots stay inert
        assert (r["out"][:, pad] == 0).all() and (r["lse"][:, :, pad] == -INF).all(), where
        for g in ("dq", "dk", "dv"):
            assert (r[g][:, pad] == 0).all(), f"{where}: {g} of a padding slot"
        out = r["out"][:, real]
        _same_class(f"{where} out", out, ref_out[:, tok], tol)
        assert not (torch.isnan(plain_out[:, tok]) & ~torch.isnan(out)).any(), \
            f"{where}: finite where plain one-process attention is NaN"
        # lse is NaN exactly where the whole row is (its softmax undefined)
        lse, want = r["lse"][:, :, real], ref_lse[:, :, tok]
        dead = torch.isnan(ref_out[:, tok]).all(-1).transpose(1, 2)
        assert torch.equal(torch.isnan(lse), dead), f"{where}: NaN lse at the wrong rows"
        fin = ~dead
        assert ((lse - want)[fin].abs().max() / want[fin].abs().max()).item() <= tol, where
        for g, ref in zip(("dq", "dk", "dv"), ref_grads):
            got, ref = r[g][:, real], ref[:, tok]
            assert torch.equal(torch.isfinite(got), torch.isfinite(ref)), \
                f"{where}: {g} non-finite at {(~torch.isfinite(got)).nonzero().tolist()}, " \
                f"reference at {(~torch.isfinite(ref)).nonzero().tolist()}"
            fin = torch.isfinite(ref)
            err = ((got - ref)[fin].abs().max() / ref[fin].abs().max()).item()
            assert err <= (tol if tol < 1e-3 else 5e-2), f"{where}: {g} differs by {err:.3e}"


def test_poison_reaches_every_kind():
    """The reference itself: each poisoned document shows its effect (so the comparison
    above is not vacuous), and the finite document stays finite."""
    out, lse, dq, dk, dv = reference("torch", True, contract=True)
    doc_rows = lambda d: slice(CU[d], CU[d + 1])
    for doc in range(7):
        assert torch.isnan(out[:, doc_rows(doc)]).any(), doc
    assert torch.isposinf(out[:, doc_rows(5)]).any()
    assert torch.isfinite(out[:, doc_rows(7)]).all() and torch.isfinite(dq[:, doc_rows(7)]).all()
    # an infinite key in plain one-process attention: some rows give it weight 0
    plain = reference("torch", True, contract=False)[0]
    assert (torch.isnan(out) & ~torch.isnan(plain)).any()
