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

import dataclasses
import functools
from typing import Optional

from .kernels.mask import Mask, Piece
from .layout import RingLayout, cut_by_documents


def check_chunk_size(chunk_size) -> Optional[int]:
    """A positive int (chunked attention, Llama 4's ``attention_chunk_size``) or None (off).
    Raises ValueError naming the argument and the fix."""
    if chunk_size is None:
        return None
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int (query i sees key j only if "
                         f"i // chunk_size == j // chunk_size, global token indices) or None "
                         f"for no chunks; got {chunk_size!r}")
    return chunk_size


CHUNK_ORIGINS = ("row", "document")


def check_chunk_origin(chunk_origin) -> str:
    if chunk_origin not in CHUNK_ORIGINS:
        raise ValueError(f"chunk_origin must be 'row' (chunks at global multiples of "
                         f"chunk_size in the packed row) or 'document' (chunks restart at each "
                         f"document's first token); got {chunk_origin!r}")
    return chunk_origin


def chunk_boundaries(seq_len: int, chunk_size: int, cu_seqlens: Optional[tuple],
                     origin: str = "row") -> tuple:
    """Boundaries of the chunked documents: the documents' own (``cu_seqlens``, or [0, S])
    together with the chunk ends. ``origin="row"``: chunks count *global* token indices of
    the row (multiples of ``chunk_size``; transformers 4.57 masks a packed row so:
    ``q_idx // chunk == kv_idx // chunk``, and-ed with the same-document mask).
    ``origin="document"``: chunks count positions within each document (``cu[d] + m *
    chunk_size``; transformers 5 remaps the mask's indices to the packed position ids)."""
    docs = cu_seqlens or (0, seq_len)
    if origin == "row":
        ends = range(0, seq_len, chunk_size)
    else:
        ends = (p for a, b in zip(docs[:-1], docs[1:]) for p in range(a, b, chunk_size))
    return tuple(sorted(set(docs) | set(ends)))


@functools.lru_cache(maxsize=64)
def chunked_layout(lay: RingLayout, chunk_size: Optional[int],
                   origin: str = "row") -> RingLayout:
    """The layout ``lay`` for masking under chunked attention: "documents inside documents".
    Every segment is cut again where a chunk ends, and ``doc`` then numbers the chunked
    documents (``chunk_boundaries``), so ``block_mask`` shows a key only inside its query's
    chunk and plans skip (compute nothing, send nothing at) ring steps no chunk reaches.
    Slots and global tokens are those of ``lay``: shard, unshard and positions do not change.
    The result is for plans only (its ``cu_seqlens`` are the chunked boundaries)."""
    if chunk_size is None or chunk_size >= lay.seq_len:
        return lay
    cu = chunk_boundaries(lay.seq_len, chunk_size, lay.cu_seqlens, origin)
    parts = tuple(tuple(piece for sg in segs for piece in cut_by_documents(
        sg.start, sg.length, sg.g0, sg.stride, cu)) for segs in lay.parts)
    return dataclasses.replace(lay, cu_seqlens=cu, parts=parts)


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


def _token_range(sg) -> tuple:
    """The smallest and largest global token of a run."""
    last = sg.g0 + sg.stride * (sg.length - 1)
    return min(sg.g0, last), max(sg.g0, last)


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
        q_min, q_max = _token_range(qs)
        for ks in by_doc.get(qs.doc, ()):
            if ks.stride != qs.stride:
                raise ValueError("segments of one document must share a stride")
            # Whole runs out of reach (key - query outside [lo_g, hi_g] for every pair): the
            # common case under causality, decided before any piece is built.
            k_min, k_max = _token_range(ks)
            if (hi_g is not None and k_min - q_max > hi_g) or \
                    (lo_g is not None and k_max - q_min < lo_g):
                continue
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
