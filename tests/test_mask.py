"""The mask algebra (distattn/kernels/mask.py) against brute-force boolean matrices."""
import random

import pytest
import torch

from distattn.kernels.base import piece_blocks
from distattn.kernels.mask import Mask, Piece


def _random_piece(rng, sq, sk):
    bound = lambda: rng.choice([None] + list(range(-10, 10)))
    return Piece(rng.randint(-1, sq), rng.choice([None, rng.randint(0, sq + 2)]),
                 rng.randint(-1, sk), rng.choice([None, rng.randint(0, sk + 2)]),
                 bound(), bound())


@pytest.mark.parametrize("seed", range(4))
def test_piece_operations_match_dense(seed):
    rng = random.Random(seed)
    for _ in range(800):
        sq, sk = rng.randint(1, 9), rng.randint(1, 9)
        mask = Mask((_random_piece(rng, sq, sk),))
        dense = mask.dense(sq, sk)
        simple = mask.simplify(sq, sk)
        assert torch.equal(simple.dense(sq, sk), dense)
        assert mask.pairs(sq, sk) == int(dense.sum())
        if simple.pieces:                       # tight() never cuts a visible pair
            q0, q1, k0, k1 = simple.pieces[0].tight(sq, sk)
            inside = torch.zeros_like(dense)
            inside[q0:q1, k0:k1] = True
            assert not (dense & ~inside).any()
        r0, c0 = rng.randint(0, sq - 1), rng.randint(0, sk - 1)
        r1, c1 = rng.randint(r0 + 1, sq), rng.randint(c0 + 1, sk)
        sub = mask.restrict(slice(r0, r1), slice(c0, c1))
        assert torch.equal(sub.dense(r1 - r0, c1 - c0), dense[r0:r1, c0:c1])
        # piece_blocks: the rectangles and their sub-masks rebuild the mask exactly
        rebuilt = torch.zeros_like(dense)
        for rows, cols, m in piece_blocks(mask, sq, sk):
            assert len(m.pieces) == 1 and m.kind in ("none", "causal", "band")
            rebuilt[rows, cols] |= m.dense(rows.stop - rows.start, cols.stop - cols.start)
        assert torch.equal(rebuilt, dense)


def test_named_masks():
    assert Mask.causal(5).simplify(3, 4) == Mask.none()
    assert Mask.causal(-3).simplify(3, 4) == Mask.empty()
    assert Mask.causal(-1).simplify(3, 3).kind == "causal"
    assert Mask.band(-2, 0).simplify(4, 4).kind == "band"
    assert Mask.band(-9, 0).simplify(4, 4) == Mask.causal(0)
    assert Mask.causal(0).offset == 0
    with pytest.raises(ValueError, match="offset"):
        Mask.none().offset
