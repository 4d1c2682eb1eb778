"""Layouts without communication: which tokens each (ring, Ulysses) rank holds."""
import pytest
import torch

import distattn
from distattn.layout import (check_seq_len, local_indices, ring_layout, ring_part_indices,
                             seq_multiple)
from distattn.mesh import SPMesh


def fake_mesh(U, R, u, r):
    """A mesh object for index arithmetic only (shard/positions never communicate)."""
    return SPMesh(U, R, u, r, None, None, tuple(range(U)), tuple(range(R)))


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "stripe"])
@pytest.mark.parametrize("U,R", [(1, 1), (1, 4), (2, 3), (4, 2), (3, 1), (2, 8)])
def test_ranks_partition_the_sequence(layout, U, R):
    seq = seq_multiple(layout, R, U) * 3
    owned = []
    for r in range(R):
        part = ring_part_indices(seq, R, r, layout)
        pieces = [local_indices(seq, fake_mesh(U, R, u, r), layout) for u in range(U)]
        assert torch.equal(torch.cat(pieces), part)  # Ulysses split is contiguous in the part
        owned += part.tolist()
    assert sorted(owned) == list(range(seq))


def test_layout_definitions():
    seq, R = 16, 4
    assert ring_part_indices(seq, R, 1, "contiguous").tolist() == [4, 5, 6, 7]
    assert ring_part_indices(seq, R, 1, "zigzag").tolist() == [2, 3, 12, 13]
    assert ring_part_indices(seq, R, 1, "stripe").tolist() == [1, 5, 9, 13]


def test_shard_and_positions_agree():
    x = torch.arange(2 * 24).reshape(2, 24)
    m = fake_mesh(2, 3, 1, 2)
    for layout in ("contiguous", "zigzag", "stripe"):
        pos = distattn.positions(24, m, layout=layout)
        assert torch.equal(distattn.shard(x, m, dim=1, layout=layout), x[:, pos])


def test_bad_lengths_and_layouts():
    with pytest.raises(ValueError, match="multiple of 8"):
        check_seq_len(12, "zigzag", 4, 1)
    with pytest.raises(ValueError, match="layout must be one of"):
        seq_multiple("spiral", 2, 1)


DOCS = [0, 1, 4, 9, 30, 31, 45]   # 1-token documents, short ones, one over every rank; 45 tokens


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "stripe", "packed"])
@pytest.mark.parametrize("U,R", [(1, 1), (1, 4), (2, 3), (4, 2), (1, 8)])
def test_documents_any_length_partition(layout, U, R):
    lay = ring_layout(layout, DOCS[-1], R, U, DOCS)
    assert lay.part_len % U == 0
    owned = torch.cat([lay.indices(r) for r in range(R)])
    assert sorted(owned[owned >= 0].tolist()) == list(range(DOCS[-1]))
    x = torch.arange(DOCS[-1]) * 10
    for r in range(R):
        parts = [distattn.shard(x, fake_mesh(U, R, u, r), dim=0, layout=layout, cu_seqlens=DOCS)
                 for u in range(U)]
        idx = lay.indices(r)
        assert torch.equal(torch.cat(parts), torch.where(idx >= 0, idx * 10, 0))
        pos = torch.cat([distattn.positions(DOCS[-1], fake_mesh(U, R, u, r), layout=layout,
                                            cu_seqlens=DOCS) for u in range(U)])
        doc_start = torch.tensor(DOCS)[torch.bucketize(idx.clamp(min=0), torch.tensor(DOCS),
                                                       right=True) - 1]
        assert torch.equal(pos, torch.where(idx >= 0, idx - doc_start, 0))


def test_documents_and_plain_layouts_agree_when_nothing_pads():
    for layout in ("contiguous", "zigzag", "stripe"):
        a = ring_layout(layout, 48, 4, 2)
        b = ring_layout(layout, 48, 4, 2, [0, 48])
        assert all(torch.equal(a.indices(r), b.indices(r)) for r in range(4))


def test_packed_keeps_short_documents_whole_and_balances():
    from distattn.plan import balance, ring_plan
    gen = torch.Generator().manual_seed(0)
    lens = torch.randint(8, 200, (120,), generator=gen).tolist() + [2000, 1500]
    cu = [0] + torch.tensor(lens).cumsum(0).tolist()
    lay = ring_layout("packed", cu[-1], 8, 1, cu)
    report = balance(ring_plan(lay, causal=True))
    assert report["max_over_mean"] <= 1.05
    # the long documents are split over every rank, nearly every short one stays whole
    per_doc_ranks = {}
    for r, segs in enumerate(lay.parts):
        for s in segs:
            per_doc_ranks.setdefault(s.doc, set()).add(r)
    assert len(per_doc_ranks[120]) == len(per_doc_ranks[121]) == 8
    assert sum(len(v) == 1 for v in per_doc_ranks.values()) >= 100
    assert lay.part_len * 8 <= 1.06 * cu[-1]          # little padding


def test_cu_seqlens_errors():
    with pytest.raises(ValueError, match="strictly increasing"):
        ring_layout("zigzag", 8, 2, 1, [0, 3, 3, 8])
    with pytest.raises(ValueError, match="ends at 9"):
        ring_layout("zigzag", 8, 2, 1, [0, 9])
    with pytest.raises(ValueError, match="needs cu_seqlens"):
        ring_layout("packed", 8, 2, 1)
    with pytest.raises(ValueError, match="cu_seqlens=\\[0, 12\\]"):
        ring_layout("zigzag", 12, 4, 1)
