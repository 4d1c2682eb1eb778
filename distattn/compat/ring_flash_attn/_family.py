"""The three entry points every ring-flash-attention family has -- ``<prefix>_func`` (q, k, v),
``<prefix>_kvpacked_func`` (q, kv) and ``<prefix>_qkvpacked_func`` (qkv) -- made once for a
fixed-layout family and once for a varlen one, with upstream's positional signatures. The
packed forms split their input and call the plain one; the plain one is one call of
``_core.attend`` (fixed layouts) or ``_varlen.varlen_attend`` (per-document layouts)."""
from __future__ import annotations

from ._core import attend, split_kv, split_qkv
from ._varlen import varlen_attend


def _named(prefix: str, *funcs):
    for f, suffix in zip(funcs, ("_func", "_kvpacked_func", "_qkvpacked_func")):
        f.__name__ = f.__qualname__ = prefix + suffix
    return funcs


def fixed_layout_family(prefix: str, layout: str):
    """q [B, S/P, H, D], k, v [B, S/P, Hkv, D] (this rank's tokens, sharded with distattn
    ``layout``) -> out [B, S/P, H, D], or (out, lse [B, H, S/P], None) with
    ``return_attn_probs``; kv [B, S/P, 2, Hkv, D]; qkv [B, S/P, 3, H, D]."""
    def func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
             alibi_slopes=None, deterministic=False, return_attn_probs=False, group=None,
             softcap=0.0):
        return attend(q, k, v, where=f"{prefix}_func", layout=layout, dropout_p=dropout_p,
                      softmax_scale=softmax_scale, causal=causal, window_size=window_size,
                      softcap=softcap, alibi_slopes=alibi_slopes,
                      return_attn_probs=return_attn_probs, group=group)

    def kvpacked(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                 alibi_slopes=None, deterministic=False, return_attn_probs=False, group=None,
                 softcap=0.0):
        k, v = split_kv(kv, 2)
        return func(q, k, v, dropout_p, softmax_scale, causal, window_size, alibi_slopes,
                    deterministic, return_attn_probs, group, softcap)

    def qkvpacked(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                  alibi_slopes=None, deterministic=False, return_attn_probs=False, group=None,
                  softcap=0.0):
        q, k, v = split_qkv(qkv, 2)
        return func(q, k, v, dropout_p, softmax_scale, causal, window_size, alibi_slopes,
                    deterministic, return_attn_probs, group, softcap)

    for f in (func, kvpacked, qkvpacked):
        f.__doc__ = fixed_layout_family.__doc__
    return _named(prefix, func, kvpacked, qkvpacked)


def varlen_family(prefix: str, zigzag: bool):
    """q [total_local, H, D], k, v [total_local, Hkv, D] with this rank's ``cu_seqlens`` (the
    global boundaries divided by P) -> out [total_local, H, D], or (out, lse [H, total_local],
    None) with ``return_attn_probs``; kv [total_local, 2, Hkv, D]; qkv [total_local, 3, H, D].
    ``max_seqlen`` is accepted and unused."""
    def func(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
             window_size=(-1, -1), alibi_slopes=None, deterministic=False,
             return_attn_probs=False, group=None, softcap=0.0):
        return varlen_attend(q, k, v, cu_seqlens, zigzag=zigzag, where=f"{prefix}_func",
                             dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
                             window_size=window_size, softcap=softcap,
                             alibi_slopes=alibi_slopes, return_attn_probs=return_attn_probs,
                             group=group)

    def kvpacked(q, kv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None,
                 causal=False, window_size=(-1, -1), alibi_slopes=None, deterministic=False,
                 return_attn_probs=False, group=None, softcap=0.0):
        k, v = split_kv(kv, 1)
        return func(q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale, causal,
                    window_size, alibi_slopes, deterministic, return_attn_probs, group, softcap)

    def qkvpacked(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None,
                  causal=False, window_size=(-1, -1), alibi_slopes=None, deterministic=False,
                  return_attn_probs=False, group=None, softcap=0.0):
        q, k, v = split_qkv(qkv, 1)
        return func(q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale, causal,
                    window_size, alibi_slopes, deterministic, return_attn_probs, group, softcap)

    for f in (func, kvpacked, qkvpacked):
        f.__doc__ = varlen_family.__doc__
    return _named(prefix, func, kvpacked, qkvpacked)
