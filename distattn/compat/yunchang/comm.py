"""yunchang's ``EXTRACT_FUNC_DICT``: ``f(value, rank, world_size, rd, ud, dim=1)`` -> this
rank's shard of the full ``value`` along ``dim``. yunchang's semantics: the sequence is cut
into ring parts first (basic: contiguous; zigzag: chunks r and 2rd-1-r of 2rd; strip: tokens
t = r mod rd), then each ring part contiguously over the Ulysses ranks; ring rank
``rank // ud`` and Ulysses rank ``rank % ud`` (``use_ulysses_low=True``). That is exactly
``distattn.shard`` with the matching layout on an ``ulysses_inner`` mesh; here it is pure
indexing (no process group needed)."""
from __future__ import annotations

from ...layout import ring_layout

IMPL_LAYOUT = {"basic": "contiguous", "zigzag": "zigzag", "strip": "stripe"}


def _extractor(layout: str):
    def extract_local(value, rank, world_size, rd=None, ud=None, dim=1, *args, **kwargs):
        if rd is None or ud is None:          # yunchang's basic form: one plain ring
            rd, ud = world_size, 1
        if rd * ud != world_size:
            raise ValueError(f"rd x ud = {rd * ud} must equal world_size={world_size}")
        lay = ring_layout(layout, value.shape[dim], rd, ud)
        n = lay.local_len
        idx = lay.indices(rank // ud)[(rank % ud) * n:(rank % ud + 1) * n]
        return value.index_select(dim, idx.to(value.device))
    extract_local.__doc__ = f"This rank's shard under yunchang's layout (distattn {layout!r})."
    return extract_local


basic_extract_local = _extractor("contiguous")
zigzag_extract_local = _extractor("zigzag")
stripe_extract_local = _extractor("stripe")

EXTRACT_FUNC_DICT = {"basic": basic_extract_local, "zigzag": zigzag_extract_local,
                     "strip": stripe_extract_local}
