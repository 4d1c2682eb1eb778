"""schedule="allgather": its plan (coverage, what travels, agreement with the ring plan's
reach), that "auto" never picks it, and on real gloo processes that what the executor sends
is what the plan says and that ranks disagreeing on the schedule raise together. Exactness
against the fp64 reference runs in test_distributed.py (``dist_cases.allgather_cases``)."""
import random

import pytest
import torch

from distattn.attention import SCHEDULES, _resolve_schedule
from distattn.gather_plan import allgather_plan
from distattn.layout import ring_layout
from distattn.plan import ring_plan, work
from spawn import run_world
from test_plan import assert_exact_cover, expected_pairs, random_case

LAYOUTS = ("contiguous", "zigzag", "stripe", "packed", "doc_contiguous", "doc_zigzag")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_visible_pair_exactly_once(layout):
    """Random documents, lengths, windows and U: each visible pair is computed once."""
    rng = random.Random(layout)
    for _ in range(40):
        lay, seq, cu, causal, window = random_case(rng, layout)
        assert_exact_cover(allgather_plan(lay, causal, window),
                           expected_pairs(seq, cu, causal, window),
                           (lay.ring_degree, lay.ulysses_degree, cu, causal, window))
    for world in (1, 2, 3, 8):          # and without documents
        if layout in ("contiguous", "zigzag", "stripe"):
            seq = world * 4
            for causal in (False, True):
                plan = allgather_plan(ring_layout(layout, seq, world, 1), causal)
                assert_exact_cover(plan, expected_pairs(seq, causal=causal), (world, causal))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gathers_within_the_ring_payload(layout):
    """What an owner sends any rank is inside the ring plan's payload of that owner (both
    come from the same block masks), and the compute is the ring's."""
    rng = random.Random("payload" + layout)
    for _ in range(30):
        lay, seq, cu, causal, window = random_case(rng, layout)
        gather, ring = allgather_plan(lay, causal, window), ring_plan(lay, causal, window)
        for o in range(lay.ring_degree):
            payload = {j for a, b in ring.payload[o] for j in range(a, b)}
            for r in range(lay.ring_degree):
                if r != o:
                    assert {j for a, b in gather.need(r, o) for j in range(a, b)} <= payload
        assert work(gather) == work(ring)


def test_windows_and_documents_cut_the_gathered_bytes():
    slot_bytes = 2 * 4 * 2 * 64 * 8    # K and V, batch 2, 4 K/V heads, head dim 64, fp64
    full = allgather_plan(ring_layout("contiguous", 64, 4, 1), causal=True)
    # full causal: rank r gathers every earlier rank's 16 slots
    assert [full.gathered_slots(r) for r in range(4)] == [0, 16, 32, 48]
    assert [full.sent_slots(r) for r in range(4)] == [48, 32, 16, 0]
    # a window shorter than a shard: only the previous rank's last 3 slots
    win = allgather_plan(ring_layout("contiguous", 64, 4, 1), causal=True, window=(3, 0))
    assert [win.gathered_slots(r) for r in range(4)] == [0, 3, 3, 3]
    assert win.need(2, 1) == ((13, 16),) and win.need(2, 0) == ()
    assert win.gather_bytes(slot_bytes) == 9 * slot_bytes < full.gather_bytes(slot_bytes)
    # zigzag: the window reaches only the chunk edges next to a rank's chunks
    zz_full = allgather_plan(ring_layout("zigzag", 64, 4, 1), causal=True)
    zz_win = allgather_plan(ring_layout("zigzag", 64, 4, 1), causal=True, window=(2, 0))
    assert zz_win.gather_bytes(slot_bytes) < zz_full.gather_bytes(slot_bytes) / 10
    # documents that stay on one rank: nothing travels; packed short documents neither
    docs = allgather_plan(ring_layout("contiguous", 16, 4, 1, [0, 4, 8, 12, 16]), True)
    assert docs.gather_bytes(slot_bytes) == 0
    packed = allgather_plan(ring_layout("packed", 64, 4, 1, [0] + list(range(4, 65, 4))), True)
    assert packed.gather_bytes(slot_bytes) == 0
    # one document over ranks 1-2: rank 2 gathers only its first part, from rank 1
    crossing = allgather_plan(ring_layout("contiguous", 16, 4, 1, [0, 4, 6, 10, 16]), True)
    assert [crossing.gathered_slots(r) for r in range(4)] == [0, 0, 2, 2]


def test_one_launch_over_the_gathered_keys():
    """Contiguous causal: the gathered keys are in global order, so rank r's mask is one
    causal band over them."""
    plan = allgather_plan(ring_layout("contiguous", 32, 4, 1), causal=True)
    for r in range(4):
        assert len(plan.mask(r).pieces) == 1 and plan.key_len(r) == 8 * (r + 1)


def test_auto_never_picks_allgather():
    assert "allgather" in SCHEDULES
    for layout in ("contiguous", "zigzag", "stripe", "packed"):
        for causal in (False, True):
            for R in (1, 2, 3, 4):
                for docs in (False, True):
                    for window in (False, True):
                        assert _resolve_schedule("auto", layout, causal, 8, R, docs,
                                                 window) != "allgather"
                        assert _resolve_schedule("allgather", layout, causal, 7, R, docs,
                                                 window) == "allgather"


def _bytes_and_agreement(rank: int, world: int) -> dict:
    """On a ring of ``world``: the elements the all-gather executor receives (forward and the
    backward's gather + reduce-scatter) for a full causal and a windowed call, what a
    disagreement on the schedule (rank 1 allgather, the others ring) raises, then
    ``dist_flash_attn_backward`` against autograd and a good call (the group must still be in
    step)."""
    import distattn
    from distattn import allgather as executor
    from distattn.attention import dist_flash_attn_backward

    received = []
    real = executor.start_all_to_all_v

    def counting(send, shapes, group, what):
        received.append((what, sum(torch.Size(s).numel() for parts in shapes for s in parts)))
        return real(send, shapes, group, what)

    executor.start_all_to_all_v = counting
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 16, 4, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    res = {}
    for name, window in (("full", None), ("window", (3, 0))):
        received.clear()
        ql = q.clone().requires_grad_()
        out = distattn.dist_flash_attn(ql, k, v, causal=True, schedule="allgather",
                                       window=window)
        out.sum().backward()
        res[name] = list(received)
    executor.start_all_to_all_v = real

    def outcome(fn):
        try:
            fn()
            return ("ok", "")
        except Exception as exc:    # the test asserts on the type and message
            return (type(exc).__name__, str(exc))

    schedule = "allgather" if rank == 1 else "ring"
    res["forward"] = outcome(lambda: distattn.dist_flash_attn(q, k, v, causal=True,
                                                              schedule=schedule))
    res["backward"] = outcome(lambda: dist_flash_attn_backward(
        q, q, k, v, q, torch.zeros(1, 4, 16, dtype=torch.float64), causal=True,
        schedule=schedule))
    # dist_flash_attn_backward (rematerialization) gives autograd's gradients
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = distattn.dist_flash_attn(*ins, causal=True, schedule="allgather", window=(3, 0),
                                        return_lse=True)
    dout = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    out.backward(dout)
    alone = dist_flash_attn_backward(dout, q, k, v, out.detach(), lse, causal=True,
                                     schedule="allgather", window=(3, 0))
    res["backward_alone"] = max(float((a - t.grad).abs().max()) for a, t in zip(alone, ins))
    good = distattn.dist_flash_attn(q, k, v, causal=True, schedule="allgather")
    ring = distattn.dist_flash_attn(q, k, v, causal=True, schedule="ring")
    res["after"] = float((good - ring).abs().max())
    return res


def test_executor_sends_what_the_plan_says_and_ranks_agree_on_the_schedule():
    world = 2
    per_rank = run_world(world, _bytes_and_agreement)
    slot = 2 * 4 * 8                      # K and V, 4 heads, head dim 8 (batch 1)
    for name, window in (("full", None), ("window", (3, 0))):
        plan = allgather_plan(ring_layout("contiguous", 16 * world, world, 1), True, window)
        for r, res in enumerate(per_rank):
            got = dict(res[name])
            assert got["all-gather of K/V (forward)"] == plan.gathered_slots(r) * slot
            assert got["all-gather of K/V (backward)"] == plan.gathered_slots(r) * slot
            assert got["reduce-scatter of dK/dV (backward)"] == plan.sent_slots(r) * slot
    assert sum(dict(res["window"])["all-gather of K/V (forward)"] for res in per_rank) < \
        sum(dict(res["full"])["all-gather of K/V (forward)"] for res in per_rank) / 4
    for res in per_rank:
        for call in ("forward", "backward"):
            kind, message = res[call]
            assert kind == "ValueError" and "'schedule'" in message, (call, message)
        assert res["after"] < 1e-12 and res["backward_alone"] == 0.0


def test_head_chunks_argument():
    lay = ring_layout("zigzag", 32, 4, 1)
    assert allgather_plan(lay, True).head_chunks == 1      # the default: one gather
    plan = allgather_plan(lay, True, head_chunks=3)
    assert plan.head_ranges(8) == [(0, 2), (2, 5), (5, 8)]
    assert plan.head_ranges(2) == [(0, 1), (1, 2)]          # at most one group per K/V head
    assert plan.gather_bytes(1) == allgather_plan(lay, True).gather_bytes(1)
    for bad in (0, -1, 1.5, True, None):
        with pytest.raises(ValueError, match="head_chunks"):
            allgather_plan(lay, True, head_chunks=bad)


# (ulysses, layout, causal, window, docs, hkv, head_chunks, sinks)
HEAD_CHUNK_CASES = (
    (1, "zigzag", True, None, "", 2, 2, False),
    (1, "stripe", False, (3, 5), "random", 8, 3, True),
    (2, "packed", True, (4, 0), "mixed", 4, 2, False),
    (2, "contiguous", True, None, "", 8, 8, False),
    (1, "doc_zigzag", True, None, "mixed", 1, 4, False),     # MQA: one group
)


def _head_chunk_results(rank: int, world: int) -> dict:
    """Each HEAD_CHUNK_CASES entry through the USP executor with an all-gather plan of that
    many head groups, against the dense fp64 reference (dist_cases' independent math);
    also which collectives the executor posted."""
    import dataclasses

    import distattn
    from distattn import allgather as executor
    from distattn.attention import prepare
    from distattn.hybrid import USPAttention
    from distattn.layout import local_indices
    from dist_cases import DOC_SETS, _rel, dense_attention, visibility

    posted = []
    real = executor.start_all_to_all_v

    def recording(send, shapes, group, what):
        posted.append(what)
        return real(send, shapes, group, what)

    executor.start_all_to_all_v = recording
    meshes, res = {}, {}
    for i, (u, layout, causal, window, docs, hkv, chunks, sinks) in enumerate(HEAD_CHUNK_CASES):
        mesh = meshes.setdefault(u, distattn.SPMesh.build(ulysses_degree=u))
        cu = DOC_SETS[docs](world) if docs else None
        S = cu[-1] if docs else 8 * world
        gen = torch.Generator().manual_seed(100 + i)
        q, k, v = (torch.randn(1, S, h, 16, generator=gen, dtype=torch.float64)
                   for h in (8, hkv, hkv))
        dout = torch.randn(1, S, 8, 16, generator=gen, dtype=torch.float64)
        s = torch.randn(8, generator=gen, dtype=torch.float64) if sinks else None
        ref = [t.clone().requires_grad_() for t in (q, k, v)]
        ref_out, ref_lse = dense_attention(*ref, visibility(S, cu, causal, window), sinks=s)
        ref_grads = torch.autograd.grad(ref_out, ref, dout)
        shard = lambda t, dim=1: distattn.shard(t, mesh, dim=dim, layout=layout, cu_seqlens=cu)
        real_slots = local_indices(S, mesh, layout, cu) >= 0
        ql, kl, vl = (shard(t).clone().requires_grad_() for t in (q, k, v))
        cfg = prepare(ql, kl, vl, mesh=mesh, causal=causal, layout=layout,
                      schedule="allgather", cu_seqlens=cu, window=window, sinks=s)
        cfg = dataclasses.replace(cfg, plan=dataclasses.replace(cfg.plan, head_chunks=chunks))
        posted.clear()
        out, lse = USPAttention.apply(ql, kl, vl, None, cfg)
        out.backward(shard(dout))
        pick = lambda t, dim=1: t.index_select(dim, real_slots.nonzero().flatten())
        res[i] = {"posted": list(posted),
                  "err": max(_rel(pick(out), pick(shard(ref_out))),
                             _rel(pick(lse, 2), pick(shard(ref_lse, 2), 2)),
                             *(_rel(pick(g), pick(shard(r)))
                               for g, r in zip((ql.grad, kl.grad, vl.grad), ref_grads)))}
    executor.start_all_to_all_v = real
    return res


def test_head_chunks_overlap_and_stay_exact():
    """head_chunks > 1 on ring 4 and USP 2 x 2: exact (fp64), one gather per head group each
    way and one dK/dV return per group, posted in the overlapping order."""
    world = 4
    for res in run_world(world, _head_chunk_results):
        for i, (u, *_, hkv, chunks, _) in enumerate(HEAD_CHUNK_CASES):
            assert res[i]["err"] < 1e-10, (HEAD_CHUNK_CASES[i], res[i]["err"])
            groups = min(chunks, max(hkv, u) // u)  # K/V heads the executor sees
            kinds = [w.split(" (")[0] for w in res[i]["posted"]]
            assert kinds == (["all-gather of K/V"] * groups + ["all-gather of K/V"] +
                             ["all-gather of K/V", "reduce-scatter of dK/dV"] * (groups - 1)
                             + ["reduce-scatter of dK/dV"]), (i, kinds)
