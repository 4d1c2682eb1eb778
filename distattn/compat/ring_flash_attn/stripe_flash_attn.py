"""ring-flash-attention's ``stripe_flash_attn_func`` family (striped shards) over distattn: the
global sequence of S tokens is sharded with distattn layout ``stripe`` over the ranks of
``group`` (token t on rank t mod P; upstream asserts causal, distattn also computes non-causal). See ``_core`` for what differs from upstream (global window, softcap, any
dtype; dropout and alibi raise)."""
from __future__ import annotations

from ._family import fixed_layout_family

(stripe_flash_attn_func,
 stripe_flash_attn_kvpacked_func,
 stripe_flash_attn_qkvpacked_func) = fixed_layout_family("stripe_flash_attn", "stripe")
