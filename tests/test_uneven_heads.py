"""Ulysses degrees that do not divide the heads ("Ulysses anything"): q head groups are dealt
out unevenly (``distattn.ulysses.head_split``) and the all-to-alls carry unequal parts. fp64
against the dense reference at 1e-10 (out, lse, dq, dk, dv, dsinks) on gloo worlds 2/4/8:
pure Ulysses, USP both placements, every layout, documents, windows and sinks."""
import pytest

from dist_cases import Case, run_attention_cases
from distattn.ulysses import check_heads, head_split
from spawn import run_world

LAYOUTS = ("contiguous", "zigzag", "stripe", "packed")


def _cases(world):
    cases, i = [], 0
    heads = {2: ((3, 3), (6, 3), (3, 1)),
             4: ((12, 3), (6, 6), (6, 2), (5, 1)),
             8: ((12, 3), (10, 5))}[world]
    meshes = {2: ((2, "ulysses_inner"),),
              4: ((4, "ulysses_inner"), (2, "ulysses_inner"), (2, "ring_inner")),
              8: ((4, "ulysses_inner"),)}[world]
    for u, placement in meshes:
        for hq, hkv in heads:
            if hq % u == 0 and (hkv % u == 0 or u % hkv == 0):
                continue                       # an even split: covered elsewhere
            for layout in LAYOUTS if world < 8 else ("zigzag", "packed"):
                causal = i % 3 != 2
                docs = ("", "mixed", "random")[i % 3] if layout != "packed" else "random"
                window = (4, 0) if i % 5 == 1 else None
                cases.append(Case(world, u, world // u, placement, layout, causal, hq, hkv,
                                  16, 1 + i % 2 * (not docs), "fp64",
                                  ("torch", "reference")[i % 2], "auto", docs, window,
                                  0.0, i % 4 == 3))
                i += 1
    return cases


ALL = [c for w in (2, 4, 8) for c in _cases(w)]
_results = {}


@pytest.mark.parametrize("case", ALL, ids=[c.id for c in ALL])
def test_uneven_heads_match_fp64(case):
    if case.world not in _results:
        _results[case.world] = run_world(case.world, run_attention_cases, _cases(case.world))
    for rank, res in enumerate(_results[case.world]):
        errs = res[case.id]
        for name in ("out", "lse", "dq", "dk", "dv") + (("dsinks",) if case.sinks else ()):
            assert errs[name] <= 1e-10, f"rank {rank}: {name} relative error {errs[name]:.3e}"


def test_head_split():
    s = head_split(12, 3, 4)        # 3 K/V heads of 4 q heads over 4 ranks: cut in halves
    assert s.q_bounds == ((0, 4), (4, 8), (8, 10), (10, 12))
    assert s.kv_index == ((0,), (1,), (2,), (2,)) and not s.even
    s = head_split(40, 8, 16)
    sizes = [b - a for a, b in s.q_bounds]
    assert sorted(set(sizes)) == [2, 3] and sum(sizes) == 40
    for (a, b), ix in zip(s.q_bounds, s.kv_index):   # every q head reads its own K/V head
        group = (b - a) // len(ix)
        assert [ix[(h - a) // group] for h in range(a, b)] == [h // 5 for h in range(a, b)]
    assert head_split(8, 2, 4).even and head_split(8, 8, 4).even
    with pytest.raises(ValueError, match="degree <= Hq"):
        check_heads(3, 1, 4)
