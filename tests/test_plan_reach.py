"""The document reach of ring plans (``plan._reach``: steps and payloads) against the pairwise
algorithm it replaced, kept here as the oracle: equal results on random documents, layouts,
windows and meshes."""
import random

import pytest

from distattn.layout import LAYOUTS, ring_layout
from distattn.plan import _merge_ranges, _reach
from distattn.segments import attention_bounds, block_mask, chunked_layout


def pairwise_reach(lay, bounds):
    """The reach before issue 20: per document, rank pairs from first/last tokens without a
    left bound, and every pair of runs through ``block_mask`` with one (O(docs x P^2))."""
    R, lo_g, hi_g = lay.ring_degree, bounds[0], bounds[1]
    holders: dict = {}
    for r, segs in enumerate(lay.parts):
        for sg in segs:
            holders.setdefault(sg.doc, {}).setdefault(r, []).append(sg)
    last = lambda sg: sg.g0 + sg.stride * (sg.length - 1)
    far, need = 0, [[] for _ in range(R)]
    for ranks in holders.values():
        if len(ranks) < 2:
            continue
        if lo_g is None:
            qmax = {r: max(last(sg) for sg in segs) for r, segs in ranks.items()}
            kmin = {r: min(sg.g0 for sg in segs) for r, segs in ranks.items()}
            for o, segs in ranks.items():
                for r in ranks:
                    if r != o and (hi_g is None or qmax[r] + hi_g >= kmin[o]):
                        far = max(far, (r - o) % R)
                top = max((qmax[r] for r in ranks if r != o), default=None)
                for sg in segs:
                    count = sg.length if hi_g is None else \
                        min(sg.length, max(0, (top + hi_g - sg.g0) // sg.stride + 1))
                    if count:
                        need[o].append((sg.start, sg.start + count))
        else:
            for o, ksegs in ranks.items():
                for r, qsegs in ranks.items():
                    if r == o:
                        continue
                    mask = block_mask(qsegs, ksegs, bounds)
                    for p in mask.simplify(lay.part_len, lay.part_len).pieces:
                        _, _, k0, k1 = p.tight(lay.part_len, lay.part_len)
                        need[o].append((k0, k1))
                        far = max(far, (r - o) % R)
    return far + 1, tuple(_merge_ranges(spans) for spans in need)


WINDOWS = [None, (0, 0), (1, 0), (3, 0), (2, 5), (-1, 2), (4, -1), (7, 7), (40, 0), (300, 0)]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_reach_equals_the_pairwise_algorithm(layout):
    rng = random.Random(f"reach-{layout}")
    for _ in range(60):
        R, U = rng.choice([1, 2, 3, 4, 5, 8, 13]), rng.randint(1, 2)
        docs = rng.randint(1, 40)
        cu = [0]
        for _ in range(docs):
            cu.append(cu[-1] + rng.choice([1, 2, 3, 5, 8, 17, 40, 90, 250]))
        lay = ring_layout(layout, cu[-1], R, U, cu)
        if rng.random() < 0.2:
            lay = chunked_layout(lay, rng.choice([3, 16, 64]), rng.choice(["row", "document"]))
        for window in rng.sample(WINDOWS, 4):
            for causal in (False, True):
                bounds = attention_bounds(causal, window)
                assert _reach(lay, bounds) == pairwise_reach(lay, bounds), \
                    (layout, R, U, cu, window, causal)


def test_reach_without_documents():
    for layout in ("contiguous", "zigzag", "stripe"):
        for R in (1, 2, 3, 4, 8):
            lay = ring_layout(layout, 16 * R, R, 1)
            for window in WINDOWS:
                for causal in (False, True):
                    bounds = attention_bounds(causal, window)
                    assert _reach(lay, bounds) == pairwise_reach(lay, bounds), \
                        (layout, R, window, causal)
