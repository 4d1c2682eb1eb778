"""The mask of one block-attention call: an algebra of band pieces (docs/DESIGN.md, "Masks").

A block is a query slice of Sq rows meeting a key slice of Sk columns; positions are local to
the block (query row i, key column j, both from 0). Everything distattn masks -- causality,
sliding windows, document boundaries, padding slots, layouts that interleave tokens -- is
expressed with one shape:

    Piece(q0, q1, k0, k1, lo, hi): query i sees key j iff q0 <= i < q1, k0 <= j < k1 and
                                   lo <= j - i <= hi        (lo / hi None: unbounded)

A ``Mask`` is a tuple of pieces that are disjoint as sets of (i, j) pairs (a document is one
piece; two pieces may share rows when one query range meets two key ranges). ``q1`` / ``k1``
may be None: "to the end of the block", so the common masks need no block size:

- ``Mask.none()``          one piece, the whole block, no band;
- ``Mask.causal(offset)``  the whole block with ``hi = offset``: key j is visible to query i
                           iff ``j <= i + offset`` (top-left aligned; offset 0 is the usual
                           diagonal block, -1 the strictly-lower block of the stripe layout);
- ``Mask.band(lo, hi)``    the whole block with both bounds (a sliding window);
- ``Mask.empty()``         no piece: nothing is visible and the call is skipped.

Plans build masks (``distattn.segments``), backends run them piece by piece (or in one varlen
launch), and tests compare them through ``dense``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


def _end(x: Optional[int], n: int) -> int:
    return n if x is None else min(x, n)


@dataclass(frozen=True)
class Piece:
    q0: int = 0
    q1: Optional[int] = None  # None: the block's last row + 1
    k0: int = 0
    k1: Optional[int] = None  # None: the block's last column + 1
    lo: Optional[int] = None  # visible iff lo <= j - i (block coordinates); None: no bound
    hi: Optional[int] = None  # visible iff j - i <= hi; None: no bound

    def resolve(self, sq: int, sk: int) -> Optional["Piece"]:
        """This piece inside an (sq x sk) block with bounds that cut nothing dropped, or None
        when it shows nothing. Spans that reach the block's end are written as None."""
        q0, q1, k0, k1 = self.span(sq, sk)
        if q0 >= q1 or k0 >= k1:
            return None
        lo, hi = self.lo, self.hi
        # The smallest and largest j - i inside the rectangle.
        dmin, dmax = k0 - (q1 - 1), (k1 - 1) - q0
        if (lo is not None and lo > dmax) or (hi is not None and hi < dmin) or \
                (lo is not None and hi is not None and lo > hi):
            return None
        lo = None if lo is not None and lo <= dmin else lo
        hi = None if hi is not None and hi >= dmax else hi
        return Piece(q0, None if q1 == sq else q1, k0, None if k1 == sk else k1, lo, hi)

    def span(self, sq: int, sk: int) -> tuple[int, int, int, int]:
        """(q0, q1, k0, k1) with None resolved against the block size."""
        return max(self.q0, 0), _end(self.q1, sq), max(self.k0, 0), _end(self.k1, sk)

    def tight(self, sq: int, sk: int) -> tuple[int, int, int, int]:
        """The smallest rectangle (q0, q1, k0, k1) holding every visible pair: rows that see
        no key and keys that no row sees are cut off (the band's corners)."""
        q0, q1, k0, k1 = self.span(sq, sk)
        if self.hi is not None:          # row i sees some key iff i + hi >= k0
            q0 = max(q0, k0 - self.hi)
            k1 = min(k1, q1 - 1 + self.hi + 1)
        if self.lo is not None:          # row i sees some key iff i + lo <= k1 - 1
            q1 = min(q1, k1 - self.lo)
            k0 = max(k0, q0 + self.lo)
        return q0, q1, k0, k1

    def pairs(self, sq: int, sk: int) -> int:
        """How many (query, key) pairs this piece shows. Row i sees keys [max(k0, i + lo),
        min(k1 - 1, i + hi)]: a count linear in i between the two rows where a bound starts
        to bind, so each stretch is an arithmetic series."""
        if self.resolve(sq, sk) is None:
            return 0
        q0, q1, k0, k1 = self.tight(sq, sk)
        first = lambda i: k0 if self.lo is None else max(k0, i + self.lo)
        last = lambda i: k1 - 1 if self.hi is None else min(k1 - 1, i + self.hi)
        count = lambda i: max(0, last(i) - first(i) + 1)
        cuts = sorted({q0, q1} | {c for c in (
            None if self.hi is None else k1 - 1 - self.hi + 1,   # last() stops growing
            None if self.lo is None else k0 - self.lo + 1)       # first() starts growing
            if c is not None and q0 < c < q1})
        total = 0
        for a, b in zip(cuts[:-1], cuts[1:]):   # count() is linear on [a, b) ...
            if count(a) and count(b - 1):
                total += (count(a) + count(b - 1)) * (b - a) // 2
            else:                               # ... unless it touches 0 (a corner)
                total += sum(count(i) for i in range(a, b))
        return total

    def visible(self, sq: int, sk: int, device=None) -> torch.Tensor:
        """Boolean [sq, sk], True where this piece shows the key."""
        q0, q1, k0, k1 = self.span(sq, sk)
        i = torch.arange(sq, device=device).unsqueeze(1)
        j = torch.arange(sk, device=device).unsqueeze(0)
        vis = (i >= q0) & (i < q1) & (j >= k0) & (j < k1)
        if self.lo is not None:
            vis &= (j - i) >= self.lo
        if self.hi is not None:
            vis &= (j - i) <= self.hi
        return vis

    def shifted(self, dq: int, dk: int) -> "Piece":
        """The same pairs in a block whose origin moved by (dq, dk): rows i -> i - dq."""
        sh = lambda x, d: None if x is None else x - d
        band = dq - dk   # j - i changes by -(dk) + dq
        return Piece(self.q0 - dq, sh(self.q1, dq), self.k0 - dk, sh(self.k1, dk),
                     sh(self.lo, -band), sh(self.hi, -band))


@dataclass(frozen=True)
class Mask:
    pieces: tuple = ()

    def __post_init__(self):
        if not isinstance(self.pieces, tuple) or not all(isinstance(p, Piece)
                                                         for p in self.pieces):
            raise ValueError(f"Mask takes a tuple of Piece, got {self.pieces!r}; build masks "
                             f"with Mask.none(), Mask.causal(offset), Mask.band(lo, hi)")

    # -- constructors --------------------------------------------------------------------------
    @staticmethod
    def none() -> "Mask":
        return Mask((Piece(),))

    @staticmethod
    def causal(offset: int = 0) -> "Mask":
        return Mask((Piece(hi=int(offset)),))

    @staticmethod
    def band(lo: Optional[int], hi: Optional[int]) -> "Mask":
        return Mask((Piece(lo=lo, hi=hi),))

    @staticmethod
    def empty() -> "Mask":
        return Mask(())

    # -- the familiar names of single-piece masks ---------------------------------------------
    @property
    def kind(self) -> str:
        """"empty", "none" / "causal" / "band" for one piece over the whole block, else
        "pieces"."""
        if not self.pieces:
            return "empty"
        if len(self.pieces) > 1:
            return "pieces"
        p = self.pieces[0]
        if (p.q0, p.q1, p.k0, p.k1) != (0, None, 0, None):
            return "pieces"
        if p.lo is None:
            return "none" if p.hi is None else "causal"
        return "band"

    @property
    def offset(self) -> int:
        """The diagonal offset of a ``causal`` mask."""
        if self.kind != "causal":
            raise ValueError(f"offset is defined for causal masks, not {self!r}")
        return self.pieces[0].hi

    # -- algebra ------------------------------------------------------------------------------
    def simplify(self, sq: int, sk: int) -> "Mask":
        """The equivalent mask for an (sq x sk) block: pieces that show nothing dropped,
        bounds that cut nothing removed (so a causal mask hiding nothing becomes ``none``)."""
        pieces = tuple(r for p in self.pieces if (r := p.resolve(sq, sk)) is not None)
        return Mask(pieces)

    def restrict(self, rows: slice, cols: slice) -> "Mask":
        """The mask of the sub-block ``[rows, cols]`` (slices with explicit start and stop), in
        the sub-block's coordinates."""
        out = []
        for p in self.pieces:
            cut = Piece(max(p.q0, rows.start), rows.stop if p.q1 is None else min(p.q1, rows.stop),
                        max(p.k0, cols.start), cols.stop if p.k1 is None else min(p.k1, cols.stop),
                        p.lo, p.hi).shifted(rows.start, cols.start)
            r = cut.resolve(rows.stop - rows.start, cols.stop - cols.start)
            if r is not None:
                out.append(r)
        return Mask(tuple(out))

    def dense(self, sq: int, sk: int, device=None) -> torch.Tensor:
        """Boolean [sq, sk] tensor, True where the key is visible."""
        vis = torch.zeros(sq, sk, dtype=torch.bool, device=device)
        for p in self.pieces:
            vis |= p.visible(sq, sk, device)
        return vis

    def pairs(self, sq: int, sk: int) -> int:
        """How many (query, key) pairs are visible: the block's compute load."""
        return sum(p.pairs(sq, sk) for p in self.pieces)

    def __repr__(self) -> str:
        kind = self.kind
        if kind == "causal":
            return f"causal({self.offset})"
        if kind == "band":
            p = self.pieces[0]
            return f"band({p.lo}, {p.hi})"
        if kind in ("none", "empty"):
            return kind
        return f"pieces{list(self.pieces)}"


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax statistics and partial sums are kept in float32, or float64 for float64 inputs
    (so exactness tests can reach 1e-10)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
