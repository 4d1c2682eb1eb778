"""Plans are pure data: coverage (every visible pair exactly once), steps, payloads, balance."""
import bisect
import random

import pytest

from distattn.layout import ring_layout
from distattn.plan import balance, helper_plan, ring_plan, visible_pairs, work

LAYOUTS = ("contiguous", "zigzag", "stripe")


def expected_pairs(seq, cu=None, causal=False, window=None):
    """Every visible (query, key) pair of a sequence, by brute force on global indices."""
    doc = (lambda t: bisect.bisect_right(cu, t)) if cu else (lambda t: 0)
    left, right = window if window else (-1, -1)
    return {(i, j) for i in range(seq) for j in range(seq)
            if doc(i) == doc(j) and not (causal and j > i)
            and not (left >= 0 and j < i - left) and not (right >= 0 and j > i + right)}


def assert_exact_cover(plan, expected, what):
    counts = visible_pairs(plan)
    assert set(counts) == expected, (what, sorted(set(counts) ^ expected)[:8])
    assert set(counts.values()) <= {1}, what


def random_case(rng, layout):
    """(ring layout, seq, cu_seqlens, causal, window) drawn from ``rng``: R <= 5, U <= 2,
    up to 31 tokens in documents of 1-30, every window shape."""
    R, U = rng.randint(1, 5), rng.randint(1, 2)
    seq = rng.randint(1, 31)
    cu = [0]
    while cu[-1] < seq:
        cu.append(min(seq, cu[-1] + rng.choice([1, 2, 3, 7, 13, 30])))
    causal = rng.random() < 0.6
    window = rng.choice([None, (3, 0), (2, 5), (-1, 2), (4, -1), (0, 0)])
    return ring_layout(layout, seq, R, U, cu), seq, cu, causal, window


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("causal", (False, True))
def test_every_visible_pair_exactly_once(layout, causal):
    for world in range(1, 13):
        seq = world * 2 * 2
        plan = ring_plan(ring_layout(layout, seq, world, 1), causal)
        assert_exact_cover(plan, expected_pairs(seq, causal=causal), (world, layout, causal))


@pytest.mark.parametrize("layout", LAYOUTS + ("packed",))
def test_documents_windows_and_any_length(layout):
    """Random document sets (1-token documents, documents shorter than a chunk, documents
    over every rank), lengths that divide nothing, windows of every shape, U in {1, 2}: every
    visible pair is computed exactly once, by the ring plan and (contiguous) the helper."""
    rng = random.Random(layout)
    for _ in range(40):
        lay, seq, cu, causal, window = random_case(rng, layout)
        R, U = lay.ring_degree, lay.ulysses_degree
        assert lay.part_len % U == 0
        what = (R, U, cu, causal, window)
        expected = expected_pairs(seq, cu, causal, window)
        assert_exact_cover(ring_plan(lay, causal, window), expected, what)
        if layout == "contiguous" and causal and not (R % 2 == 0 and lay.part_len % 2):
            assert_exact_cover(helper_plan(lay, True, window), expected, ("helper",) + what)


def test_ring_stops_and_payload_shrinks_with_documents():
    # Contiguous, documents that never cross a rank boundary: nothing travels.
    lay = ring_layout("contiguous", 16, 4, 1, [0, 4, 8, 12, 16])
    plan = ring_plan(lay, causal=True)
    assert plan.steps == 1 and plan.payload == ((),) * 4
    # Documents [6, 10) over ranks 1-2 and [10, 16) over ranks 2-3: one step; only their
    # first parts travel (causal: later ranks need earlier keys).
    plan = ring_plan(ring_layout("contiguous", 16, 4, 1, [0, 4, 6, 10, 16]), causal=True)
    assert plan.steps == 2 and plan.payload == ((), ((2, 4),), ((2, 4),), ())
    # Packed: short documents stay whole, so they never travel.
    lay = ring_layout("packed", 64, 4, 1, [0] + list(range(4, 65, 4)))
    assert ring_plan(lay, causal=True).steps == 1


def test_window_limits_steps():
    lay = ring_layout("contiguous", 64, 8, 1)
    for left, steps in ((3, 2), (8, 2), (9, 3), (63, 8)):
        assert ring_plan(lay, causal=True, window=(left, 0)).steps == steps, left
    plan = ring_plan(lay, causal=True, window=(3, 0))
    assert all(plan.payload_len(o) == 3 for o in range(7))   # only the last 3 keys travel
    # zigzag: each rank's two chunks border both neighbours; only the edges travel
    plan = ring_plan(ring_layout("zigzag", 64, 4, 1), causal=True, window=(2, 0))
    assert plan.steps == 4 and all(plan.payload_len(o) <= 4 for o in range(4))


def test_step_structure():
    plan = ring_plan(ring_layout("zigzag", 40, 5, 1), causal=True)
    assert plan.steps == 5
    for r in range(5):
        assert [plan.kv_source(r, t) for t in range(5)] == [(r - t) % 5 for t in range(5)]


def test_balance_of_causal_layouts():
    world, seq = 8, 8 * 32
    loads = {layout: work(ring_plan(ring_layout(layout, seq, world, 1), True))
             for layout in LAYOUTS}
    # zigzag is perfectly balanced; stripe within one diagonal; contiguous is not balanced
    assert len(set(loads["zigzag"])) == 1
    assert max(loads["stripe"]) / (sum(loads["stripe"]) / world) < 1.15
    assert max(loads["contiguous"]) / (sum(loads["contiguous"]) / world) > 1.8
    for layout, l in loads.items():  # total work is the same causal triangle for all
        assert sum(l) == seq * (seq + 1) // 2


def test_bad_plan_arguments():
    with pytest.raises(ValueError, match="layout"):
        ring_layout("spiral", 4, 2, 1)
    with pytest.raises(ValueError, match="helper schedule"):
        helper_plan(ring_layout("zigzag", 8, 2, 1))


def test_helper_plan_coverage_balance_and_steps():
    for world in range(1, 41):
        chunks = 2 if world % 2 == 0 and world > 1 else 1
        seq = world * chunks
        plan = helper_plan(ring_layout("contiguous", seq, world, 1))
        assert plan.steps == world // 2 + 1
        assert_exact_cover(plan, expected_pairs(seq, causal=True), world)
        assert balance(plan)["max_over_mean"] <= 1 + 1 / world
        # every inbound message has a matching outbound one at the same step
        for r in range(world):
            for t in range(plan.steps):
                for kind, src, rows in plan.inbound(r, t):
                    assert (kind, r, rows) in plan.outbound(src, t)


def test_balance_report_of_every_schedule():
    world, seq = 8, 8 * 32
    report = {name: balance(p) for name, p in {
        "ring-contiguous": ring_plan(ring_layout("contiguous", seq, world, 1), True),
        "ring-zigzag": ring_plan(ring_layout("zigzag", seq, world, 1), True),
        "ring-stripe": ring_plan(ring_layout("stripe", seq, world, 1), True),
        "helper": helper_plan(ring_layout("contiguous", seq, world, 1))}.items()}
    assert report["helper"]["steps"] == 5 and report["ring-zigzag"]["steps"] == 8
    assert report["helper"]["max_over_mean"] == 1.0 == report["ring-zigzag"]["max_over_mean"]
    assert report["ring-stripe"]["max_over_mean"] < 1.1
    assert report["ring-contiguous"]["max_over_mean"] > 1.8
