"""Varlen launches: the pieces of a block mask packed into few calls of a varlen flash kernel.

A varlen flash kernel (FlashAttention-2's ``mha_varlen_fwd`` / ``mha_varlen_bwd``, exposed by
PyTorch as ``aten._flash_attention_forward`` / ``_backward`` with ``cum_seq_q`` / ``cum_seq_k``)
runs independent *sequences* packed along the token dimension: sequence s owns the query rows
``[cu_q[s], cu_q[s+1])`` and the key rows ``[cu_k[s], cu_k[s+1])``, and inside it query i (of
nq) sees key j (of nk) iff

    i + (nk - nq) - left  <=  j  <=  i + (nk - nq) + right        (-1: that side unbounded)

that is, the window is aligned to the bottom-right corner of every sequence. This module turns
the pieces of a ``Mask`` into such calls ("launches"). It is integer bookkeeping only, cached
per (mask, block size, batch), and knows nothing about kernels:

1. **Tight bands.** Every piece on its smallest rectangle (``piece_blocks``) is one band
   ``lo <= j - i <= hi`` in the rectangle's own coordinates, and on a tight rectangle a band
   always has a flash window: the first row and the last row see a key, and the first key and
   the last key are seen, which gives ``lo <= min(0, nk - nq)`` and ``hi >= max(0, nk - nq)``,
   so ``right = hi - (nk - nq) >= 0`` and ``left = (nk - nq) - lo >= 0``. No piece is ever
   left over for a slower path.
2. **Merged documents.** A layout cuts one document into pieces that share rows or keys (a
   rectangle and a diagonal, say); they could not sit in one launch. Pieces that share rows or
   keys are merged while their union is again one band (checked exactly: the candidate band on
   the union's bounding box must hold as many pairs as the two pieces together).
3. **Chains.** A launch is a chain of bands with increasing, disjoint row ranges and
   increasing, disjoint key ranges under one window (bands whose bounds cut nothing fit several
   windows and join the most common one).
4. **Fillers.** Rows between two bands of a chain become a sequence with no key: the kernel
   writes out = 0 and lse = +inf there and reads nothing. Keys between them become a sequence
   with no query: nothing reads them, their dK/dV are not used. So every launch spans one
   contiguous range of rows and one of keys, q/k/v are handed over as views (never copied),
   and one set of arrays serves forward and backward (the backward kernel has no
   ``seqused_k``, so trimming keys that way would work in one direction only).

``launches(mask, sq, sk)`` gives the launches of one block, ``arrays(launch, batch, sq, sk)``
the cumulative arrays for a batch of blocks stacked along the rows (batch element b's rows
start at b * sq, its keys at b * sk), and ``launch_tensors`` both with the arrays as int32
tensors on a device, built once per (mask, sizes, batch, device).
"""
from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass
from typing import Optional

import torch

from .base import piece_blocks
from .device_cache import device_cache
from .mask import Mask, Piece

# The kernel's grid has one block row per sequence (CUDA limits gridDim.y to 65535).
MAX_SEQUENCES = 65535
# Bands per launch, so that bands + fillers stay far below MAX_SEQUENCES.
MAX_BANDS = 8192
# Fillers are cut into sequences of at most max(longest band, FILLER_CHUNK) tokens, so that a
# long gap neither raises max_q / max_k (the grid) nor needs many sequences.
FILLER_CHUNK = 128


@dataclass(frozen=True)
class Band:
    """Rows [q0, q1) meet keys [k0, k1) of a block (block coordinates); inside the rectangle,
    row i sees key j iff lo <= (j - k0) - (i - q0) <= hi. A bound is None when it cuts
    nothing in the rectangle; the rectangle is tight (every row sees a key and every key is
    seen)."""
    q0: int
    q1: int
    k0: int
    k1: int
    lo: Optional[int]
    hi: Optional[int]

    @property
    def nq(self) -> int:
        return self.q1 - self.q0

    @property
    def nk(self) -> int:
        return self.k1 - self.k0

    @property
    def window(self) -> tuple[int, int]:
        """(left, right) of the flash window that shows exactly this band, -1 for a side the
        band does not bound."""
        d = self.nk - self.nq
        return (-1 if self.lo is None else d - self.lo, -1 if self.hi is None else self.hi - d)

    def fits(self, left: int, right: int) -> bool:
        """Whether the flash window (left, right) shows exactly this band. A side the band does
        not bound also fits any window that reaches past the rectangle on that side."""
        d = self.nk - self.nq
        if self.hi is None:
            ok_right = right == -1 or right >= self.nq - 1
        else:
            ok_right = right == self.hi - d
        if self.lo is None:
            ok_left = left == -1 or left >= self.nk - 1
        else:
            ok_left = left == d - self.lo
        return ok_left and ok_right

    def as_piece(self) -> Piece:
        """The same pairs as a ``Piece`` in block coordinates."""
        shift = self.k0 - self.q0
        return Piece(self.q0, self.q1, self.k0, self.k1,
                     None if self.lo is None else self.lo + shift,
                     None if self.hi is None else self.hi + shift)

    @functools.cached_property   # merging asks each band many times
    def _pairs(self) -> int:
        return self.as_piece().pairs(self.q1, self.k1)

    def pairs(self) -> int:
        return self._pairs

    def diagonals(self) -> tuple[int, int]:
        """The smallest and largest j - i (block coordinates) of a visible pair."""
        shift = self.k0 - self.q0
        lo = -(self.nq - 1) if self.lo is None else self.lo
        hi = self.nk - 1 if self.hi is None else self.hi
        return lo + shift, hi + shift


def _band(q0: int, q1: int, k0: int, k1: int, lo: Optional[int], hi: Optional[int]) -> Band:
    """A band from block-coordinate bounds on j - i, with bounds that cut nothing dropped."""
    shift = k0 - q0
    lo = None if lo is None or lo - shift <= -(q1 - q0 - 1) else lo - shift
    hi = None if hi is None or hi - shift >= k1 - k0 - 1 else hi - shift
    return Band(q0, q1, k0, k1, lo, hi)


def tight_bands(mask: Mask, sq: int, sk: int) -> list[Band]:
    """The pieces of ``mask`` (an sq x sk block) as bands on their smallest rectangles."""
    bands = []
    for rows, cols, sub in piece_blocks(mask, sq, sk):
        p = sub.pieces[0]   # bounds in the rectangle's coordinates, cutting ones only
        band = Band(rows.start, rows.stop, cols.start, cols.stop, p.lo, p.hi)
        if min(band.window) < -1 or (band.lo is not None and band.window[0] < 0) or \
                (band.hi is not None and band.window[1] < 0):   # cannot happen (see above)
            raise RuntimeError(f"{band} is tight but has no flash window {band.window}")
        bands.append(band)
    return bands


def _merged(a: Band, b: Band) -> Optional[Band]:
    """The band a | b when the union of the two (disjoint) bands is one band, else None.
    Their row ranges and their key ranges must overlap or touch, so that the union's bounding
    box is tight."""
    if max(a.q0, b.q0) > min(a.q1, b.q1) or max(a.k0, b.k0) > min(a.k1, b.k1):
        return None
    q0, q1 = min(a.q0, b.q0), max(a.q1, b.q1)
    k0, k1 = min(a.k0, b.k0), max(a.k1, b.k1)
    full = lambda x: x.lo is None and x.hi is None
    if full(a) and full(b) and ((a.q0, a.q1) == (b.q0, b.q1) or (a.k0, a.k1) == (b.k0, b.k1)):
        return Band(q0, q1, k0, k1, None, None)   # two rectangles side by side: no counting
    (alo, ahi), (blo, bhi) = a.diagonals(), b.diagonals()
    union = _band(q0, q1, k0, k1, min(alo, blo), max(ahi, bhi))
    # The candidate holds both bands; it is their union iff it holds no other pair.
    return union if union.pairs() == a.pairs() + b.pairs() else None


def _components(bands: list[Band]) -> list[list[Band]]:
    """Groups of bands linked by shared rows or shared keys (in a document mask: the pieces a
    layout cut from one document)."""
    parent = list(range(len(bands)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for lo_of, hi_of in ((lambda b: b.q0, lambda b: b.q1), (lambda b: b.k0, lambda b: b.k1)):
        order = sorted(range(len(bands)), key=lambda i: lo_of(bands[i]))
        reach, last = None, None
        for i in order:                      # interval sweep: overlapping ranges are linked
            if reach is not None and lo_of(bands[i]) < reach:
                parent[find(i)] = find(last)
            if reach is None or hi_of(bands[i]) > reach:
                reach, last = hi_of(bands[i]), i
    groups: dict = {}
    for i in range(len(bands)):
        groups.setdefault(find(i), []).append(bands[i])
    return list(groups.values())


# Components larger than this are left unmerged (the launches stay exact, only more numerous);
# layouts give components of at most four bands.
_MERGE_LIMIT = 32


def _merge_one_pair(group: list[Band]) -> Optional[list[Band]]:
    """``group`` with its first pair that forms one band merged, or None when none does."""
    for i in range(len(group)):
        for j in range(i + 1, len(group)):
            m = _merged(group[i], group[j])
            if m is not None:
                return [g for n, g in enumerate(group) if n not in (i, j)] + [m]
    return None


def merge_bands(bands: list[Band]) -> list[Band]:
    """``bands`` with pairs that share rows or keys merged while their union is one band
    (greedy; the result shows the same pairs)."""
    out = []
    for group in _components(bands):
        while len(group) <= _MERGE_LIMIT and (merged := _merge_one_pair(group)) is not None:
            group = merged
        out.extend(group)
    return out


@dataclass(frozen=True)
class Launch:
    """One varlen call for a block: ``bands`` (sorted; rows and keys increasing and disjoint)
    under the flash window (left, right). It spans rows [q0, q1) and keys [k0, k1) of each
    block."""
    bands: tuple
    left: int
    right: int

    @property
    def q0(self) -> int:
        return self.bands[0].q0

    @property
    def q1(self) -> int:
        return self.bands[-1].q1

    @property
    def k0(self) -> int:
        return self.bands[0].k0

    @property
    def k1(self) -> int:
        return self.bands[-1].k1

    @property
    def is_causal(self) -> bool:
        return (self.left, self.right) == (-1, 0)


def _chains(bands: list[Band], left: int, right: int) -> list[Launch]:
    """Bands of one window into chains, best fit: each band (by rows) joins the chain whose
    last key ends latest but not after the band's first key."""
    chains: list[list[Band]] = []
    for b in sorted(bands, key=lambda b: (b.q0, b.k0)):
        best = None
        for c in chains:
            last = c[-1]
            if len(c) < MAX_BANDS and last.q1 <= b.q0 and last.k1 <= b.k0 and \
                    (best is None or last.k1 > best[-1].k1):
                best = c
        if best is None:
            chains.append([b])
        else:
            best.append(b)
    return [Launch(tuple(c), left, right) for c in chains]


@functools.lru_cache(maxsize=1024)
def launches(mask: Mask, sq: int, sk: int) -> tuple[Launch, ...]:
    """The launches that together show exactly the visible pairs of ``mask`` on an sq x sk
    block, each pair once. Empty for a mask that shows nothing."""
    bands = merge_bands(tight_bands(mask, sq, sk))
    # Windows: a band's own, or for a band whose bounds cut nothing the most common window
    # it fits (so a one-row document joins the causal launch of its neighbours).
    common = Counter(b.window for b in bands if b.lo is not None or b.hi is not None)
    by_window: dict = {}
    for b in bands:
        fitting = [w for w in common if b.fits(*w)]
        w = max(fitting, key=lambda w: (common[w], w)) if fitting else b.window
        by_window.setdefault(w, []).append(b)
    out = []
    for (left, right), group in sorted(by_window.items()):
        out.extend(_chains(group, left, right))
    return tuple(out)


@dataclass(frozen=True)
class LaunchArrays:
    """The kernel arguments of one launch over ``batch`` stacked blocks.

    The launch reads rows [launch.q0, launch.q0 + total_q) and keys [launch.k0, launch.k0 +
    total_k) of the blocks' rows stacked as [batch * sq] and [batch * sk]; batch element b's
    part of the result starts at row b * sq (key b * sk) of that range. ``keep_q`` /
    ``keep_k``: positions in [0, launch.q1 - launch.q0) / [0, launch.k1 - launch.k0) that
    belong to a band (the rest are fillers), None when all do."""
    cu_q: tuple
    cu_k: tuple
    max_q: int
    max_k: int
    total_q: int
    total_k: int
    keep_q: Optional[tuple]
    keep_k: Optional[tuple]

    @property
    def sequences(self) -> int:
        return len(self.cu_q) - 1


def _filler_sizes(n: int, chunk: int) -> list[int]:
    return [min(chunk, n - s) for s in range(0, n, chunk)]


@functools.lru_cache(maxsize=1024)
def arrays(launch: Launch, batch: int, sq: int, sk: int) -> LaunchArrays:
    """Cumulative arrays (with fillers) and max lengths of ``launch`` over ``batch`` blocks of
    sq x sk.

    max_q / max_k are what the kernel takes as the longest sequence. They are raised where
    FlashAttention-2 would otherwise misread the window: it treats a window side >= max_k as
    unbounded and substitutes max_k for the unbounded side of a one-sided window, which is only
    right when max_k exceeds the window and every sequence's query count. max_q >= 2 keeps it
    off its single-query path (which assumes one query per sequence)."""
    real_q = max(b.nq for b in launch.bands)
    real_k = max(b.nk for b in launch.bands)
    chunk_q, chunk_k = max(real_q, FILLER_CHUNK), max(real_k, FILLER_CHUNK)
    seqs: list[tuple[int, int]] = []
    q_at, k_at = launch.q0, launch.k0         # cursors in stacked coordinates
    for b in range(batch):
        for band in launch.bands:
            bq0, bk0 = band.q0 + b * sq, band.k0 + b * sk
            seqs += [(n, 0) for n in _filler_sizes(bq0 - q_at, chunk_q)]
            seqs += [(0, n) for n in _filler_sizes(bk0 - k_at, chunk_k)]
            seqs.append((band.nq, band.nk))
            q_at, k_at = bq0 + band.nq, bk0 + band.nk
    cu_q, cu_k = [0], [0]
    for nq, nk in seqs:
        cu_q.append(cu_q[-1] + nq)
        cu_k.append(cu_k[-1] + nk)
    max_q = max(2, max(nq for nq, _ in seqs))
    max_k = max(nk for _, nk in seqs)
    max_k = max(max_k, launch.left + 1, launch.right + 1)
    if launch.left >= 0 and launch.right == -1:
        max_k = max(max_k, max_q)
    span_q, span_k = launch.q1 - launch.q0, launch.k1 - launch.k0
    keep_q = [i - launch.q0 for b in launch.bands for i in range(b.q0, b.q1)]
    keep_k = [j - launch.k0 for b in launch.bands for j in range(b.k0, b.k1)]
    return LaunchArrays(tuple(cu_q), tuple(cu_k), max_q, max_k, cu_q[-1], cu_k[-1],
                        None if len(keep_q) == span_q else tuple(keep_q),
                        None if len(keep_k) == span_k else tuple(keep_k))


@dataclass(frozen=True, eq=False)
class LaunchTensors:
    """``LaunchArrays`` with the arrays as tensors on a device: cu_q / cu_k int32, keep_q /
    keep_k int64 (or None)."""
    launch: Launch
    arrays: LaunchArrays
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    keep_q: Optional[torch.Tensor]
    keep_k: Optional[torch.Tensor]


def max_sequences(mask: Mask, sq: int, sk: int, batch: int) -> int:
    """The most sequences any launch of ``mask`` has over ``batch`` blocks."""
    return max((arrays(L, batch, sq, sk).sequences for L in launches(mask, sq, sk)), default=0)


@device_cache(maxsize=1024)
def launch_tensors(mask: Mask, sq: int, sk: int, batch: int,
                   device: torch.device) -> tuple[LaunchTensors, ...]:
    """The launches of ``mask`` over ``batch`` stacked sq x sk blocks with their arrays on
    ``device``, built once (host-to-device copies happen on the first call only; while
    tracing, on every call: ``device_cache``)."""
    out = []
    for L in launches(mask, sq, sk):
        a = arrays(L, batch, sq, sk)
        if a.sequences > MAX_SEQUENCES:
            raise ValueError(f"a varlen launch would have {a.sequences} sequences, more than "
                             f"the kernel's grid allows ({MAX_SEQUENCES}); use batch 1")
        as_tensor = lambda xs, dtype: None if xs is None else \
            torch.tensor(xs, dtype=dtype, device=device)
        out.append(LaunchTensors(L, a, as_tensor(a.cu_q, torch.int32),
                                 as_tensor(a.cu_k, torch.int32),
                                 as_tensor(a.keep_q, torch.int64),
                                 as_tensor(a.keep_k, torch.int64)))
    return tuple(out)
