"""Chunked attention (``dist_flash_attn(..., chunk_size=c)``, Llama 4's attention_chunk_size).

Query i sees key j only if ``i // c == j // c`` in global token indices (and the same document,
causal, window as usual). Checked in fp64 against a dense reference built here from an explicit
[S, S] boolean mask, independently of distattn's mask algebra: out, lse, dq, dk, dv at 1e-10 on
worlds 2, 4 and 8 (ring, Ulysses, USP, the helper schedule), every layout, with documents and
lengths that divide nothing, chunk sizes aligned and not aligned with shard boundaries. Plans
are pure, so "a ring step no chunk reaches sends nothing" is asserted on the plan.
"""
from __future__ import annotations

import pytest
import torch

from spawn import run_world

TOL = 1e-10


def dense_mask(S, cu, chunk, causal, window, origin="row"):
    """Boolean [S, S]: query i (row) sees key j (column), from the definitions. Chunks count
    row indices (origin "row") or positions within the document ("document")."""
    i = torch.arange(S).unsqueeze(1)
    j = torch.arange(S).unsqueeze(0)
    doc = torch.zeros(S, dtype=torch.int64)
    pos = torch.arange(S)
    for d, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
        doc[a:b] = d
        pos[a:b] -= a
    vis = doc.unsqueeze(1) == doc.unsqueeze(0)
    if chunk is not None:
        idx = torch.arange(S) if origin == "row" else pos
        vis &= (idx.unsqueeze(1) // chunk) == (idx.unsqueeze(0) // chunk)
    if causal:
        vis &= j <= i
    if window is not None:
        left, right = window
        if left >= 0:
            vis &= j >= i - left
        if right >= 0:
            vis &= j <= i + right
    return vis


def dense_attention(q, k, v, vis, scale):
    """q [1, S, Hq, D], k/v [1, S, Hkv, D] -> out [1, S, Hq, D], lse [1, Hq, S]."""
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    s = s.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.unsqueeze(-1).clamp_min(-1e300)).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", p, v), lse


# (world, ulysses, ring, layout, causal, cu, chunk, window, schedule, backend[, origin])
def cases(world):
    docs = {2: (0, 5, 6, 19, 23), 4: (0, 3, 17, 18, 30, 37), 8: (0, 9, 30, 31, 50, 53)}[world]
    meshes = {2: [(1, 2), (2, 1)], 4: [(1, 4), (2, 2), (4, 1)], 8: [(1, 8), (2, 4)]}[world]
    out = []
    for u, r in meshes:
        for layout in ("contiguous", "zigzag", "stripe", "packed"):
            for causal in (True, False):
                for cu, chunk in ((docs, 4), (docs, 7), ((0, 8 * r + 3), 2 * 4)):
                    # chunk 8 on [0, 8r+3] contiguous: ring parts of 8r+3 tokens / r ranks
                    # are not aligned; 4 on docs lands on and off document ends
                    if world == 8 and (layout, causal) != {1: ("zigzag", True),
                                                           2: ("packed", True)}[u]:
                        continue    # world 8: a subset, to keep the test fast
                    out.append((world, u, r, layout, causal, cu, chunk, None, "auto",
                                "reference", "document" if chunk == 7 else "row"))
        # shard-aligned chunks (one ring part = 2*chunk tokens), windows, helper, torch backend
        n = 4 * r * u
        aligned = (0, n)
        out.append((world, u, r, "contiguous", True, aligned, n // r, None, "ring",
                    "reference"))
        if world == 8:
            continue
        out.append((world, u, r, "contiguous", True, aligned, n // (2 * r), None, "auto",
                    "torch"))
        out.append((world, u, r, "zigzag", True, docs, 6, (3, 0), "auto", "reference"))
        out.append((world, u, r, "contiguous", False, docs, 5, (2, 3), "auto", "reference"))
        if r > 1 and world < 8:
            out.append((world, u, r, "contiguous", True, docs, 6, None, "helper", "reference",
                        "document"))
            out.append((world, u, r, "contiguous", True, aligned, n // r, None, "helper",
                        "torch"))
    return out


def run_cases(rank, world, case_list):
    import distattn
    from distattn.layout import local_indices

    errors = []
    meshes = {}
    # Invalid chunk sizes are refused on every rank before any communication (no hang).
    mesh0 = distattn.SPMesh.build(ulysses_degree=1, ring_degree=world)
    x = torch.zeros(1, 4, 2, 8, dtype=torch.float64)
    for arg, bad in (("chunk_size", 0), ("chunk_size", -3), ("chunk_size", 2.5),
                     ("chunk_size", True), ("chunk_size", "4"), ("chunk_origin", "global")):
        kwargs = {"chunk_size": 4, arg: bad}
        try:
            distattn.dist_flash_attn(x, x, x, mesh=mesh0, **kwargs)
            errors.append(f"{arg}={bad!r} was accepted")
        except ValueError as exc:
            if arg not in str(exc):
                errors.append(f"{arg}={bad!r}: message does not name it: {exc}")
    for world_, u, r, layout, causal, cu, chunk, window, schedule, backend, *rest in case_list:
        origin = rest[0] if rest else "row"
        tag = f"u{u}r{r} {layout} causal={causal} cu={cu} chunk={chunk}/{origin} " \
              f"win={window} {schedule} {backend}"
        if (u, r) not in meshes:
            meshes[u, r] = distattn.SPMesh.build(ulysses_degree=u, ring_degree=r)
        mesh = meshes[u, r]
        S, hq, hkv, D = cu[-1], 4, 2, 8
        gen = torch.Generator().manual_seed(S * 7 + chunk)
        q, k, v, dout = (torch.randn(1, S, h, D, generator=gen, dtype=torch.float64)
                         for h in (hq, hkv, hkv, hq))
        scale = D ** -0.5
        fq, fk, fv = (t.clone().requires_grad_() for t in (q, k, v))
        ref_out, ref_lse = dense_attention(fq, fk, fv, dense_mask(S, cu, chunk, causal, window,
                                                                 origin), scale)
        ref_out.backward(dout)
        sh = lambda t: distattn.shard(t, mesh, dim=1, layout=layout, cu_seqlens=cu)
        lq, lk, lv = (sh(t).clone().requires_grad_() for t in (q, k, v))
        try:
            out, lse = distattn.dist_flash_attn(
                lq, lk, lv, mesh=mesh, causal=causal, layout=layout, schedule=schedule,
                backend=backend, return_lse=True, cu_seqlens=cu, window=window,
                chunk_size=chunk, chunk_origin=origin)
            out.backward(sh(dout))
        except Exception as exc:  # noqa: BLE001 - reported to the pytest process
            errors.append(f"{tag}: raised {exc!r}")
            continue
        real = local_indices(S, mesh, layout, cu) >= 0
        # every rank shards (shard is agreed over the mesh), even one with nothing to compare
        pairs = (("out", out, sh(ref_out.detach())), ("dq", lq.grad, sh(fq.grad)),
                 ("dk", lk.grad, sh(fk.grad)), ("dv", lv.grad, sh(fv.grad)))
        want_lse = sh(ref_lse.transpose(1, 2)).transpose(1, 2)
        if not bool(real.any()):      # a rank holding only padding slots
            continue
        for name, got, want in pairs:
            err = (got[:, real] - want[:, real]).abs().max().item()
            if not err <= TOL:
                errors.append(f"{tag}: {name} max error {err:.3g}")
        err = (lse[..., real] - want_lse[..., real]).abs().max().item()
        if not err <= TOL:
            errors.append(f"{tag}: lse max error {err:.3g}")
    return errors, len(case_list)


@pytest.mark.parametrize("world", [2, 4, 8])
def test_chunked_attention_matches_dense_reference(world):
    results = run_world(world, run_cases, cases(world))
    errors = sorted({e for errs, _ in results for e in errs})
    assert not errors, f"{len(errors)} failures:\n" + "\n".join(errors[:30])
    assert results[0][1] == len(cases(world)) > 0


def test_chunks_are_documents_inside_documents():
    """The chunked layout's documents are the global multiples of the chunk size intersected
    with cu_seqlens, and the plan covers exactly the dense mask's pairs, once each."""
    from distattn.layout import ring_layout
    from distattn.plan import ring_plan, visible_pairs
    from distattn.segments import chunk_boundaries, chunked_layout

    assert chunk_boundaries(23, 5, (0, 7, 23)) == (0, 5, 7, 10, 15, 20, 23)
    assert chunk_boundaries(23, 5, (0, 7, 23), "document") == (0, 5, 7, 12, 17, 22, 23)
    assert chunk_boundaries(10, 4, None) == (0, 4, 8, 10)
    for layout in ("contiguous", "zigzag", "stripe", "packed"):
        for cu, chunk, origin in (((0, 7, 23, 40), 6, "row"), ((0, 7, 23, 40), 6, "document"),
                                  ((0, 40), 8, "row"), ((0, 1, 40), 40, "document")):
            lay = chunked_layout(ring_layout(layout, 40, 4, 1, cu), chunk, origin)
            for causal in (True, False):
                got = visible_pairs(ring_plan(lay, causal))
                want = dense_mask(40, cu, chunk, causal, None, origin).nonzero().tolist()
                assert set(got) == {tuple(p) for p in want}, (layout, cu, chunk, causal)
                assert set(got.values()) == {1}


def test_ring_steps_no_chunk_reaches_send_nothing():
    from distattn.layout import ring_layout
    from distattn.plan import helper_plan, ring_plan
    from distattn.segments import chunked_layout

    lay = ring_layout("contiguous", 64, 4, 1)        # ring parts of 16 tokens
    # Chunks of one ring part: nothing travels, one step.
    for causal in (True, False):
        plan = ring_plan(chunked_layout(lay, 16), causal)
        assert plan.steps == 1 and all(p == () for p in plan.payload)
    # Chunks of two parts: one step; causal: only ranks 0 and 2 send (their keys reach the
    # next rank), ranks 1 and 3 send nothing. Bidirectional, rank 0 needs rank 1's keys,
    # which a one-way ring brings at step 3: the ring runs all 4 steps, computing nothing at
    # step 2 (no chunk spans two ring hops).
    plan = ring_plan(chunked_layout(lay, 32), True)
    assert plan.steps == 2
    assert [plan.payload_len(o) for o in range(4)] == [16, 0, 16, 0]
    plan = ring_plan(chunked_layout(lay, 32), False)
    assert plan.steps == 4 and [plan.payload_len(o) for o in range(4)] == [16] * 4
    assert all(not plan.masks(r)[2].pieces for r in range(4))
    # Chunks not aligned with parts (12 tokens): keys travel only as far as a chunk reaches.
    plan = ring_plan(chunked_layout(lay, 12), True)
    assert plan.steps == 2
    assert plan.payload == (((12, 16),), ((8, 16),), (), ())
    # Without chunks the same ring runs 4 steps and sends every part.
    assert ring_plan(lay, True).steps == 4
    # The helper schedule keeps its messages but skips the work no chunk reaches.
    hp = helper_plan(chunked_layout(lay, 16), True)
    assert all(not hp.tasks[r][t].mask.pieces for r in range(4) for t in range(1, hp.steps))


def test_kv_cache_runs_chunks_only_where_they_hide_nothing():
    from types import SimpleNamespace

    from distattn.inference import ShardedKVCache

    check = ShardedKVCache._check_chunks
    check(SimpleNamespace(start=0, n_new=8), 8, "row")           # one chunk: exact
    check(SimpleNamespace(start=7, n_new=1), None, "document")
    with pytest.raises(NotImplementedError, match="chunk_size=8"):
        check(SimpleNamespace(start=8, n_new=1), 8, "row")
    with pytest.raises(ValueError, match="chunk_size"):
        check(SimpleNamespace(start=0, n_new=1), 0, "row")
