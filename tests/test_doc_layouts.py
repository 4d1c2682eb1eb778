"""Per-document layouts ``doc_contiguous`` / ``doc_zigzag`` (issue 19 item 4): placement,
shard/unshard/positions round trips, and dist_flash_attn vs an fp64 dense reference (out, lse,
dq, dk, dv at 1e-10) on gloo worlds 2 and 4 (ring and USP meshes, causal and not), 8 for a
subset. Documents that do not divide are padded at each document's end with inert slots."""
from __future__ import annotations

import pytest
import torch

import distattn
from distattn.layout import ring_layout
from dist_cases import Case, mesh_shapes, run_attention_cases
from spawn import run_world

LAYOUTS = ("doc_contiguous", "doc_zigzag")


def test_each_document_is_split_over_every_rank():
    cu = (0, 8, 12, 28)                     # every length divides by 2R = 4
    lay = ring_layout("doc_contiguous", 28, 2, 1, cu)
    assert lay.indices(0).tolist() == [0, 1, 2, 3, 8, 9, 12, 13, 14, 15, 16, 17, 18, 19]
    assert lay.indices(1).tolist() == [4, 5, 6, 7, 10, 11, 20, 21, 22, 23, 24, 25, 26, 27]
    lay = ring_layout("doc_zigzag", 28, 2, 1, cu)
    assert lay.indices(0).tolist() == [0, 1, 6, 7, 8, 11, 12, 13, 14, 15, 24, 25, 26, 27]
    assert lay.indices(1).tolist() == [2, 3, 4, 5, 9, 10, 16, 17, 18, 19, 20, 21, 22, 23]
    assert not lay.has_padding


def test_documents_that_do_not_divide_pad_at_their_own_end():
    cu = (0, 5, 8)
    lay = ring_layout("doc_contiguous", 8, 2, 1, cu)
    assert lay.indices(0).tolist() == [0, 1, 2, 5, 6]
    assert lay.indices(1).tolist() == [3, 4, -1, 7, -1]
    lay = ring_layout("doc_zigzag", 8, 2, 1, cu)       # chunks of 2 and 1
    assert lay.indices(0).tolist() == [0, 1, -1, -1, 5, -1]
    assert lay.indices(1).tolist() == [2, 3, 4, -1, 6, 7]
    # one document: the one-sequence layouts
    for doc, plain in (("doc_contiguous", "contiguous"), ("doc_zigzag", "zigzag")):
        assert ring_layout(doc, 24, 3, 2).parts == ring_layout(plain, 24, 3, 2).parts


def doc_cases(world: int) -> list[Case]:
    cases, i = [], 0
    shapes = list(mesh_shapes(world))
    if world == 8:
        shapes = [(1, 8, "ulysses_inner"), (2, 4, "ulysses_inner")]
    for u, r, placement in shapes:
        for layout in LAYOUTS:
            for causal in (False, True):
                for docs in (("mixed", "random") if world < 8 else ("mixed",)):
                    cases.append(Case(world, u, r, placement, layout, causal, 4, (4, 2, 1)[i % 3],
                                      16, 1, "fp64", ("torch", "reference")[i % 2], "auto",
                                      docs, window=(5, 0) if causal and i % 4 == 1 else None))
                    i += 1
    return cases


def _run(rank, world):
    results = run_attention_cases(rank, world, doc_cases(world))
    meshes = {}
    trips = {}
    for u, r, placement in mesh_shapes(world):
        mesh = meshes.setdefault((u, placement),
                                 distattn.SPMesh.build(ulysses_degree=u, placement=placement))
        for layout in LAYOUTS:
            cu = (0, 3, 3 + 2 * world + 1, 4 * world + 7)
            x = torch.arange(cu[-1] * 3, dtype=torch.float64).view(1, cu[-1], 3)
            loc = distattn.shard(x, mesh, dim=1, layout=layout, cu_seqlens=cu)
            back = distattn.unshard(loc, mesh, dim=1, layout=layout, cu_seqlens=cu)
            pos = distattn.positions(cu[-1], mesh, layout=layout, cu_seqlens=cu)
            idx = distattn.layout.local_indices(cu[-1], mesh, layout, cu)
            starts = torch.tensor(cu)[torch.bucketize(idx.clamp_min(0), torch.tensor(cu[1:]),
                                                      right=True)]
            want = torch.where(idx >= 0, idx - starts, 0)
            trips[(u, placement, layout)] = bool(torch.equal(back, x)) and bool(
                torch.equal(pos, want))
    return results, trips


@pytest.mark.parametrize("world", [2, 4, 8])
def test_doc_layouts_match_dense_reference(world):
    per_rank = run_world(world, _run)
    for rank, (results, trips) in enumerate(per_rank):
        assert all(trips.values()), (rank, trips)
        assert len(results) == len(doc_cases(world))
        for cid, r in results.items():
            for key in ("out", "lse", "dq", "dk", "dv"):
                assert r[key] <= 1e-10, (rank, cid, key, r[key])
            assert r["dtype_ok"], cid
            if r["padding"]:
                assert r["inert"], cid
