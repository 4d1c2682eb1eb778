"""ring-flash-attention's ``zigzag_ring_flash_attn_varlen_func`` family over distattn: packed documents, each split
in 2P zigzag chunks (rank r holds r and 2P-1-r) over the ranks of ``group``; ``cu_seqlens`` is this rank's (the global boundaries
divided by P, the same on every rank), ``max_seqlen`` is accepted and unused. Layout
``doc_zigzag``. See ``_core`` for what differs from upstream."""
from __future__ import annotations

from ._core import split_kv, split_qkv
from ._varlen import varlen_attend


def zigzag_ring_flash_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None,
                                       causal=False, window_size=(-1, -1), alibi_slopes=None, deterministic=False,
                                       return_attn_probs=False, group=None, softcap=0.0):
    """q [total_local, H, D], k, v [total_local, Hkv, D] -> out [total_local, H, D], or
    (out, lse [H, total_local], None) with ``return_attn_probs``."""
    return varlen_attend(q, k, v, cu_seqlens, zigzag=True, where="zigzag_ring_flash_attn_varlen_func",
                         dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
                         window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
                         return_attn_probs=return_attn_probs, group=group)


def zigzag_ring_flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None,
                                                causal=False, window_size=(-1, -1), alibi_slopes=None,
                                                deterministic=False, return_attn_probs=False, group=None, softcap=0.0):
    """kv [total_local, 2, Hkv, D]."""
    k, v = split_kv(kv, 1)
    return zigzag_ring_flash_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale, causal,
                                              window_size, alibi_slopes, deterministic, return_attn_probs, group, softcap)


def zigzag_ring_flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None,
                                                 causal=False, window_size=(-1, -1), alibi_slopes=None,
                                                 deterministic=False, return_attn_probs=False, group=None, softcap=0.0):
    """qkv [total_local, 3, H, D]."""
    q, k, v = split_qkv(qkv, 1)
    return zigzag_ring_flash_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale, causal,
                                              window_size, alibi_slopes, deterministic, return_attn_probs, group, softcap)
