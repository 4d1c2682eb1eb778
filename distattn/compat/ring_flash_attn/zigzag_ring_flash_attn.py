"""ring-flash-attention's ``zigzag_ring_flash_attn_func`` family (zigzag shards) over distattn: the
global sequence of S tokens is sharded with distattn layout ``zigzag`` over the ranks of
``group`` (the sequence cut into 2P chunks, rank r holds chunks r and 2P-1-r). See ``_core`` for what differs from upstream (global window, softcap, any
dtype; dropout and alibi raise)."""
from __future__ import annotations

from ._core import attend, split_kv, split_qkv


def zigzag_ring_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                                window_size=(-1, -1), alibi_slopes=None, deterministic=False,
                                return_attn_probs=False, group=None, softcap=0.0):
    """q [B, S/P, H, D], k, v [B, S/P, Hkv, D] (this rank's tokens) -> out [B, S/P, H, D],
    or (out, lse [B, H, S/P], None) with ``return_attn_probs``."""
    return attend(q, k, v, where="zigzag_ring_flash_attn_func", layout="zigzag", dropout_p=dropout_p,
                  softmax_scale=softmax_scale, causal=causal, window_size=window_size,
                  softcap=softcap, alibi_slopes=alibi_slopes,
                  return_attn_probs=return_attn_probs, group=group)


def zigzag_ring_flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False,
                                         window_size=(-1, -1), alibi_slopes=None, deterministic=False,
                                         return_attn_probs=False, group=None, softcap=0.0):
    """kv [B, S/P, 2, Hkv, D]."""
    k, v = split_kv(kv, 2)
    return zigzag_ring_flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, alibi_slopes,
                                       deterministic, return_attn_probs, group, softcap)


def zigzag_ring_flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False,
                                          window_size=(-1, -1), alibi_slopes=None, deterministic=False,
                                          return_attn_probs=False, group=None, softcap=0.0):
    """qkv [B, S/P, 3, H, D]."""
    q, k, v = split_qkv(qkv, 2)
    return zigzag_ring_flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, alibi_slopes,
                                       deterministic, return_attn_probs, group, softcap)
