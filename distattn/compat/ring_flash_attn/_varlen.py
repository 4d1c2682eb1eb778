"""Shared body of the per-document varlen entry points (ring and zigzag): the local
``cu_seqlens`` every rank passes is the global one divided by P (each document split over all
P ranks: in P contiguous parts, or in 2P zigzag chunks), so the global boundaries are the local
ones times P and the layout is distattn's ``doc_contiguous`` / ``doc_zigzag``."""
from __future__ import annotations

from ._core import as_int_list, attend, world_of


def global_cu_seqlens(cu_seqlens, group, zigzag: bool, where: str) -> list:
    local = as_int_list(cu_seqlens)
    P, _ = world_of(group)
    if zigzag:
        odd = [b - a for a, b in zip(local, local[1:]) if (b - a) % 2]
        if odd:
            raise ValueError(f"{where}: every local document length must be even (each rank "
                             f"holds two zigzag chunks of each document), got {odd[:4]}; pad "
                             f"every document to a multiple of 2*world_size before sharding")
    return [x * P for x in local]


def varlen_attend(q, k, v, cu_seqlens, *, zigzag: bool, where: str, **kwargs):
    cu = global_cu_seqlens(cu_seqlens, kwargs.get("group"), zigzag, where)
    if q.shape[0] != cu[-1] // world_of(kwargs.get("group"))[0]:
        raise ValueError(f"{where}: q has {q.shape[0]} local tokens but cu_seqlens ends at "
                         f"{as_int_list(cu_seqlens)[-1]}; pass this rank's local cu_seqlens "
                         f"(the global ones divided by world_size)")
    return attend(q, k, v, where=where, layout="doc_zigzag" if zigzag else "doc_contiguous",
                  cu_seqlens=cu, varlen=True, **kwargs)
