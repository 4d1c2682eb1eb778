"""ring-flash-attention's ``ring_flash_attn_varlen_func`` family over distattn: packed documents, each split
in P contiguous parts over the ranks of ``group``; ``cu_seqlens`` is this rank's (the global boundaries
divided by P, the same on every rank), ``max_seqlen`` is accepted and unused. Layout
``doc_contiguous``. See ``_core`` for what differs from upstream."""
from __future__ import annotations

from ._family import varlen_family

(ring_flash_attn_varlen_func,
 ring_flash_attn_varlen_kvpacked_func,
 ring_flash_attn_varlen_qkvpacked_func) = varlen_family("ring_flash_attn_varlen", zigzag=False)
