"""ring-flash-attention's ``zigzag_ring_flash_attn_func`` family (zigzag shards) over distattn: the
global sequence of S tokens is sharded with distattn layout ``zigzag`` over the ranks of
``group`` (the sequence cut into 2P chunks, rank r holds chunks r and 2P-1-r). See ``_core`` for what differs from upstream (global window, softcap, any
dtype; dropout and alibi raise)."""
from __future__ import annotations

from ._family import fixed_layout_family

(zigzag_ring_flash_attn_func,
 zigzag_ring_flash_attn_kvpacked_func,
 zigzag_ring_flash_attn_qkvpacked_func) = fixed_layout_family("zigzag_ring_flash_attn", "zigzag")
