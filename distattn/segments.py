"""From global visibility to block masks.

Which key a query sees is a statement about *global* tokens: the same document, and
``lo <= key - query <= hi`` where causality gives ``hi = 0`` and a window ``(left, right)``
gives ``lo = -left`` and ``hi = right`` (``attention_bounds``). A block meets two runs of local
slots (``layout.Segment``: global tokens g0, g0+stride, ...). Between two runs of one document
and one stride, ``key - query = (k.g0 - q.g0) + stride * (j' - i')``, so the global bounds
become a diagonal band in the block: one ``Piece``. ``block_mask`` does this for every pair of
runs of one document; padding slots belong to no run and so are in no piece.
"""
from __future__ import annotations

from typing import Optional

from .kernels.mask import Mask, Piece


def attention_bounds(causal: bool, window: Optional[tuple]) -> tuple:
    """(lo, hi) on ``key - query`` in global tokens; None is unbounded."""
    lo = hi = None
    if window is not None:
        left, right = window
        lo = None if left < 0 else -left
        hi = None if right < 0 else right
    if causal:
        hi = 0 if hi is None else min(hi, 0)
    return lo, hi


def _ceil_div(a: int, b: int) -> int:
    return -((-a) // b)


def block_mask(q_segs, k_segs, bounds: tuple, rows: Optional[slice] = None,
               cols: Optional[slice] = None) -> Mask:
    """The mask where the query runs ``q_segs`` meet the key runs ``k_segs``, in the
    coordinates of the block ``[rows, cols]`` of local slots (default: from slot 0)."""
    lo_g, hi_g = bounds
    r0 = rows.start if rows is not None else 0
    c0 = cols.start if cols is not None else 0
    by_doc: dict = {}
    for ks in k_segs:
        if cols is None or (ks.stop > cols.start and ks.start < cols.stop):
            by_doc.setdefault(ks.doc, []).append(ks)
    pieces = []
    for qs in q_segs:
        if rows is not None and (qs.stop <= rows.start or qs.start >= rows.stop):
            continue
        for ks in by_doc.get(qs.doc, ()):
            if ks.stride != qs.stride:
                raise ValueError("segments of one document must share a stride")
            s, delta = qs.stride, ks.g0 - qs.g0
            shift = (ks.start - c0) - (qs.start - r0)   # block j - i = run j' - i' + shift
            lo = None if lo_g is None else _ceil_div(lo_g - delta, s) + shift
            hi = None if hi_g is None else (hi_g - delta) // s + shift
            q_lo, q_hi = max(qs.start, r0), qs.stop if rows is None else min(qs.stop, rows.stop)
            k_lo, k_hi = max(ks.start, c0), ks.stop if cols is None else min(ks.stop, cols.stop)
            piece = Piece(q_lo - r0, q_hi - r0, k_lo - c0, k_hi - c0, lo, hi)
            resolved = piece.resolve(q_hi - r0, k_hi - c0)
            if resolved is not None:
                pieces.append(piece)
    return Mask(tuple(pieces))
