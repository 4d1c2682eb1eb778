"""The model guard: a transformers model trains exactly under sequence parallelism, or it is
refused on every rank before any communication (docs/DESIGN.md, section 8).

Under SP every rank runs the model on its own shard of the sequence. distattn's attention is
the one place where tokens of different ranks meet; any other layer that mixes tokens along
the sequence (linear attention / Gated DeltaNet, lightning attention, Mamba SSM scans, causal
or short convolutions, RoPE computed from the sequence length) would see only this rank's tokens and train silently wrong. The guard
therefore accepts only what is known to be exact:

- ``EXACT_FAMILIES``: the ``config.model_type`` values found to train exactly under ring and
  USP (loss 1e-5, gradients 1e-4 against one process, fp32): the families the held-out trial
  of issue 17 reported exact, and those this repository's model tests train (Llama, Qwen2,
  Mistral, Gemma 2/3, gpt-oss, Llama 4, DeepSeek V3). A family added to transformers later is
  not in it, so it is refused until a test shows it exact: tests/test_zoo.py runs every
  causal-LM family of the installed transformers and requires this set to be exactly the
  families it trains exactly (the rest refused).
- ``EXACT_LAYER_TYPES``: the ``config.layer_types`` values distattn runs exactly (full,
  sliding and chunked attention: ``hf.attention_variant`` maps windows and chunks). Any other
  value is refused by name (``linear_attention``, ``mamba``, ``conv``, ``hybrid`` with the
  mixer it stands for; anything else as an unknown layer type).
- RoPE: static types (``STATIC_ROPE_TYPES``) are exact with global ``position_ids``; types that
  transformers recomputes from ``max(position_ids) + 1`` (``dynamic``, ``longrope``) are exact
  only while the global length stays at or below the length where they switch, so the verdict
  carries that limit and ``check_call`` refuses a longer sequence. Unknown types are refused.

The verdict depends only on the config (and, for ``prepare``, the model's module classes),
which every rank holds identically: every rank reaches the same verdict without any collective.
It is computed once per config object and cached on it (``VERDICT_ATTR``).

Where it runs (whichever comes first): ``dtf.prepare(model)`` (config and modules; also called
by ``dtf.checkpoint_layers`` and ``dtf.generate``); the registered mask function (which
transformers calls with the config before the first layer, i.e. before distattn's first
collective); the registered attention function (with ``module.config``). A model whose forward
never reaches distattn, or reaches it on some layers only (no attention layer, attention that
does not use transformers' ``AttentionInterface``, a model left on another
``attn_implementation``), is refused by ``dtf.sp_loss`` before its all-reduce: it checks that
the latest forward ran distattn's attention on every layer (``attention_layers``;
``transformers._Reached``). ``sp_loss`` does not see the model, so its message cannot name the
family: ``dtf.prepare(model)`` does.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from .mixers import GATHERED_FAMILIES, gather_mixers, version_error

VERDICT_ATTR = "_distattn_verdict"

# config.model_type values known to train exactly (ring 4 zigzag and USP 2 x 2 contiguous,
# fp32, one step against one-process eager; see the module docstring). Extend only with proof.
EXACT_FAMILIES = frozenset({
    "llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "gemma2", "gemma3_text", "gpt_oss",
    "olmo2", "olmo3", "phi3", "granite", "cohere2", "smollm3", "exaone4", "glm4_moe",
    "ernie4_5",
    # tested exact by their own model tests: Llama 4 (chunked attention, NoPE layers with
    # temperature tuning: tests/test_transformers_chunks.py), DeepSeek V3 (MLA:
    # tests/test_transformers_mla.py)
    "llama4_text", "deepseek_v3",
})

# config.layer_types values that are softmax attention distattn runs exactly.
EXACT_LAYER_TYPES = frozenset({"full_attention", "sliding_attention", "chunked_attention",
                               "attention",     # hybrids' name for full attention (Granite 4)
                               "mlp", "moe"})   # token-wise layers (Nemotron-H)

# Layer types known to mix tokens by something other than softmax attention: what they are.
SEQUENCE_MIXER_LAYER_TYPES = {
    "linear_attention": "linear-attention / state-space layers (Gated DeltaNet, lightning "
                        "attention, Mamba, depending on the family)",
    "mamba": "Mamba / Mamba2 layers (SSM scan and causal conv1d)",
    "conv": "short causal convolution layers",
    "hybrid": "hybrid layers (attention and a state-space / convolution mixer side by side)",
}

# Config attributes that reveal a non-attention sequence mixer (for a precise message; the
# allow-list is what guarantees the refusal): attribute prefix -> what it is.
MIXER_CONFIG_HINTS = (
    ("mamba_", "Mamba / Mamba2 layers (SSM scan and causal conv1d)"),
    ("linear_num_", "Gated DeltaNet linear-attention layers"),
    ("linear_attn_", "lightning (linear) attention layers"),
    ("conv_L_cache", "short causal convolution layers (LFM2)"),
    ("short_conv", "short causal convolution layers"),
)

# Module class-name fragments of sequence mixers other than softmax attention (prepare only).
MIXER_MODULE_HINTS = ("Mamba", "GatedDeltaNet", "LightningAttention", "ShortConv", "Mixer",
                      "LinearAttention", "Recurrent", "Rwkv", "RWKV", "XLSTM", "Conv1d")

# RoPE types whose frequencies do not depend on the sequence length (transformers 4.57 and
# 5.24, modeling_rope_utils: only "dynamic*" and "longrope" are recomputed in the forward).
STATIC_ROPE_TYPES = frozenset({"default", "linear", "llama3", "yarn", "proportional"})
LENGTH_DEPENDENT_ROPE_TYPES = frozenset({"dynamic", "longrope"})


class UnsupportedModelError(NotImplementedError):
    """A model (or one of its layers) that distattn cannot run exactly under SP."""


@dataclasses.dataclass(frozen=True)
class Verdict:
    """``error``: the refusal message, or None when the model is exact. ``max_len``: the
    longest global sequence at which it stays exact (length-dependent RoPE), or None."""
    error: Optional[str] = None
    max_len: Optional[int] = None
    rope_type: Optional[str] = None


def _text_config(config):
    """The decoder's config of a composite config (``text_config``), else the config."""
    sub = getattr(config, "text_config", None)
    return sub if sub is not None and sub is not config else config


def _rope_specs(config) -> list:
    """Every RoPE parameter dict of the config: transformers 5's ``rope_parameters`` (one dict,
    or one per layer type), 4.57's ``rope_scaling`` (None for plain RoPE)."""
    params = getattr(config, "rope_parameters", None)
    if params is None:
        params = getattr(config, "rope_scaling", None)
    if not params:
        return [{"rope_type": "default"}]
    if isinstance(params, dict) and all(isinstance(v, dict) for v in params.values()):
        return list(params.values())
    return [params]


def _rope_limit(config, spec, rope_type) -> int:
    """The longest global sequence at which a length-dependent RoPE computes what it computes
    for any shorter one (so every rank's local ``max(position_ids) + 1`` and the full
    sequence's pick the same frequencies). Conservative: the smallest candidate either version
    reads (dynamic: ``max_position_embeddings``; longrope: ``original_max_position_embeddings``
    of the rope parameters or the config, else ``max_position_embeddings``)."""
    candidates = [getattr(config, "max_position_embeddings", None),
                  spec.get("original_max_position_embeddings"),
                  getattr(config, "original_max_position_embeddings", None)]
    return min(int(c) for c in candidates if c)


def _family(config) -> str:
    return f"{getattr(config, 'model_type', '?')!r} ({', '.join(getattr(config, 'architectures', None) or []) or type(config).__name__})"


WAY_OUT = ("Train this model without sequence parallelism (attn_implementation='sdpa' or "
           "'eager', whole sequences per rank), or with a model family distattn lists as "
           "exact (distattn.integrations.guard.EXACT_FAMILIES)")


def _gathered_way(config) -> str:
    """The way out for a family whose mixers distattn runs gathered (see mixers.py)."""
    if getattr(config, "model_type", None) not in GATHERED_FAMILIES:
        return ""
    return ("dtf.prepare(model) runs them exactly, gathered over the SP group (each rank "
            "computes these layers over the whole sequence; see docs/TRAINING.md). Or: ")


def _config_error(config, gathered_mixers: bool = False
                  ) -> tuple[Optional[str], Optional[int], Optional[str]]:
    """(refusal or None, RoPE length limit, RoPE type). ``gathered_mixers``: the model's
    sequence mixers run gathered (``mixers.gather_mixers``), so mixer layers are accepted
    for families in ``GATHERED_FAMILIES``."""
    family = _family(config)
    head = f"distattn cannot train model family {family} exactly under sequence parallelism: "
    way_out = _gathered_way(config) + WAY_OUT
    gathered_mixers = gathered_mixers and getattr(config, "model_type", None) in GATHERED_FAMILIES
    layer_types = list(getattr(config, "layer_types", None) or [])
    for idx, kind in enumerate(layer_types):
        if kind in EXACT_LAYER_TYPES or (gathered_mixers and kind in SEQUENCE_MIXER_LAYER_TYPES):
            continue
        what = SEQUENCE_MIXER_LAYER_TYPES.get(kind)
        if what is not None:
            return (head + f"layer {idx} has layer type {kind!r}: {what}, which mix tokens "
                    f"along the sequence outside distattn's attention and would see only this "
                    f"rank's tokens. " + way_out, None, None)
        return (head + f"layer {idx} has layer type {kind!r}, which distattn does not know "
                f"(known exact: {sorted(EXACT_LAYER_TYPES)}); an unknown layer may mix tokens "
                f"along the sequence. " + WAY_OUT, None, None)
    for prefix, what in () if gathered_mixers else MIXER_CONFIG_HINTS:
        names = [n for n in vars(config) if n.startswith(prefix)]
        if names:
            return (head + f"its config describes {what} ({names[0]}=...), which mix tokens "
                    f"along the sequence outside distattn's attention and would see only this "
                    f"rank's tokens. " + way_out, None, None)
    max_len, rope_kind = None, None
    for spec in _rope_specs(config):
        rope_type = spec.get("rope_type", spec.get("type", "default"))
        if rope_type in STATIC_ROPE_TYPES:
            continue
        if rope_type in LENGTH_DEPENDENT_ROPE_TYPES:
            limit = _rope_limit(config, spec, rope_type)
            max_len = limit if max_len is None else min(max_len, limit)
            rope_kind = rope_type
            continue
        return (head + f"its RoPE type {rope_type!r} is not known to distattn (known: "
                f"{sorted(STATIC_ROPE_TYPES | LENGTH_DEPENDENT_ROPE_TYPES)}); it may depend on "
                f"the sequence length, which each rank sees only locally. Use a static RoPE "
                f"type", None, None)
    if getattr(config, "model_type", None) not in EXACT_FAMILIES and not gathered_mixers:
        return (head + f"the family is not in distattn's allow-list of families tested exact "
                f"(EXACT_FAMILIES); it may hold layers that mix tokens along the sequence "
                f"outside attention. " + WAY_OUT, None, None)
    return None, max_len, rope_kind


def config_verdict(config) -> Verdict:
    """The verdict for a model config (its decoder's ``text_config`` for composite models),
    computed once and cached on the config object."""
    config = _text_config(config)
    cached = getattr(config, VERDICT_ATTR, None)
    if isinstance(cached, Verdict):
        return cached
    error, max_len, rope_type = _config_error(config)
    verdict = Verdict(error, max_len, rope_type)
    try:
        object.__setattr__(config, VERDICT_ATTR, verdict)
    except Exception:  # pragma: no cover - a config that refuses attributes: no cache
        pass
    return verdict


def check_config(config) -> Verdict:
    """Raise ``UnsupportedModelError`` if the config's model is not exact under SP; return the
    verdict otherwise. Local and deterministic: every rank raises the same error."""
    verdict = config_verdict(config)
    if verdict.error is not None:
        raise UnsupportedModelError(verdict.error)
    return verdict


def check_length(verdict: Verdict, global_len: int, where: str = "") -> None:
    """Refuse a global sequence longer than a length-dependent RoPE allows (every rank passes
    the same global length, so every rank raises or none does)."""
    if verdict.max_len is not None and global_len > verdict.max_len:
        raise UnsupportedModelError(
            f"distattn{where}: the model's RoPE type {verdict.rope_type!r} recomputes its "
            f"frequencies from the sequence length (max(position_ids) + 1), which each rank "
            f"sees only for its own tokens; at this global length ({global_len} tokens, more "
            f"than {verdict.max_len}) the ranks and the full sequence would rotate with "
            f"different frequencies. Train with sequences of at most {verdict.max_len} "
            f"tokens, or switch the config to a static RoPE type (e.g. 'linear' or 'yarn' "
            f"with a fixed factor)")


# Layer types whose decoder layer holds softmax attention (Falcon-H1's "hybrid" layers hold
# it beside a Mamba mixer).
ATTENTION_LAYER_TYPES = frozenset({"full_attention", "sliding_attention", "chunked_attention",
                                   "attention", "hybrid"})


def attention_layers(config) -> list:
    """The decoder layers of ``config``'s model whose attention must run through distattn
    (``dtf.sp_loss`` checks that the forward ran it on that many layers): with
    ``layer_types``, those of ``ATTENTION_LAYER_TYPES``; without, every one of
    ``num_hidden_layers`` -- except for a hybrid of ``GATHERED_FAMILIES``, whose config then
    does not say which layers attend: none is required by index (``sp_loss`` still requires
    one at least)."""
    config = _text_config(config)
    types = getattr(config, "layer_types", None)
    if types:
        return [i for i, kind in enumerate(types) if kind in ATTENTION_LAYER_TYPES]
    if getattr(config, "model_type", None) in GATHERED_FAMILIES:
        return []
    return list(range(int(getattr(config, "num_hidden_layers", 0) or 0)))


def module_error(model, gathered=()) -> Optional[str]:
    """A refusal for a module of ``model`` whose class is a known non-attention sequence
    mixer (Mamba, Gated DeltaNet, short convolutions, ...), or None. ``gathered``: names of
    modules that run gathered (they, their submodules and the layers holding them are
    exact)."""
    for name, module in model.named_modules():
        if any(name == g or name.startswith(f"{g}.") or g.startswith(f"{name}.")
               for g in gathered):       # a gathered mixer, inside one, or holding one
            continue
        cls = type(module).__name__
        if any(h in cls for h in MIXER_MODULE_HINTS) and "Attention" not in cls.replace(
                "LinearAttention", "").replace("LightningAttention", ""):
            return (f"distattn cannot train {type(model).__name__} exactly under sequence "
                    f"parallelism: module {name!r} ({cls}) mixes tokens along the sequence "
                    f"outside distattn's attention and would see only this rank's tokens. "
                    + WAY_OUT)
    return None


def prepare(model):
    """Check ``model`` (a transformers model) once -- its config and its modules -- and raise
    ``UnsupportedModelError`` on every rank if it cannot train exactly under SP. A hybrid
    model of ``GATHERED_FAMILIES`` (Mamba, Gated DeltaNet, lightning attention, short
    convolutions) is accepted by hooking its sequence mixers to run gathered over the SP
    group (``mixers.gather_mixers``). The verdict is cached on the model; returns ``model``.
    No communication."""
    cached = getattr(model, VERDICT_ATTR, None)
    if not isinstance(cached, Verdict):
        config = getattr(model, "config", None)
        if config is None:
            raise UnsupportedModelError(
                f"dtf.prepare: {type(model).__name__} has no transformers config; distattn's "
                f"guard checks transformers models only")
        gathered = ()
        model_type = getattr(_text_config(config), "model_type", None)
        if version_error(model_type) is not None:
            verdict = Verdict(version_error(model_type))
        elif model_type in GATHERED_FAMILIES:
            gathered = gather_mixers(model)
            verdict = Verdict(*_config_error(_text_config(config), gathered_mixers=True))
            if not gathered:      # its mixers under another name: they would run locally
                verdict = Verdict(
                    f"dtf.prepare found no sequence mixer of {model_type!r} where distattn "
                    f"expects one (mixers.GATHERED_FAMILIES); this transformers version may "
                    f"name it differently, so its layers would see only this rank's tokens. "
                    + WAY_OUT)
            object.__setattr__(_text_config(config), VERDICT_ATTR, verdict)
        else:
            verdict = config_verdict(config)
        if verdict.error is None:
            error = module_error(model, gathered)
            if error is not None:
                verdict = Verdict(error)
        cached = verdict
        setattr(model, VERDICT_ATTR, verdict)
    if cached.error is not None:
        raise UnsupportedModelError(cached.error)
    return model
