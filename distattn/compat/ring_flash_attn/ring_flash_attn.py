"""ring-flash-attention's ``ring_flash_attn_func`` family (contiguous shards) over distattn: the
global sequence of S tokens is sharded with distattn layout ``contiguous`` over the ranks of
``group`` (rank r holds tokens [r*S/P, (r+1)*S/P)). See ``_core`` for what differs from upstream (global window, softcap, any
dtype; dropout and alibi raise)."""
from __future__ import annotations

from ._family import fixed_layout_family

(ring_flash_attn_func,
 ring_flash_attn_kvpacked_func,
 ring_flash_attn_qkvpacked_func) = fixed_layout_family("ring_flash_attn", "contiguous")
