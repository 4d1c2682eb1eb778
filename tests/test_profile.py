"""Profile mode: per-step compute and wait spans for the ring, helper and all-gather
schedules."""
from dist_cases import run_profile_check
from spawn import run_world


def test_profiler_records_every_step_of_both_passes():
    world = 4
    for res in run_world(world, run_profile_check):
        for schedule, steps in (("ring", world), ("helper", world // 2 + 1), ("allgather", 1)):
            rows = res[schedule]["rows"]
            assert res[schedule]["same"]
            fwd = [r for r in rows if r["pass"] == "forward"]
            bwd = [r for r in rows if r["pass"] == "backward"]
            assert [r["step"] for r in fwd][:steps] == list(range(steps))
            assert len(bwd) >= steps
            assert all(r["compute_ms"] >= 0 and r["wait_ms"] >= 0 for r in rows)
            assert sum(r["compute_ms"] for r in fwd) > 0
