"""The all-gather schedule as pure data (no torch.distributed): which K/V slots each ring rank
gathers, and the one mask it computes its queries under (docs/DESIGN.md, "Plans").

Instead of passing K/V around the ring, every ring rank r gathers, from every owner o
(itself included), exactly the slots of o that r's queries see: ``need(r, o)``, the key
ranges of the pieces of ``block_mask(parts[r], parts[o])`` -- the same derivation the ring
plan's payloads and masks use, so documents, windows, chunks and padding cut what travels
the same way. The gathered keys are packed in owner order (owner 0's ranges first), and
``mask(r)`` is r's whole part against them: one launch (or one merge into accumulators).

Forward: owner o sends ``need(r, o)`` of its K/V to every r (one all-to-all with uneven
parts; r keeps its own). Backward: the dK/dV of the gathered keys go back the same way and
each owner sums what it receives (a reduce-scatter).

``gathered_slots`` / ``sent_slots`` / ``gather_bytes`` expose what travels, so tests and
benchmarks can check that windows and documents shrink it.

``head_chunks`` (default 1) splits the K/V heads into that many contiguous groups (at most
one per K/V head): the executor gathers group c+1 while it computes group c (and returns
group c's dK/dV while it computes group c+1), so communication overlaps compute and only one
group's gathered K/V is alive at a time. The slots, masks and bytes do not change.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

from .kernels.mask import Mask
from .layout import RingLayout, Segment
from .plan import Work, _merge_ranges, coalesce
from .segments import attention_bounds, block_mask


@dataclass(frozen=True, eq=False)
class AllGatherPlan:
    layout: RingLayout
    bounds: tuple    # (lo, hi) on key - query, global tokens (segments.attention_bounds)
    head_chunks: int = 1   # K/V head groups gathered one after the other (overlap)

    @property
    def world(self) -> int:
        return self.layout.ring_degree

    @property
    def steps(self) -> int:
        """One compute step (the gather happens before it)."""
        return 1

    def need(self, rank: int, owner: int) -> tuple:
        """Owner's slot ranges ((start, stop), ...) that ``rank``'s queries see, sorted and
        disjoint."""
        return _need(self, rank, owner)

    def need_len(self, rank: int, owner: int) -> int:
        return sum(b - a for a, b in self.need(rank, owner))

    def key_len(self, rank: int) -> int:
        """Keys ``rank`` computes on: its gathered buffer's length."""
        return self.key_offset(rank, self.world - 1) + self.need_len(rank, self.world - 1)

    def key_offset(self, rank: int, owner: int) -> int:
        """Where ``owner``'s ranges start in ``rank``'s gathered buffer."""
        return _offsets(self, rank)[owner]

    def gathered_slots(self, rank: int) -> int:
        """K/V slots ``rank`` receives from other ranks (its own stay home)."""
        return sum(self.need_len(rank, o) for o in range(self.world) if o != rank)

    def sent_slots(self, rank: int) -> int:
        """K/V slots ``rank`` sends to other ranks (forward; backward returns as many)."""
        return sum(self.need_len(r, rank) for r in range(self.world) if r != rank)

    def gather_bytes(self, slot_bytes: int) -> int:
        """Bytes the whole ring receives in one forward gather, for K/V slots of
        ``slot_bytes`` each (batch x Hkv x (D + Dv) x element size)."""
        return slot_bytes * sum(self.gathered_slots(r) for r in range(self.world))

    def head_ranges(self, hkv: int) -> list:
        """The K/V head groups [(first, stop), ...] of an executor that sees ``hkv`` K/V
        heads: ``min(head_chunks, hkv)`` contiguous groups of near-equal size."""
        c = min(self.head_chunks, hkv)
        return [(hkv * i // c, hkv * (i + 1) // c) for i in range(c)]

    def key_segments(self, rank: int) -> tuple:
        """The segments of ``rank``'s gathered keys, in the gathered buffer's coordinates."""
        return _key_segments(self, rank)

    def mask(self, rank: int) -> Mask:
        """``rank``'s part x its gathered keys."""
        return _mask(self, rank)

    def computes(self, rank: int, step: int) -> list:
        """The plan as ``Work`` items (one per owner, the mask restricted to that owner's
        columns), for coverage and balance checks (``plan.visible_pairs``, ``plan.work``)."""
        n, out = self.layout.part_len, []
        for o in range(self.world):
            at, m = self.key_offset(rank, o), self.need_len(rank, o)
            sub = self.mask(rank).restrict(slice(0, n), slice(at, at + m))
            if sub.pieces:
                out.append(Work(rank, slice(0, n), o, self.need(rank, o), sub))
        return out


@functools.lru_cache(maxsize=4096)
def _need(plan: AllGatherPlan, rank: int, owner: int) -> tuple:
    lay, n = plan.layout, plan.layout.part_len
    mask = block_mask(lay.parts[rank], lay.parts[owner], plan.bounds).simplify(n, n)
    return _merge_ranges([p.tight(n, n)[2:] for p in mask.pieces])


@functools.lru_cache(maxsize=256)
def _offsets(plan: AllGatherPlan, rank: int) -> tuple:
    out, at = [], 0
    for o in range(plan.world):
        out.append(at)
        at += plan.need_len(rank, o)
    return tuple(out)


@functools.lru_cache(maxsize=256)
def _key_segments(plan: AllGatherPlan, rank: int) -> tuple:
    out, base = [], 0
    for o in range(plan.world):
        for a, b in plan.need(rank, o):
            for sg in plan.layout.parts[o]:
                lo, hi = max(a, sg.start), min(b, sg.stop)
                if lo < hi:
                    out.append(Segment(base + lo - a, hi - lo,
                                       sg.g0 + sg.stride * (lo - sg.start), sg.stride, sg.doc))
            base += b - a
    return tuple(out)


@functools.lru_cache(maxsize=256)
def _mask(plan: AllGatherPlan, rank: int) -> Mask:
    lay = plan.layout
    return coalesce(block_mask(lay.parts[rank], plan.key_segments(rank), plan.bounds),
                    lay.part_len, plan.key_len(rank))


def allgather_plan(lay: RingLayout, causal: bool = False, window: Optional[tuple] = None,
                   head_chunks: int = 1) -> AllGatherPlan:
    """The all-gather plan of a layout: any layout, documents, window; ``head_chunks`` >= 1
    K/V head groups gathered in turn (1: one gather, no overlap)."""
    if not isinstance(head_chunks, int) or isinstance(head_chunks, bool) or head_chunks < 1:
        raise ValueError(f"head_chunks must be an int >= 1 (K/V head groups gathered one "
                         f"after the other), got {head_chunks!r}")
    return AllGatherPlan(lay, attention_bounds(causal, window), head_chunks)
