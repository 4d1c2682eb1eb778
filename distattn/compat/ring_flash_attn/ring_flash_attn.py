"""ring-flash-attention's ``ring_flash_attn_func`` family (contiguous shards) over distattn: the
global sequence of S tokens is sharded with distattn layout ``contiguous`` over the ranks of
``group`` (rank r holds tokens [r*S/P, (r+1)*S/P)). See ``_core`` for what differs from upstream (global window, softcap, any
dtype; dropout and alibi raise)."""
from __future__ import annotations

from ._core import attend, split_kv, split_qkv


def ring_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                         window_size=(-1, -1), alibi_slopes=None, deterministic=False,
                         return_attn_probs=False, group=None, softcap=0.0):
    """q [B, S/P, H, D], k, v [B, S/P, Hkv, D] (this rank's tokens) -> out [B, S/P, H, D],
    or (out, lse [B, H, S/P], None) with ``return_attn_probs``."""
    return attend(q, k, v, where="ring_flash_attn_func", layout="contiguous", dropout_p=dropout_p,
                  softmax_scale=softmax_scale, causal=causal, window_size=window_size,
                  softcap=softcap, alibi_slopes=alibi_slopes,
                  return_attn_probs=return_attn_probs, group=group)


def ring_flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False,
                                  window_size=(-1, -1), alibi_slopes=None, deterministic=False,
                                  return_attn_probs=False, group=None, softcap=0.0):
    """kv [B, S/P, 2, Hkv, D]."""
    k, v = split_kv(kv, 2)
    return ring_flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, alibi_slopes,
                                deterministic, return_attn_probs, group, softcap)


def ring_flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False,
                                   window_size=(-1, -1), alibi_slopes=None, deterministic=False,
                                   return_attn_probs=False, group=None, softcap=0.0):
    """qkv [B, S/P, 3, H, D]."""
    q, k, v = split_qkv(qkv, 2)
    return ring_flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, alibi_slopes,
                                deterministic, return_attn_probs, group, softcap)
