"""Layouts without communication: which tokens each (ring, Ulysses) rank holds."""
import pytest
import torch

import distattn
from distattn.layout import check_seq_len, local_indices, ring_part_indices, seq_multiple
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
