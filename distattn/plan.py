"""Schedules, as pure data (no torch.distributed): who computes which block at which step.

A *ring plan* describes ring attention over R ranks. Every rank's local sequence is cut into
``chunks`` equal chunks (1 for contiguous and stripe, 2 for zigzag). At step t, rank r holds
the K/V of rank ``(r - t) mod R`` (they travel one hop forward per step) and computes the
blocks ``plan.blocks[r][t]``: each meets a chunk range of r's queries with a chunk range of
that K/V under a mask. Masks are token-level (DESIGN.md section 2) and only appear on blocks
whose query and key ranges have equal length and start, so they hold for any chunk size.

``visible_pairs`` and ``work`` turn a plan into (query, key) token pairs and per-rank work, so
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


def visible_pairs(plan: RingPlan, chunk_len: int = 3) -> dict:
    """Count, over the whole plan, how often each global (query, key) token pair is computed
    with the key visible. Returns {(q, k): count}."""
    local_len = chunk_len * plan.chunks
    seq_len = local_len * plan.world
    owned = [ring_part_indices(seq_len, plan.world, r, plan.layout).tolist()
             for r in range(plan.world)]
    counts: dict = {}
    for r in range(plan.world):
        for t in range(plan.steps):
            s = plan.kv_source(r, t)
            for blk in plan.blocks[r][t]:
                qs, ks = token_slices(blk, local_len, plan.chunks)
                qi, ki = owned[r][qs], owned[s][ks]
                visible = blk.mask.dense(len(qi), len(ki))
                for a, gq in enumerate(qi):
                    for b, gk in enumerate(ki):
                        if visible[a, b]:
                            counts[(gq, gk)] = counts.get((gq, gk), 0) + 1
    return counts


def work(plan: RingPlan, chunk_len: int = 64) -> list[int]:
    """Visible (query, key) pairs each rank computes: its compute load."""
    local_len = chunk_len * plan.chunks
    loads = []
    for r in range(plan.world):
        total = 0
        for t in range(plan.steps):
            for blk in plan.blocks[r][t]:
                qs, ks = token_slices(blk, local_len, plan.chunks)
                sq, sk = qs.stop - qs.start, ks.stop - ks.start
                total += int(blk.mask.dense(sq, sk).sum()) if blk.mask.kind == "causal" \
                    else (sq * sk if blk.mask.kind == "none" else 0)
        loads.append(total)
    return loads
