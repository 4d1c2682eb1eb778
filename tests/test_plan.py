"""Ring plans are pure data: coverage (every visible pair exactly once) and balance."""
import pytest

from distattn.plan import ring_plan, token_slices, visible_pairs, work

LAYOUTS = ("contiguous", "zigzag", "stripe")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("causal", (False, True))
def test_every_visible_pair_exactly_once(layout, causal):
    for world in range(1, 17):
        plan = ring_plan(world, layout, causal)
        counts = visible_pairs(plan, chunk_len=2)
        seq = world * plan.chunks * 2
        expected = {(i, j) for i in range(seq) for j in range(seq) if j <= i or not causal}
        assert set(counts) == expected, (world, layout, causal)
        assert set(counts.values()) == {1}, (world, layout, causal)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_step_structure(layout):
    plan = ring_plan(5, layout, causal=True)
    assert plan.steps == 5
    for r in range(5):
        assert [plan.kv_source(r, t) for t in range(5)] == [(r - t) % 5 for t in range(5)]
        assert plan.blocks[r][0][0].mask.kind == "causal"  # the local diagonal comes first


def test_balance_of_causal_layouts():
    world = 8
    loads = {layout: work(ring_plan(world, layout, True), chunk_len=16) for layout in LAYOUTS}
    # zigzag is perfectly balanced; stripe within one diagonal; contiguous is not balanced
    assert len(set(loads["zigzag"])) == 1
    assert max(loads["stripe"]) / (sum(loads["stripe"]) / world) < 1.15
    assert max(loads["contiguous"]) / (sum(loads["contiguous"]) / world) > 1.8
    for layout, l in loads.items():  # total work is the same causal triangle for all
        seq = world * 16 * (2 if layout == "zigzag" else 1)
        assert sum(l) == seq * (seq + 1) // 2


def test_token_slices():
    plan = ring_plan(4, "zigzag", causal=True)
    blk = plan.blocks[3][2][0]  # rank 3 meets rank 1 (s < r): all queries, first key chunk
    assert token_slices(blk, 10, plan.chunks) == (slice(0, 10), slice(0, 5))


def test_bad_plan_arguments():
    with pytest.raises(ValueError, match="layout"):
        ring_plan(2, "spiral")
    with pytest.raises(ValueError, match="world"):
        ring_plan(0)


def test_helper_plan_coverage_balance_and_steps():
    from distattn.plan import balance, helper_plan
    for world in range(1, 65):
        plan = helper_plan(world)
        assert plan.steps == world // 2 + 1
        counts = visible_pairs(plan, chunk_len=1)
        seq = world * plan.chunks
        assert len(counts) == seq * (seq + 1) // 2, world
        assert all(q >= k for q, k in counts) and set(counts.values()) == {1}, world
        assert balance(plan, chunk_len=4)["max_over_mean"] <= 1 + 1 / world
        # every inbound message has a matching outbound one at the same step
        for r in range(world):
            for t in range(plan.steps):
                for kind, src, rows in plan.inbound(r, t):
                    assert (kind, r, rows) in plan.outbound(src, t)


def test_balance_report_of_every_schedule():
    from distattn.plan import balance, helper_plan
    world = 8
    report = {name: balance(p, chunk_len=16) for name, p in {
        "ring-contiguous": ring_plan(world, "contiguous", True),
        "ring-zigzag": ring_plan(world, "zigzag", True),
        "ring-stripe": ring_plan(world, "stripe", True),
        "helper": helper_plan(world)}.items()}
    assert report["helper"]["steps"] == 5 and report["ring-zigzag"]["steps"] == 8
    assert report["helper"]["max_over_mean"] == 1.0 == report["ring-zigzag"]["max_over_mean"]
    assert report["ring-stripe"]["max_over_mean"] < 1.1
    assert report["ring-contiguous"]["max_over_mean"] > 1.8
