"""Schedules, as pure data (no torch.distributed): who computes which block at which step.

Every plan is derived from a ``layout.RingLayout`` (which global token sits in which slot of
which ring part) and the attention's global bounds (causal, window; ``segments``), so
documents, padding, windows and every layout share one mechanism.

A *ring plan* (``RingPlan``): at step t, rank r holds the K/V of rank ``(r - t) mod R`` (they
travel one hop forward per step) and computes one block, ``masks(r)[t]``: all of r's slots
against the keys it holds. At step 0 those are r's own slots; at step t >= 1 they are the
owner's *payload*, the ranges of its slots that some other rank needs (``payload[owner]``,
packed one after the other), so tokens nobody else sees (whole documents of the packed layout,
keys outside every window) never travel. The ring stops after ``steps`` steps, the last one at
which any rank sees anything.

A *helper plan* (``HelperPlan``; DistFlashAttn's schedule for causal attention on the
contiguous layout) pairs rank r at step t >= 1 with rank (r - t) mod P. If r >= t, r computes
its queries against that rank's K/V ("own"); otherwise r is idle in a plain ring, so it helps:
it computes that rank's queries against its own K/V and returns the partial (out, lse)
("help"). For even P the last step's pairs would meet twice, so owner and helper each take half
of the query rows. P // 2 + 1 steps in all, every rank doing the same work (without documents).

Both plans answer ``computes(rank, step)`` with ``Work`` items; ``visible_pairs`` and ``work``
turn those into global (query, key) pairs and per-rank loads, so tests can check coverage
(every visible pair computed exactly once) and balance.
"""
from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass
from typing import Optional

from .kernels.mask import Mask
from .kernels.varlen import merge_bands, tight_bands
from .layout import RingLayout, Segment
from .segments import attention_bounds, block_mask


@dataclass(frozen=True)
class Work:
    """One block computed somewhere: ``q_owner``'s slots ``q`` (a slice) meet ``kv_owner``'s
    slots ``k`` (a tuple of (start, stop) ranges, packed one after the other) under ``mask``
    (in the block's coordinates)."""
    q_owner: int
    q: slice
    kv_owner: int
    k: tuple
    mask: Mask

    @property
    def key_slots(self) -> list:
        return [j for a, b in self.k for j in range(a, b)]


@dataclass(frozen=True, eq=False)
class RingPlan:
    layout: RingLayout
    bounds: tuple    # (lo, hi) on key - query, global tokens (segments.attention_bounds)
    steps: int       # steps executed, <= world
    payload: tuple   # payload[owner] = ((start, stop), ...): the owner's slots that travel

    @property
    def world(self) -> int:
        return self.layout.ring_degree

    def kv_source(self, rank: int, step: int) -> int:
        return (rank - step) % self.world

    def key_slots(self, rank: int, step: int) -> tuple:
        """The K/V owner's slot ranges that ``rank`` holds at ``step``."""
        if step == 0:
            return ((0, self.layout.part_len),)
        return self.payload[self.kv_source(rank, step)]

    def key_len(self, rank: int, step: int) -> int:
        return sum(b - a for a, b in self.key_slots(rank, step))

    def payload_len(self, owner: int) -> int:
        return sum(b - a for a, b in self.payload[owner])

    def payload_segments(self, owner: int) -> tuple:
        """The owner's segments inside its payload, in the payload's packed slot
        coordinates (what a holder's K/V buffer holds)."""
        return _payload_segments(self, owner)

    def masks(self, rank: int) -> tuple:
        """``rank``'s mask at every step: its part x (own part | the owner's payload).
        Computed for one rank at a time (an executor needs only its own), then cached."""
        return _rank_masks(self, rank)

    def active(self, rank: int) -> tuple:
        """Per step, whether ``rank``'s mask shows any pair (an executor skips the others);
        cached with the masks, so a ring step does no mask arithmetic."""
        return _rank_active(self, rank)

    def computes(self, rank: int, step: int) -> list:
        mask = self.masks(rank)[step]
        if not mask.pieces:
            return []
        return [Work(rank, slice(0, self.layout.part_len), self.kv_source(rank, step),
                     self.key_slots(rank, step), mask)]


@functools.lru_cache(maxsize=1024)
def _payload_segments(plan: RingPlan, owner: int) -> tuple:
    segs = plan.layout.parts[owner]            # sorted by start, disjoint
    stops = [sg.stop for sg in segs]
    out, base = [], 0
    for a, b in plan.payload[owner]:
        for sg in segs[bisect.bisect_right(stops, a):]:
            if sg.start >= b:
                break
            lo, hi = max(a, sg.start), min(b, sg.stop)
            out.append(Segment(base + lo - a, hi - lo, sg.g0 + sg.stride * (lo - sg.start),
                               sg.stride, sg.doc))
        base += b - a
    return tuple(out)


def coalesce(mask: Mask, sq: int, sk: int) -> Mask:
    """The same pairs in as few pieces as merging neighbours into single bands gives (a
    layout cuts one document into several runs; e.g. zigzag's local diagonal is 3 pieces
    whose union is one causal band): fewer, larger kernel calls."""
    return Mask(tuple(b.as_piece() for b in merge_bands(tight_bands(mask, sq, sk))))


@functools.lru_cache(maxsize=256)
def _rank_masks(plan: RingPlan, rank: int) -> tuple:
    lay, n = plan.layout, plan.layout.part_len
    keys = lambda t: (plan.payload_segments(plan.kv_source(rank, t)) if t
                      else lay.parts[rank])
    return tuple(coalesce(block_mask(lay.parts[rank], keys(t), plan.bounds), n,
                          plan.key_len(rank, t))
                 for t in range(plan.steps))


@functools.lru_cache(maxsize=256)
def _rank_active(plan: RingPlan, rank: int) -> tuple:
    n = plan.layout.part_len
    return tuple(bool(m.simplify(n, plan.key_len(rank, t)).pieces)
                 for t, m in enumerate(plan.masks(rank)))


def _reach(lay: RingLayout, bounds: tuple) -> tuple:
    """(steps, payload) of a ring over ``lay``: the last step at which any rank sees a key it
    receives, and per owner the slots that some other rank sees (sorted, merged ranges).

    Per document, from its runs (segments) alone, never from pairwise block masks:

    - no left window bound: each rank's last query token and first key token decide which
      ranks see which (``_reach_open``), O(h log h) for a document held by h ranks;
    - a left bound on stride-1 runs (every layout but ``stripe``): a document's runs are
      disjoint intervals, so a key run is seen from other ranks only through the nearest
      other-rank run on each side (payload), and the ranks that see it are the runs within
      the window's distance (steps), found by bisection (``_reach_window``);
    - otherwise (strided runs with a left bound) every pair of runs is solved in closed form.

    So a packed row of D documents over P ranks plans in O(D + segments log P) when the
    window does not bound the left side (the usual causal case); ``tests/test_plan_reach.py``
    checks the results against the pairwise algorithm this replaced."""
    R, lo_g, hi_g = lay.ring_degree, bounds[0], bounds[1]
    holders: dict = {}            # doc -> [(rank, segment)]
    for r, segs in enumerate(lay.parts):
        for sg in segs:
            holders.setdefault(sg.doc, []).append((r, sg))
    far, need = 0, [[] for _ in range(R)]
    for runs in holders.values():
        if all(r == runs[0][0] for r, _ in runs):
            continue              # one rank holds the whole document: nothing travels
        if lo_g is None:
            far = _reach_open(runs, R, hi_g, far, need)
        elif all(sg.stride == 1 for _, sg in runs):
            far = _reach_window(runs, R, lo_g, hi_g, far, need)
        else:
            far = _reach_pairs(runs, R, lo_g, hi_g, far, need)
    return far + 1, tuple(_merge_ranges(spans) for spans in need)


def _farthest(ranks, owner: int, R: int) -> Optional[int]:
    """The ring distance (r - owner) mod R of the farthest r != owner in the sorted list
    ``ranks``: the largest r below the owner, else the largest above it."""
    i = bisect.bisect_left(ranks, owner)
    if i:
        return (ranks[i - 1] - owner) % R
    top = ranks[-1] if ranks[-1] != owner else (ranks[-2] if len(ranks) > 1 else owner)
    return None if top == owner else (top - owner) % R


def _last(sg: Segment) -> int:
    return sg.g0 + sg.stride * (sg.length - 1)


def _reach_open(runs, R: int, hi_g, far: int, need: list) -> int:
    """One document without a left bound: rank r's queries see owner o's keys iff r's last
    query + hi reaches o's first key; the keys anyone else sees are a prefix of each run."""
    qmax: dict = {}
    kmin: dict = {}
    for r, sg in runs:
        qmax[r] = max(qmax.get(r, _last(sg)), _last(sg))
        kmin[r] = min(kmin.get(r, sg.g0), sg.g0)
    if far < R - 1:               # else nothing can raise it
        by_query = sorted(qmax, key=qmax.get, reverse=True)
        seeing, at = [], 0        # ranks whose last query reaches the threshold, sorted
        for o in sorted(kmin, key=kmin.get, reverse=True):
            need_q = None if hi_g is None else kmin[o] - hi_g
            while at < len(by_query) and (need_q is None or qmax[by_query[at]] >= need_q):
                bisect.insort(seeing, by_query[at])
                at += 1
            if seeing:
                d = _farthest(seeing, o, R)
                if d is not None:
                    far = max(far, d)
    best = sorted(qmax.items(), key=lambda rq: rq[1], reverse=True)[:2]
    for o, sg in runs:            # keys some other rank's query reaches: a prefix
        top = best[0][1] if best[0][0] != o else best[1][1]
        count = sg.length if hi_g is None else \
            min(sg.length, max(0, (top + hi_g - sg.g0) // sg.stride + 1))
        if count:
            need[o].append((sg.start, sg.start + count))
    return far


def _reach_window(runs, R: int, lo_g: int, hi_g, far: int, need: list) -> int:
    """One document of stride-1 runs with a left bound (lo <= 0 <= hi): its runs are disjoint
    intervals. A key run is seen from an earlier run up to that run's last token + hi (a
    prefix) and from a later run down to its first token + lo (a suffix), so only the nearest
    other-rank run on each side decides the payload; the runs that see it at all lie within
    distance hi before it and -lo after it."""
    runs = sorted(runs, key=lambda rs: rs[1].g0)
    ranks = [r for r, _ in runs]
    firsts = [sg.g0 for _, sg in runs]
    lasts = [_last(sg) for _, sg in runs]
    n = len(runs)
    prev, nxt = [None] * n, [None] * n      # nearest run of another rank on each side
    for i in range(1, n):
        prev[i] = i - 1 if ranks[i - 1] != ranks[i] else prev[i - 1]
    for i in range(n - 2, -1, -1):
        nxt[i] = i + 1 if ranks[i + 1] != ranks[i] else nxt[i + 1]
    for i, (o, sg) in enumerate(runs):
        first, last = firsts[i], lasts[i]
        upto = first - 1                    # keys [first, upto] seen from before
        if prev[i] is not None:
            upto = last if hi_g is None else min(last, lasts[prev[i]] + hi_g)
        since = last + 1                    # keys [since, last] seen from after
        if nxt[i] is not None:
            since = max(first, firsts[nxt[i]] + lo_g)
        if upto >= first:                   # (touching ranges are merged later)
            need[o].append((sg.start, sg.start + upto - first + 1))
        if since <= last:
            need[o].append((sg.start + since - first, sg.start + sg.length))
        if far == R - 1:
            continue
        a = 0 if hi_g is None else bisect.bisect_left(lasts, first - hi_g)
        b = bisect.bisect_right(firsts, last - lo_g)   # runs [a, b) see some key of run i
        for j in range(a, b):
            if ranks[j] != o:
                far = max(far, (ranks[j] - o) % R)
                if far == R - 1:
                    break
    return far


def _reach_pairs(runs, R: int, lo_g: int, hi_g, far: int, need: list) -> int:
    """One document of strided runs with a left bound: every (query run, key run) pair of
    different ranks in closed form. Key j of run k is seen by query i of run q iff
    a <= j - i <= b with a = ceil((lo - delta) / s), b = floor((hi - delta) / s)."""
    for o, ks in runs:
        for r, qs in runs:
            if r == o:
                continue
            if ks.stride != qs.stride:
                raise ValueError("segments of one document must share a stride")
            s, delta = ks.stride, ks.g0 - qs.g0
            a = -((delta - lo_g) // s)
            b = None if hi_g is None else (hi_g - delta) // s
            j0 = max(0, a)
            j1 = ks.length - 1 if b is None else min(ks.length - 1, qs.length - 1 + b)
            if (b is None or a <= b) and j0 <= j1:
                need[o].append((ks.start + j0, ks.start + j1 + 1))
                far = max(far, (r - o) % R)
    return far


def _merge_ranges(spans: list) -> tuple:
    """Sorted, disjoint (start, stop) ranges covering ``spans``; touching ones are joined."""
    out = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return tuple(out)


def ring_plan(lay: RingLayout, causal: bool = False, window: Optional[tuple] = None) -> RingPlan:
    """The ring plan of a layout (its own causal balance)."""
    bounds = attention_bounds(causal, window)
    steps, payload = _reach(lay, bounds)
    return RingPlan(lay, bounds, steps, payload)


# -- DistFlashAttn's helper schedule ------------------------------------------------------------

@dataclass(frozen=True)
class Task:
    """What one rank does at one step of a helper plan.

    kind "diag": its own queries with its own K/V (step 0);
    kind "own":  its query chunks ``rows`` with ``peer``'s K/V, which it receives;
    kind "help": ``peer``'s query chunks ``rows`` (received) with its own K/V; the partial
                 result goes back to ``peer`` (in backward: dq goes back, dK/dV stay).
    In backward an "own" task sends the dK/dV of ``peer``'s K/V back to ``peer``. ``mask`` is
    in the coordinates of (the ``rows`` slots) x (the K/V owner's whole part).
    """
    kind: str
    peer: int
    rows: tuple
    mask: Mask


@dataclass(frozen=True)
class HelperPlan:
    layout: RingLayout
    chunks: int
    tasks: tuple  # tasks[rank][step] -> Task

    @property
    def world(self) -> int:
        return self.layout.ring_degree

    @property
    def steps(self) -> int:
        return len(self.tasks[0])

    def slots(self, rows: tuple) -> slice:
        """The query slots of chunk rows ``(first, stop)`` (a task's or a message's)."""
        chunk = self.layout.part_len // self.chunks
        return slice(rows[0] * chunk, rows[1] * chunk)

    def computes(self, rank: int, step: int) -> list:
        task = self.tasks[rank][step]
        if not task.mask.pieces:
            return []
        q_owner, kv_owner = (task.peer, rank) if task.kind == "help" else (rank, task.peer)
        return [Work(q_owner, self.slots(task.rows), kv_owner, ((0, self.layout.part_len),),
                     task.mask)]

    def inbound(self, rank: int, step: int) -> list:
        """Who sends what to ``rank`` at ``step``: [(kind "kv" | "q", src, rows)]."""
        task = self.tasks[rank][step]
        if task.kind == "diag":
            return []
        return [("kv" if task.kind == "own" else "q", task.peer, task.rows)]

    def outbound(self, rank: int, step: int) -> list:
        """What ``rank`` sends at ``step``: [(kind "kv" | "q", dst, rows)], the mirror image
        of the other ranks' ``inbound``."""
        out = []
        for dst in range(self.world):
            task = self.tasks[dst][step]
            if dst != rank and task.peer == rank and task.kind != "diag":
                out.append(("kv" if task.kind == "own" else "q", dst, task.rows))
        return out


def helper_plan(lay: RingLayout, causal: bool = True, window: Optional[tuple] = None) -> HelperPlan:
    """DistFlashAttn's balanced schedule for causal attention on the contiguous layout. Masks
    come from the layout, so documents and windows only skip work (the messages stay)."""
    if lay.layout != "contiguous" or not causal:
        raise ValueError("the helper schedule is for causal attention on the contiguous layout")
    P = lay.ring_degree
    even = P % 2 == 0
    chunks = 2 if even and P > 1 else 1
    whole, first, second = (0, chunks), (0, 1), (1, 2)
    bounds = attention_bounds(causal, window)
    chunk = lay.part_len // chunks

    def task(kind, q_owner, kv_owner, peer, rows):
        mask = block_mask(lay.parts[q_owner], lay.parts[kv_owner], bounds,
                          rows=slice(rows[0] * chunk, rows[1] * chunk),
                          cols=slice(0, lay.part_len))
        return Task(kind, peer, rows, coalesce(mask, (rows[1] - rows[0]) * chunk,
                                               lay.part_len))

    tasks = []
    for r in range(P):
        row = [task("diag", r, r, r, whole)]
        for t in range(1, P // 2 + 1):
            split = even and t == P // 2   # pairs meet twice at this step: halve the rows
            if r >= t:
                row.append(task("own", r, r - t, r - t, first if split else whole))
            else:
                p = r - t + P
                row.append(task("help", p, r, p, second if split else whole))
        tasks.append(tuple(row))
    return HelperPlan(lay, chunks, tuple(tasks))


# -- coverage and balance (tests, benchmarks) ---------------------------------------------------

def visible_pairs(plan) -> dict:
    """Count, over the whole plan, how often each global (query, key) token pair is computed
    with the key visible. Returns {(q, k): count}."""
    lay = plan.layout
    owned = [lay.indices(r).tolist() for r in range(lay.ring_degree)]
    counts: dict = {}
    for r in range(plan.world):
        for t in range(plan.steps):
            for w in plan.computes(r, t):
                qi = owned[w.q_owner][w.q]
                ki = [owned[w.kv_owner][j] for j in w.key_slots]
                visible = w.mask.dense(len(qi), len(ki))
                for a, b in visible.nonzero().tolist():
                    pair = (qi[a], ki[b])
                    counts[pair] = counts.get(pair, 0) + 1
    return counts


def work(plan) -> list[int]:
    """Visible (query, key) pairs each rank computes: its compute load."""
    return [sum(w.mask.pairs(w.q.stop - w.q.start, len(w.key_slots))
                for t in range(plan.steps) for w in plan.computes(r, t))
            for r in range(plan.world)]


def balance(plan) -> dict:
    """Balance report: steps, per-rank load, and the busiest rank's load over the mean (1.0 is
    perfect balance; a step-synchronous schedule runs as slowly as its busiest rank)."""
    loads = work(plan)
    mean = sum(loads) / len(loads)
    return {"steps": plan.steps, "loads": loads,
            "max_over_mean": max(loads) / mean if mean else 1.0}
