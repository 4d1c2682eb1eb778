"""ring-flash-attention's transformers adapter over distattn (what OpenRLHF and axolotl call).

The client's pattern, unchanged::

    substitute_hf_flash_attn(sp_group, heads_k_stride)      # once
    update_ring_flash_attn_params(cu_seqlens, sp_group)     # every batch: global boundaries
    model(input_ids=local_ids, position_ids=local_pos)      # attn_implementation flash_attention_2

Each rank holds the contiguous slice [r*S/P, (r+1)*S/P) of one packed row (batch 1) whose
documents are at the global ``cu_seqlens``. ``substitute_hf_flash_attn`` points
transformers' ``flash_attention_2`` attention function (``ALL_ATTENTION_FUNCTIONS``, and the
older ``modeling_flash_attention_utils._flash_attention_forward`` hook) at distattn, so every
attention layer computes exact attention over the whole row (layout ``contiguous`` with the
documents). ``use_ring_attn(False)`` switches back to the function that was there before.

Unlike upstream: a layer's sliding window is a global window; softcap is honoured;
non-causal layers work; dropout raises (set attention_dropout=0). ``heads_k_stride`` is
accepted and unused (distattn does not all-gather K/V).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .._core import attend
from ..llama3_flash_attn_varlen import llama3_flash_attn_prepare_cu_seqlens

DATA_PARAMS = {}
RING_ATTN_SWITCH = True
# The global boundaries of the current batch and the group they belong to (set by
# update_ring_flash_attn_params; DATA_PARAMS keeps upstream's keys only).
_BATCH = {}
_ORIGINAL = {}


def update_ring_flash_attn_params(cu_seqlens: torch.Tensor, process_group) -> None:
    """Record the global document boundaries of the next forward's packed row (the same on
    every rank of ``process_group``) and upstream's per-rank values in ``DATA_PARAMS``."""
    world, rank = dist.get_world_size(process_group), dist.get_rank(process_group)
    cu_q, cu_k, max_q, max_k, k_slice = llama3_flash_attn_prepare_cu_seqlens(
        cu_seqlens, True, rank, world)
    DATA_PARAMS.update(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q,
                       max_seqlen_k=max_k, local_k_slice=k_slice)
    cu = cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else list(cu_seqlens)
    _BATCH.update(cu_seqlens=[int(x) for x in cu], group=process_group)


def use_ring_attn(flag: bool) -> None:
    """Turn the substituted attention on (True) or back to the original function (False)."""
    global RING_ATTN_SWITCH
    RING_ATTN_SWITCH = bool(flag)


def _attend_batch(q, k, v, *, causal, dropout, scale, sliding_window, softcap, group):
    """q [1, S/P, H, D], k, v [1, S/P, Hkv, D] -> out [1, S/P, H, D] over the recorded row."""
    if "cu_seqlens" not in _BATCH:
        raise RuntimeError("ring_flash_attn hf adapter: call update_ring_flash_attn_params("
                           "cu_seqlens, group) with the packed row's global boundaries before "
                           "the forward")
    if q.shape[0] != 1:
        raise ValueError(f"ring_flash_attn hf adapter: one packed row (batch 1) per rank, got "
                         f"batch {q.shape[0]}")
    window = (-1, -1) if sliding_window is None else (int(sliding_window) - 1,
                                                      int(sliding_window) - 1)
    return attend(q[0], k[0], v[0], where="ring_flash_attn hf adapter", layout="contiguous",
                  dropout_p=dropout, softmax_scale=scale, causal=causal, window_size=window,
                  softcap=softcap or 0.0, group=group, cu_seqlens=_BATCH["cu_seqlens"],
                  varlen=True).unsqueeze(0)


def create_ring_flash_attention_forward(process_group, heads_k_stride: int):
    """Replacements for transformers' ``_flash_attention_forward(query_states, key_states,
    value_states, attention_mask, query_length, is_causal, ...)`` ([B, S, H, D] inputs and
    output). Upstream returns one per transformers signature; this one takes every version's
    keywords, so the list has one element."""
    def flash_attention_forward(query_states, key_states, value_states, attention_mask,
                                query_length, is_causal, dropout=0.0, position_ids=None,
                                softmax_scale=None, sliding_window=None,
                                use_top_left_mask=False, softcap=None, deterministic=None,
                                **kwargs):
        return _attend_batch(query_states, key_states, value_states, causal=bool(is_causal),
                             dropout=dropout, scale=softmax_scale,
                             sliding_window=sliding_window, softcap=softcap,
                             group=process_group)
    return [flash_attention_forward]


def _attention_function(process_group):
    """transformers' attention-interface function: query/key/value [B, H, S, D] -> (out
    [B, S, H, D], None)."""
    def ring_flash_attention(module, query, key, value, attention_mask, dropout=0.0,
                             scaling=None, sliding_window=None, softcap=None, **kwargs):
        if not RING_ATTN_SWITCH:
            return _ORIGINAL["attention"](module, query, key, value, attention_mask,
                                          dropout=dropout, scaling=scaling,
                                          sliding_window=sliding_window, softcap=softcap,
                                          **kwargs)
        causal = kwargs.pop("is_causal", None)
        causal = getattr(module, "is_causal", True) if causal is None else causal
        if sliding_window is None:
            sliding_window = getattr(module, "sliding_window", None)
        out = _attend_batch(*(t.transpose(1, 2) for t in (query, key, value)),
                            causal=bool(causal), dropout=dropout, scale=scaling,
                            sliding_window=sliding_window, softcap=softcap,
                            group=process_group)
        return out, None
    return ring_flash_attention


def substitute_hf_flash_attn(process_group, heads_k_stride: int) -> None:
    """Make transformers' ``flash_attention_2`` attention distattn's over ``process_group``."""
    from transformers import modeling_flash_attention_utils as fa_utils
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if "attention" not in _ORIGINAL:
        _ORIGINAL["attention"] = ALL_ATTENTION_FUNCTIONS["flash_attention_2"]
        _ORIGINAL["forward"] = getattr(fa_utils, "_flash_attention_forward", None)
    new_forward = create_ring_flash_attention_forward(process_group, heads_k_stride)[0]
    old_forward = _ORIGINAL["forward"]

    def switched_forward(*args, **kwargs):
        return (new_forward if RING_ATTN_SWITCH or old_forward is None else old_forward)(
            *args, **kwargs)
    fa_utils._flash_attention_forward = switched_forward
    ALL_ATTENTION_FUNCTIONS["flash_attention_2"] = _attention_function(process_group)
