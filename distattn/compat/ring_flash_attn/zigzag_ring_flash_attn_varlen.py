"""ring-flash-attention's ``zigzag_ring_flash_attn_varlen_func`` family over distattn: packed documents, each split
in 2P zigzag chunks (rank r holds r and 2P-1-r) over the ranks of ``group``; ``cu_seqlens`` is this rank's (the global boundaries
divided by P, the same on every rank), ``max_seqlen`` is accepted and unused. Layout
``doc_zigzag``. See ``_core`` for what differs from upstream."""
from __future__ import annotations

from ._family import varlen_family

(zigzag_ring_flash_attn_varlen_func,
 zigzag_ring_flash_attn_varlen_kvpacked_func,
 zigzag_ring_flash_attn_varlen_qkvpacked_func) = varlen_family("zigzag_ring_flash_attn_varlen", zigzag=True)
