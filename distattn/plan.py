"""Schedules, as pure data (no torch.distributed): who computes which block at which step.

A *ring plan* describes ring attention over R ranks. Every rank's local sequence is cut into
``chunks`` equal chunks (1 for contiguous and stripe, 2 for zigzag). At step t, rank r holds
the K/V of rank ``(r - t) mod R`` (they travel one hop forward per step) and computes the
blocks ``plan.blocks[r][t]``: each meets a chunk range of r's queries with a chunk range of
that K/V under a mask. Masks are token-level (DESIGN.md section 2) and only appear on blocks
whose query and key ranges have equal length and start, so they hold for any chunk size.

A *helper plan* (DistFlashAttn's schedule, for the contiguous layout with causal masking)
pairs rank r at step t >= 1 with rank (r - t) mod P. If r >= t, r computes its queries
against that rank's K/V ("own"); otherwise r is idle in a plain ring, so it helps: it computes
that rank's queries against its own K/V and returns the partial (out, lse) ("help"). For even
P the last step's pairs would meet twice, so owner and helper each take half of the query
rows. P // 2 + 1 steps in all, every rank doing the same work.

Both plans answer ``computes(rank, step)`` with ``Work`` items (whose queries meet whose keys);
``visible_pairs`` and ``work`` turn that into (query, key) token pairs and per-rank loads, so
tests can check coverage (every visible pair computed exactly once) and balance.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .kernels.mask import Mask
from .layout import LAYOUTS, ring_part_indices

CHUNKS = {"contiguous": 1, "zigzag": 2, "stripe": 1}


@dataclass(frozen=True)
class Block:
    q: tuple  # [start, stop) in chunks of the query owner's local sequence
    k: tuple  # [start, stop) in chunks of the K/V owner's local sequence
    mask: Mask


@dataclass(frozen=True)
class Work:
    """One block computed somewhere: ``q_owner``'s query chunks ``q`` meet ``kv_owner``'s key
    chunks ``k`` under ``mask``."""
    q_owner: int
    q: tuple
    kv_owner: int
    k: tuple
    mask: Mask


@dataclass(frozen=True)
class RingPlan:
    world: int
    layout: str
    causal: bool
    chunks: int
    blocks: tuple  # blocks[rank][step] -> tuple[Block, ...]

    def kv_source(self, rank: int, step: int) -> int:
        return (rank - step) % self.world

    @property
    def steps(self) -> int:
        return self.world

    def computes(self, rank: int, step: int) -> list[Work]:
        s = self.kv_source(rank, step)
        return [Work(rank, b.q, s, b.k, b.mask) for b in self.blocks[rank][step]]


def _ring_blocks(r: int, s: int, layout: str, causal: bool) -> tuple:
    """Blocks where rank r's queries meet rank s's keys."""
    c = CHUNKS[layout]
    whole = (0, c)
    if not causal:
        return (Block(whole, whole, Mask.none()),)
    if s == r:  # the local diagonal: every layout keeps local tokens in global order
        return (Block(whole, whole, Mask.causal(0)),)
    if layout == "contiguous":
        return (Block(whole, whole, Mask.none()),) if s < r else ()
    if layout == "zigzag":
        # queries hold chunks (r, 2R-1-r), keys (s, 2R-1-s). s < r: both query chunks see
        # key chunk s, neither sees 2R-1-s. s > r: only query chunk 2R-1-r sees, and it sees
        # both key chunks.
        return ((Block(whole, (0, 1), Mask.none()),) if s < r
                else (Block((1, 2), whole, Mask.none()),))
    # stripe: query m of r is token r + R*m, key m' of s is token s + R*m'; visible iff
    # m' <= m when s < r, and m' <= m - 1 when s > r.
    return (Block(whole, whole, Mask.causal(0 if s < r else -1)),)


def ring_plan(world: int, layout: str = "contiguous", causal: bool = False) -> RingPlan:
    """The plan of plain ring attention for a layout (its own causal balance)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    blocks = tuple(
        tuple(_ring_blocks(r, (r - t) % world, layout, causal) for t in range(world))
        for r in range(world))
    return RingPlan(world, layout, causal, CHUNKS[layout], blocks)


def _chunk_tokens(rng: tuple, chunk_len: int) -> slice:
    return slice(rng[0] * chunk_len, rng[1] * chunk_len)


def token_slices(block: Block, local_len: int, chunks: int) -> tuple[slice, slice]:
    """(query slice, key slice) of a block in tokens of a local sequence of ``local_len``."""
    chunk_len = local_len // chunks
    return _chunk_tokens(block.q, chunk_len), _chunk_tokens(block.k, chunk_len)


def visible_pairs(plan, chunk_len: int = 3) -> dict:
    """Count, over the whole plan, how often each global (query, key) token pair is computed
    with the key visible. Returns {(q, k): count}."""
    local_len = chunk_len * plan.chunks
    seq_len = local_len * plan.world
    owned = [ring_part_indices(seq_len, plan.world, r, plan.layout).tolist()
             for r in range(plan.world)]
    counts: dict = {}
    for r in range(plan.world):
        for t in range(plan.steps):
            for w in plan.computes(r, t):
                qs, ks = _chunk_tokens(w.q, chunk_len), _chunk_tokens(w.k, chunk_len)
                qi, ki = owned[w.q_owner][qs], owned[w.kv_owner][ks]
                visible = w.mask.dense(len(qi), len(ki))
                for a, gq in enumerate(qi):
                    for b, gk in enumerate(ki):
                        if visible[a, b]:
                            counts[(gq, gk)] = counts.get((gq, gk), 0) + 1
    return counts


def work(plan, chunk_len: int = 64) -> list[int]:
    """Visible (query, key) pairs each rank computes: its compute load."""
    loads = []
    for r in range(plan.world):
        total = 0
        for t in range(plan.steps):
            for w in plan.computes(r, t):
                sq = (w.q[1] - w.q[0]) * chunk_len
                sk = (w.k[1] - w.k[0]) * chunk_len
                total += int(w.mask.simplify(sq, sk).dense(sq, sk).sum())
        loads.append(total)
    return loads


# -- DistFlashAttn's helper schedule ------------------------------------------------------------

@dataclass(frozen=True)
class Task:
    """What one rank does at one step of a helper plan.

    kind "diag": its own queries with its own K/V (step 0, causal(0));
    kind "own":  its query chunks ``rows`` with ``peer``'s K/V, which it receives;
    kind "help": ``peer``'s query chunks ``rows`` (received) with its own K/V; the partial
                 result goes back to ``peer`` (in backward: dq goes back, dK/dV stay).
    In backward an "own" task sends the dK/dV of ``peer``'s K/V back to ``peer``.
    """
    kind: str
    peer: int
    rows: tuple
    mask: Mask


@dataclass(frozen=True)
class HelperPlan:
    world: int
    chunks: int
    tasks: tuple  # tasks[rank][step] -> Task | None
    layout: str = "contiguous"
    causal: bool = True

    @property
    def steps(self) -> int:
        return len(self.tasks[0])

    def computes(self, rank: int, step: int) -> list[Work]:
        task = self.tasks[rank][step]
        whole = (0, self.chunks)
        if task is None:
            return []
        if task.kind == "help":
            return [Work(task.peer, task.rows, rank, whole, task.mask)]
        return [Work(rank, task.rows, task.peer, whole, task.mask)]

    def inbound(self, rank: int, step: int) -> list[tuple]:
        """Who sends what to ``rank`` at ``step``: [(kind "kv" | "q", src, rows)]."""
        task = self.tasks[rank][step]
        if task is None or task.kind == "diag":
            return []
        return [("kv" if task.kind == "own" else "q", task.peer, task.rows)]

    def outbound(self, rank: int, step: int) -> list[tuple]:
        """What ``rank`` sends at ``step``: [(kind "kv" | "q", dst, rows)], the mirror image
        of the other ranks' ``inbound``."""
        out = []
        for dst in range(self.world):
            task = self.tasks[dst][step]
            if dst != rank and task is not None and task.peer == rank and task.kind != "diag":
                out.append(("kv" if task.kind == "own" else "q", dst, task.rows))
        return out


def helper_plan(world: int) -> HelperPlan:
    """DistFlashAttn's balanced schedule for causal attention on the contiguous layout."""
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    P = world
    even = P % 2 == 0
    chunks = 2 if even and P > 1 else 1
    whole, first, second = (0, chunks), (0, 1), (1, 2)
    tasks = []
    for r in range(P):
        row = [Task("diag", r, whole, Mask.causal(0))]
        for t in range(1, P // 2 + 1):
            split = even and t == P // 2   # pairs meet twice at this step: halve the rows
            if r >= t:
                row.append(Task("own", r - t, first if split else whole, Mask.none()))
            else:
                row.append(Task("help", r - t + P, second if split else whole, Mask.none()))
        tasks.append(tuple(row))
    return HelperPlan(P, chunks, tuple(tasks))


def balance(plan, chunk_len: int = 64) -> dict:
    """Balance report: steps, per-rank load, and the busiest rank's load over the mean (1.0 is
    perfect balance; a step-synchronous schedule runs as slowly as its busiest rank)."""
    loads = work(plan, chunk_len)
    mean = sum(loads) / len(loads)
    return {"steps": plan.steps, "loads": loads,
            "max_over_mean": max(loads) / mean if mean else 1.0}
