"""ring-flash-attention's llama3-style varlen attention over distattn: the packed row of S
tokens (documents at the global ``cu_seqlens``) is split contiguously, rank r holding tokens
[r*S/P, (r+1)*S/P) whatever the documents (distattn layout ``contiguous`` with
``cu_seqlens``). Upstream all-gathers K/V, ``heads_k_stride`` heads at a time; distattn runs its
ring (or USP) instead, so ``heads_k_stride`` is accepted and unused.

``llama3_flash_attn_prepare_cu_seqlens`` returns upstream's five values. The varlen function
rebuilds the global boundaries from every rank's ``cu_seqlens_q`` and ``local_k_slice`` (one
small all-gather of ints per call); the hf adapter, which knows the global list, skips it."""
from __future__ import annotations

import torch
import torch.distributed as dist

from ._core import as_int_list, attend, split_kv, split_qkv, world_of


def llama3_flash_attn_prepare_cu_seqlens(cu_seqlens, causal, rank, world_size):
    """(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, local_k_slice) of rank
    ``rank``: its query tokens' boundaries (local, from 0 to S/P), the boundaries of the keys it
    needs (from the start of its first document; causal: up to its last token, else to the end
    of its last document) and that key range as a slice of global tokens. S must divide by P."""
    cu_t = cu_seqlens if isinstance(cu_seqlens, torch.Tensor) else torch.tensor(cu_seqlens)
    cu = as_int_list(cu_seqlens)
    total = cu[-1]
    if total % world_size:
        raise ValueError(f"llama3_flash_attn_prepare_cu_seqlens: the packed length {total} must "
                         f"divide by world_size={world_size}; pad the row")
    n = total // world_size
    lo, hi = rank * n, (rank + 1) * n
    first = max(i for i, b in enumerate(cu) if b <= lo)          # document holding token lo
    last = min(i for i, b in enumerate(cu) if b >= hi)           # its end boundary index
    inner = cu[first:last + 1]
    q_bounds = [0] + [b - lo for b in inner[1:-1]] + [n]
    k_left = inner[0]
    k_right = hi if causal else inner[-1]
    k_bounds = [b - k_left for b in inner[:-1]] + [k_right - k_left]
    as_t = lambda xs: torch.tensor(xs, dtype=cu_t.dtype, device=cu_t.device)
    cu_q, cu_k = as_t(q_bounds), as_t(k_bounds)
    max_q = max(b - a for a, b in zip(q_bounds, q_bounds[1:]))
    max_k = max(b - a for a, b in zip(k_bounds, k_bounds[1:]))
    return cu_q, cu_k, max_q, max_k, slice(k_left, k_right)


def global_from_local(cu_seqlens_q, local_k_slice, group) -> list:
    """The global boundaries from every rank's local query boundaries: an inner local boundary
    is a global one; a rank's first token starts a document exactly when its key range starts
    there too."""
    P, rank = world_of(group)
    local = as_int_list(cu_seqlens_q)
    n = local[-1]
    mine = (local[1:-1], int(local_k_slice.start) == rank * n)
    every = [None] * P
    dist.all_gather_object(every, mine, group=group)
    cu = {0, n * P}
    for r, (inner, starts) in enumerate(every):
        cu.update(r * n + b for b in inner)
        if starts:
            cu.add(r * n)
    return sorted(cu)


def llama3_flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                  max_seqlen_k, heads_k_stride, local_k_slice, dropout_p=0.0,
                                  softmax_scale=None, causal=False, window_size=(-1, -1),
                                  alibi_slopes=None, deterministic=False,
                                  return_attn_probs=False, group=None, softcap=0.0):
    """q [S/P, H, D], k, v [S/P, Hkv, D] (this rank's contiguous slice of the packed row) ->
    out [S/P, H, D], or (out, lse [H, S/P], None). ``cu_seqlens_q`` / ``local_k_slice`` are
    what ``llama3_flash_attn_prepare_cu_seqlens`` returned on this rank."""
    cu = global_from_local(cu_seqlens_q, local_k_slice, group)
    return attend(q, k, v, where="llama3_flash_attn_varlen_func", layout="contiguous",
                  dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
                  window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
                  return_attn_probs=return_attn_probs, group=group, cu_seqlens=cu,
                  varlen=True)


def llama3_flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                           max_seqlen_k, heads_k_stride, local_k_slice,
                                           dropout_p=0.0, softmax_scale=None, causal=False,
                                           window_size=(-1, -1), alibi_slopes=None,
                                           deterministic=False, return_attn_probs=False,
                                           group=None, softcap=0.0):
    """kv [S/P, 2, Hkv, D]."""
    k, v = split_kv(kv, 1)
    return llama3_flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                         max_seqlen_k, heads_k_stride, local_k_slice, dropout_p,
                                         softmax_scale, causal, window_size, alibi_slopes,
                                         deterministic, return_attn_probs, group, softcap)


def llama3_flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                            max_seqlen_k, heads_k_stride, local_k_slice,
                                            dropout_p=0.0, softmax_scale=None, causal=False,
                                            window_size=(-1, -1), alibi_slopes=None,
                                            deterministic=False, return_attn_probs=False,
                                            group=None, softcap=0.0):
    """qkv [S/P, 3, H, D]."""
    q, k, v = split_qkv(qkv, 1)
    return llama3_flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                         max_seqlen_k, heads_k_stride, local_k_slice, dropout_p,
                                         softmax_scale, causal, window_size, alibi_slopes,
                                         deterministic, return_attn_probs, group, softcap)
