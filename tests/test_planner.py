"""distattn.plan_for and distattn.costmodel: deterministic choices, explanations, the
SPMesh.build(plan=...) hand-over, and errors that name the argument. No timing asserted."""
import time

import pytest

import distattn
from distattn import costmodel as cm
from distattn.planner import Plan, plan_for

from spawn import run_world


def test_choices_are_deterministic_and_runnable():
    for gpus, S, h in ((8, 131072, 32), (64, 262144, 64), (512, 1 << 20, 64)):
        a = plan_for(cm.cluster(gpus), S, h, 128, kv_heads=8)
        b = plan_for(cm.cluster(gpus), S, h, 128, kv_heads=8)
        assert (a.ulysses_degree, a.ring_degree, a.placement, a.layout, a.schedule) == \
            (b.ulysses_degree, b.ring_degree, b.placement, b.layout, b.schedule)
        assert a.ulysses_degree * a.ring_degree == gpus
        assert a.chosen.runnable and a.schedule in ("ring", "helper")
        assert a.prediction.seconds == min(c.prediction.seconds for c in a.candidates
                                           if c.runnable)


def test_hierarchical_placement_on_multi_node():
    """Across nodes the chosen Ulysses group fits in a node (all-to-all on NVLink)."""
    p = plan_for(cm.cluster(64), 262144, 64, 128, kv_heads=8)
    assert p.ulysses_degree <= 8 and p.placement == "ulysses_inner"
    assert p.ring_degree >= 8


def test_single_gpu_and_pure_ulysses_cases():
    p = plan_for(cm.Topology(1), 4096, 8, 64)
    assert (p.ulysses_degree, p.ring_degree) == (1, 1)
    # two heads cap the Ulysses degree at 2
    p = plan_for(cm.cluster(8), 65536, 2, 128)
    assert p.ulysses_degree <= 2


def test_explanation_lists_candidates():
    p = plan_for(cm.cluster(64), 262144, 32, 128, kv_heads=8)
    text = p.explain(top=100)
    assert "->" in text and "not measurements" in text
    for c in p.candidates:
        assert c.config.label in text
    modelled = [c for c in p.candidates if not c.runnable]
    assert modelled and all("modelled only" in c.note or "multiple" in c.note
                            or "odd" in c.note for c in modelled)
    assert any(c.config.schedule == "double_ring" for c in modelled)
    assert p.chosen.config.schedule != "double_ring"


def test_allgather_priced_but_never_chosen_while_missing():
    from distattn.attention import SCHEDULES
    p = plan_for(cm.cluster(8), 8 * 8192, 32, 128, kv_heads=8)
    ag = [c for c in p.candidates if c.config.schedule == "allgather"]
    assert ag
    if "allgather" not in SCHEDULES:
        assert all(not c.runnable for c in ag) and p.schedule != "allgather"


def test_documents_and_window():
    p = plan_for(cm.cluster(8), 65536, 32, 128, kv_heads=8, documents=[60000, 5536])
    assert p.layout in ("doc_zigzag", "contiguous")
    p = plan_for(cm.cluster(8), 65536, 32, 128, kv_heads=8, window=(4096, 0))
    assert p.layout == "contiguous" and "window" in p.explain()


@pytest.mark.parametrize("kwargs, arg", [
    (dict(seq_len=0), "seq_len"), (dict(heads=-1), "heads"), (dict(kv_heads=5), "kv_heads"),
    (dict(seq_len=1001), "seq_len"), (dict(window=3), "window"),
    (dict(ulysses_degrees=[3]), "ulysses_degrees")])
def test_invalid_arguments_name_themselves(kwargs, arg):
    base = dict(seq_len=65536, heads=32, head_dim=128)
    base.update(kwargs)
    with pytest.raises(ValueError, match=arg):
        plan_for(cm.cluster(8), **base)


@pytest.mark.parametrize("kwargs, arg", [
    (dict(gpus=0), "gpus"), (dict(gpus=12, gpus_per_node=8), "gpus"),
    (dict(gpus=8, gpus_per_node=0), "gpus_per_node"), (dict(gpus=8, overlap=2.0), "overlap"),
    (dict(gpus=8, intra=cm.LinkClass("x", 0.0, 0.0)), "intra")])
def test_invalid_topologies_raise(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        cm.Topology(**kwargs)
    with pytest.raises(ValueError, match="topology"):
        plan_for("8 GPUs", 65536, 32, 128)


def test_model_runs_at_1024_gpus_in_seconds():
    t = time.perf_counter()
    p = plan_for(cm.cluster(1024), 1 << 20, 64, 128, kv_heads=8)
    assert time.perf_counter() - t < 10 and p.ulysses_degree * p.ring_degree == 1024


def test_costmodel_terms():
    top, w = cm.cluster(8), cm.Workload(65536, 32, 128, 8)
    contiguous = cm.predict(top, w, cm.Config(1, 8, "contiguous", "ring"))
    zigzag = cm.predict(top, w, cm.Config(1, 8, "zigzag", "ring"))
    assert contiguous.compute > 1.5 * zigzag.compute      # causal imbalance of a plain ring
    assert 0 < zigzag.efficiency <= 1.05
    slow = cm.Topology(8, 8, cm.PCIE4, cm.IB_HDR, cm.FA2_H100)
    assert cm.predict(slow, w, cm.Config(8, 1)).a2a > cm.predict(top, w, cm.Config(8, 1)).a2a
    with pytest.raises(ValueError, match="gpus"):
        cm.predict(top, w, cm.Config(2, 2))


def _build_with_plan(rank, world, plan):
    mesh = distattn.SPMesh.build(plan=plan)
    try:
        distattn.SPMesh.build(ulysses_degree=2, plan=plan)
        conflict = None
    except ValueError as e:
        conflict = str(e)
    return mesh.ulysses_degree, mesh.ring_degree, mesh.placement, conflict


def test_spmesh_build_uses_plan():
    plan = plan_for(cm.Topology(2, 2), 4096, 4, 64, ulysses_degrees=[2])
    assert isinstance(plan, Plan) and plan.ulysses_degree == 2
    for u, r, placement, conflict in run_world(2, _build_with_plan, plan, timeout=120):
        assert (u, r, placement) == (plan.ulysses_degree, plan.ring_degree, plan.placement)
        assert conflict and "plan" in conflict
