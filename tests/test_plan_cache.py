"""Plans are cached per (layout, documents, window, mesh shape) with cheap keys: a second
identical call builds nothing, a new documents tuple builds once."""
import random

import distattn.attention as attention
import distattn.plan as plan_mod
from distattn.documents import check_cu_seqlens
from distattn.layout import ring_layout


def _documents(n, seed):
    rng = random.Random(seed)
    cu = [0]
    for _ in range(n):
        cu.append(cu[-1] + rng.randint(1, 300))
    return cu


def _plan_of(cu, R=8, window=None):
    """What ``attention.prepare`` does for these documents: check, lay out, plan."""
    cu = check_cu_seqlens(cu)
    lay = ring_layout("packed", cu[-1], R, 1, cu)
    return attention._plan(lay, True, window, "ring")


def test_second_identical_call_builds_nothing(monkeypatch):
    builds = []
    real = plan_mod._reach
    monkeypatch.setattr(plan_mod, "_reach", lambda *a: builds.append(1) or real(*a))
    attention._plan.cache_clear()
    cu = _documents(2000, 1)
    first = _plan_of(list(cu))
    assert len(builds) == 1
    assert _plan_of(list(cu)) is first          # an equal list, not the same object
    assert _plan_of(tuple(cu)) is first
    assert len(builds) == 1
    other = _plan_of(_documents(2000, 2))       # new documents: built once
    assert len(builds) == 2 and other is not first
    assert _plan_of(_documents(2000, 2)) is other and len(builds) == 2
    _plan_of(cu, window=(64, 0))                # the window is part of the key
    _plan_of(cu, R=4)                           # and the mesh shape
    assert len(builds) == 4


def test_layout_hash_is_cheap_and_consistent():
    cu = tuple(_documents(500, 3))
    a = ring_layout("packed", cu[-1], 4, 2, cu)
    b = attention.RingLayout(**{f: getattr(a, f) for f in a.__dataclass_fields__})
    assert a == b and hash(a) == hash(b) and a is not b
    assert attention._plan(a, True, None, "ring") is attention._plan(b, True, None, "ring")
    c = ring_layout("packed", cu[-1], 4, 1, cu)
    assert c != a
