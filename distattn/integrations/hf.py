"""What distattn needs to know about the installed transformers, in one place.

transformers changes its internals from release to release; the two integration modules
(``transformers.py`` for training, ``generation.py`` for ``dtf.generate``) read them only
through this module, so a version break is fixed here once. The supported range is
``SUPPORTED`` (also stated in ``pyproject.toml``, and tested at both ends:
``tests/test_transformers_versions.py``).

Nothing here imports transformers at import time.
"""
from __future__ import annotations

import functools

# The oldest transformers the integration is tested with (pyproject.toml says the same).
OLDEST = "4.57"
SUPPORTED = f">={OLDEST}"

# The keyword arguments transformers passes to an attention function fall in three kinds
# (``check_attention_kwargs``); one outside all three is refused, so an argument a later
# transformers adds is never silently dropped.
#
# Read by distattn's attention functions themselves (run, or refused by value there).
HANDLED_ATTENTION_KWARGS = frozenset({
    "sliding_window", "softcap", "s_aux", "sinks",      # attention_variant
    "is_causal", "position_ids", "output_attentions",
    "distattn_cu_seqlens",                             # dtf.shard_batch's document boundaries
})
# Model-level flags that flow through the layers' **kwargs and do not change attention.
INERT_ATTENTION_KWARGS = frozenset({
    "use_cache", "output_hidden_states", "return_dict",
    "num_items_in_batch", "cache_position",
})
_BOUNDARIES = ("document boundaries for flash-attention varlen, given to the model directly",
               "give them to dtf.shard_batch with the batch (it turns them into "
               "'distattn_cu_seqlens', the global boundaries) instead of to the model")
_NO_SP = "train this model without sequence parallelism"
# Arguments that change the attention computation and that distattn does not run, refused
# when set (not None / False): name -> (what it is, the way out).
UNSUPPORTED_ATTENTION_KWARGS = {
    "position_bias": ("an additive position bias on the attention scores", _NO_SP),
    "cache": ("paged KV caches", "train with use_cache=False; generate with dtf.generate"),
    "indices": ("sparse attention over selected key indices (DeepSeek-V3.2-style indexer)",
                _NO_SP),
    "block_indices": ("block-sparse attention over selected key blocks", _NO_SP),
    "encoder_hidden_states": ("cross-attention to encoder states",
                              "distattn runs self-attention over the sharded sequence only; "
                              + _NO_SP),
    "output_router_logits": (
        "MoE router logits for a load-balancing loss: the model computes that loss from "
        "this rank's tokens only, which is not the single-device loss",
        "set output_router_logits=False (in the model call and config)"),
    "head_mask": ("head masks", "drop the head mask"),
    "layer_head_mask": ("head masks", "drop the head mask"),
    **{k: _BOUNDARIES for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
                                "max_length_k", "seq_idx")},
}


CU_SEQLENS_KEY = "distattn_cu_seqlens"   # model kwarg: global document boundaries (a tuple)


def attention_function(name: str):
    """The attention function transformers registered under ``name``, or None."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    try:
        return ALL_ATTENTION_FUNCTIONS[name]
    except KeyError:
        return None


def _short(value) -> str:
    """A value for an error message (a tensor by its shape, not its elements)."""
    shape = getattr(value, "shape", None)
    return f"{type(value).__name__} of shape {tuple(shape)}" if shape is not None \
        else repr(value)[:60]


def check_attention_kwargs(who: str, kwargs: dict, allow=()) -> None:
    """Raise ``NotImplementedError`` for an attention keyword argument that is set (not None
    or False) and that distattn does not run: one of ``UNSUPPORTED_ATTENTION_KWARGS`` (with
    its way out) not in ``allow``, or one distattn does not know at all. ``who`` starts the
    message."""
    for arg, value in kwargs.items():
        if arg in HANDLED_ATTENTION_KWARGS or arg in INERT_ATTENTION_KWARGS or arg in allow \
                or value is None or value is False:
            continue
        if arg in UNSUPPORTED_ATTENTION_KWARGS:
            what, fix = UNSUPPORTED_ATTENTION_KWARGS[arg]
            raise NotImplementedError(f"{who} does not run {what} (got {arg}={_short(value)}): "
                                      f"{fix}")
        raise NotImplementedError(
            f"{who} got the attention argument {arg}={_short(value)}, which distattn does not "
            f"know: it may change the attention computation, which distattn would then not "
            f"run. If your model call passes it, drop it; if the model passes it, {_NO_SP}")


def require():
    """Import transformers' attention and mask registries, or raise an ImportError that says
    how to install the extra (and which versions work)."""
    try:
        import transformers  # noqa: F401
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(f"distattn.integrations.transformers needs transformers{SUPPORTED}: "
                          f"pip install 'distattn[transformers]'") from exc
    check_version()
    return AttentionInterface, AttentionMaskInterface


@functools.cache
def version() -> tuple[int, int]:
    """(major, minor) of the installed transformers."""
    import transformers

    major, minor = transformers.__version__.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def check_version() -> None:
    oldest = tuple(int(p) for p in OLDEST.split("."))
    if version() < oldest:
        import transformers

        raise ImportError(f"distattn's transformers integration needs transformers{SUPPORTED}, "
                          f"found {transformers.__version__}: pip install -U 'transformers"
                          f"{SUPPORTED}'")


def cache_kwarg() -> str:
    """The name under which models and ``generate`` take a KV cache: ``cache`` from
    transformers 5.24 on (``past_key_values`` is then a deprecated alias), before that
    ``past_key_values``."""
    return "cache" if version() >= (5, 24) else "past_key_values"


def output_cache(output):
    """The cache of a model or ``generate`` output object (``.cache`` from 5.24 on,
    ``.past_key_values`` before)."""
    return getattr(output, cache_kwarg())


def chunk_size(module):
    """The attention chunk of ``module``'s layer (chunked attention, Llama 4), or None.

    transformers (4.57 and 5.x) marks chunked layers in the config: ``layer_types[i] ==
    "chunked_attention"`` for the layer ``module.layer_idx``, with the chunk in
    ``config.attention_chunk_size`` (Llama 4 makes its RoPE layers chunked, its NoPE layers
    -- ``no_rope_layers[i] == 0`` -- full). A config with ``attention_chunk_size`` and no
    ``layer_types`` is chunked on every layer, as transformers' mask builder reads it. A
    chunked layer without a chunk size raises (transformers itself cannot build its mask)."""
    config = getattr(module, "config", None)
    size = getattr(config, "attention_chunk_size", None)
    types = getattr(config, "layer_types", None)
    idx = getattr(module, "layer_idx", None)
    if types is not None:
        if idx is None or not 0 <= idx < len(types):
            if size is not None and "chunked_attention" in types:
                raise ValueError(f"{type(module).__name__} has no layer_idx: distattn cannot "
                                 f"tell whether its layer is chunked (layer_types holds "
                                 f"'chunked_attention')")
            return None
        if types[idx] != "chunked_attention":
            return None
        if size is None:
            raise ValueError(f"layer {idx} is 'chunked_attention' but the config has no "
                             f"attention_chunk_size: set it, or make the layer "
                             f"'full_attention'")
        return int(size)
    return None if size is None else int(size)


def temperature_tuning(module):
    """(floor_scale, attn_scale) of a Llama 4 NoPE layer that tunes its query temperature,
    else None. Such a layer multiplies query t by ``1 + attn_scale * log1p(floor((p + 1) /
    floor_scale))`` before attention, where p is the token's index in the *row* (transformers
    4.57: ``cache_position``; 5.x: ``arange`` of the row plus the cached length) -- never the
    position id. Under SP a rank's row is its shard, so p is a local index there:
    ``temperature_ratio`` corrects it."""
    if not getattr(module, "attn_temperature_tuning", False) or getattr(module, "use_rope", 1):
        return None
    return float(module.floor_scale), float(module.attn_scale)


def temperature_ratio(module, global_index):
    """The factor that turns the query temperature a NoPE layer applied with local indices
    0..n-1 into the one-process temperature at the tokens' global row indices
    ``global_index`` [n] (int64; padding slots, -1, get 1), or None when the layer tunes no
    temperature. Shape [1, 1, n, 1] (transformers' query layout [B, H, S, D])."""
    tuning = temperature_tuning(module)
    if tuning is None:
        return None
    import torch

    floor_scale, attn_scale = tuning
    temp = lambda p: torch.log1p(torch.floor((p.float() + 1.0) / floor_scale)) * attn_scale + 1.0
    local = torch.arange(global_index.numel(), device=global_index.device)
    ratio = torch.where(global_index >= 0, temp(global_index) / temp(local),
                        torch.ones((), device=global_index.device))
    return ratio.view(1, 1, -1, 1)


@functools.cache
def chunk_origin() -> str:
    """Where the installed transformers starts the chunks of a packed row: "document" when
    its mask builder remaps the mask's indices to the packed position ids
    (``masking_utils.remap_positions_for_packed_sequence``, transformers 5), so chunks
    restart at every document; "row" before (4.57: global indices of the row)."""
    from transformers import masking_utils

    return "document" if hasattr(masking_utils, "remap_positions_for_packed_sequence") \
        else "row"


def attention_variant(module, kwargs) -> dict:
    """window / softcap / sinks / chunk_size of one attention call, in distattn's terms.

    transformers' ``sliding_window=W`` lets query i see key j when ``|i - j| < W`` on the
    allowed side: ``window=(W - 1, W - 1)``; with causal attention the right side is cut to
    0, and bidirectional sliding layers (Gemma 3) keep both sides. Chunked layers add
    ``chunk_size`` (see ``chunk_size``) and ``chunk_origin`` (see ``chunk_origin``)."""
    width = kwargs["sliding_window"] if "sliding_window" in kwargs else \
        getattr(module, "sliding_window", None)
    sinks = kwargs.get("s_aux", kwargs.get("sinks"))
    size = chunk_size(module)
    chunks = {} if size is None else {"chunk_size": size, "chunk_origin": chunk_origin()}
    return {"window": None if width is None else (int(width) - 1, int(width) - 1),
            "softcap": kwargs.get("softcap"), "sinks": sinks, **chunks}


def plain_checkpointing(model) -> None:
    """Turn on transformers' own activation checkpointing (``activation_checkpointing_enable``
    from transformers 5, ``gradient_checkpointing_enable`` before)."""
    enable = getattr(model, "activation_checkpointing_enable", None) or \
        model.gradient_checkpointing_enable
    enable()


# transformers' own attention keys that ``dtf.register(..., override=KEY)`` may take over: the
# models of the allowed families look them up in ``AttentionInterface`` on every forward, and
# ``AttentionMaskInterface`` holds a mask function under each. Not ``eager`` (models call
# their own ``eager_attention_forward`` without a lookup), not ``flex_attention`` (untested),
# not the paged keys (KV-cache decoding).
OVERRIDABLE_KEYS = ("sdpa", "flash_attention_2", "flash_attention_3", "flash_attention_4")


def overridable_keys() -> tuple:
    """The keys of ``OVERRIDABLE_KEYS`` that the installed transformers has (4.57 has no
    ``flash_attention_4``)."""
    attention_interface, _ = require()
    return tuple(k for k in OVERRIDABLE_KEYS if registered(attention_interface, k) is not None)


def registered(interface, key):
    """The function class-wide under ``key`` in transformers' ``AttentionInterface`` or
    ``AttentionMaskInterface`` (what every model sees unless a modelling file shadows it
    locally), or None. A fresh instance has no local entries, so it reads the class-wide
    mapping (the same in 4.57 and 5.x)."""
    return interface().get(key)


def unregister(interface, key) -> None:
    """Remove ``key`` from the class-wide mapping. transformers has no public way to remove an
    entry; ``register`` writes ``_global_mapping`` (4.57 and 5.x), so this removes it there."""
    interface._global_mapping.pop(key, None)


def flash_key(key: str) -> bool:
    """Whether transformers treats ``key`` as a flash-attention implementation: it checks
    that the flash_attn package is installed when a model is created or switched to it
    (``from_pretrained``/``from_config(attn_implementation=...)``,
    ``model.set_attn_implementation``), and its chunked-attention mask builder refuses a key
    containing "flash" when the keys exceed the chunk (5.x; 4.57 only for
    "flash_attention_2")."""
    return "flash" in key


def loss_is_normalized(trainer) -> None:
    """Tell a ``transformers.Trainer`` that its ``compute_loss`` already divides by the tokens
    of every accumulated micro-batch (``num_items_in_batch``), so that it does not divide by
    the gradient accumulation steps again: 5.x reads ``loss_is_scaled_for_ga``; 4.57 skips the
    division when ``model_accepts_loss_kwargs`` is true and ``num_items_in_batch`` is given.
    Its other readers (the default ``compute_loss``, and the Trainer's own token count, which
    looks for ``labels``) do not run for ``SPTrainer``, which overrides the one and whose
    batches carry ``shift_labels``."""
    trainer.loss_is_scaled_for_ga = True
    trainer.model_accepts_loss_kwargs = True
