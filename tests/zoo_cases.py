"""The model zoo of tests/test_zoo.py: every causal-LM family of the installed transformers,
built tiny, and what distattn must do with it under sequence parallelism.

The family list is read from transformers itself (``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``), so a
family that a later transformers adds enters the zoo by itself and must be refused (it is not
in the guard's allow-list) until a test shows it exact. Families that are not decoder-only
language models (encoder-decoders, multimodal composites whose text decoder is listed under
its own model type) are left out by name in ``NOT_DECODERS``, with the reason.

Each family is built from ``AutoConfig.for_model(model_type, **TINY)`` plus the shrinking of
whatever size attributes its config has (``SHRINK``: experts, MLA ranks, windows, ...) plus the
family's own ``OVERRIDES`` (alternating sliding / full layers, softcap, sinks, chunks, MLA), so
that the features distattn must run are exercised: windows (5 tokens) and chunks (5 tokens)
narrower than a rank's 8 tokens. Every dropout is 0 (exactness needs deterministic training).
"""
from __future__ import annotations

import warnings

import torch

SEQ, BATCH, VOCAB = 32, 2, 101
WINDOW, CHUNK = 5, 5
ALTERNATING = ["sliding_attention", "full_attention"]

TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4 * SEQ,
            tie_word_embeddings=False)

# Attribute -> tiny value, applied where the family's config has the attribute (and, for
# sliding_window, a window at all).
SHRINK = {
    "head_dim": 16, "rotary_dim": 8,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_k": 2, "moe_topk": 2,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
    "moe_shared_expert_intermediate_size": 32, "n_shared_experts": 1, "n_group": 1,
    "topk_group": 1, "first_k_dense_replace": 1, "num_nextn_predict_layers": 0,
    "kv_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16,
    "linear_key_head_dim": 16, "linear_value_head_dim": 16, "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "mamba_n_heads": 8, "mamba_d_head": 16, "mamba_num_heads": 8, "mamba_head_dim": 16,
    "mamba_d_ssm": 128, "mamba_d_state": 16, "mamba_n_groups": 1, "mamba_chunk_size": 16,
    "mamba_dt_rank": 8, "n_groups": 1, "chunk_size": 16, "use_mamba_kernels": False,
    "sliding_window": WINDOW,
    "pad_token_id": 0,
    "output_router_logits": False,      # no auxiliary router loss in the reference loss
}

_MAMBA2 = dict(mamba_n_heads=4, mamba_d_head=32, mamba_d_state=8, mamba_chunk_size=8,
               mamba_n_groups=1)

# Family-specific settings, over TINY and SHRINK.
OVERRIDES = {
    "qwen2": dict(use_sliding_window=True, sliding_window=6, max_window_layers=1),
    "qwen3": dict(use_sliding_window=True, sliding_window=6, max_window_layers=1),
    "gemma2": dict(layer_types=ALTERNATING, attn_logit_softcapping=20.0),
    "gemma3_text": dict(layer_types=ALTERNATING),
    "gpt_oss": dict(layer_types=ALTERNATING),
    "olmo3": dict(layer_types=ALTERNATING),
    "cohere2": dict(layer_types=ALTERNATING),
    "exaone4": dict(layer_types=ALTERNATING),
    "smollm3": dict(no_rope_layer_interval=2),      # layer 1 without RoPE (NoPE)
    "deepseek_v3": dict(q_lora_rank=None),
    "xmod": dict(default_language="en_XX"),
    "lfm3": dict(layer_types=["conv", "full_attention"]),
    # hybrids: a mixer layer, then an attention layer (so that their gathered mixers,
    # dtf.prepare, and distattn's attention both run)
    "lfm2": dict(layer_types=["conv", "full_attention"], conv_L_cache=3),
    "bamba": dict(attn_layer_indices=[1], **_MAMBA2),
    "granitemoehybrid": dict(layer_types=["mamba", "attention"], num_local_experts=2,
                             num_experts_per_tok=1, **_MAMBA2),
    "nemotron_h": dict(num_hidden_layers=3, hybrid_override_pattern="M*-", mamba_num_heads=4,
                       mamba_head_dim=16, ssm_state_size=8, chunk_size=8, n_groups=1),
    "falcon_h1": dict(mamba_d_ssm=128, **_MAMBA2),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                  expert_layer_offset=1, num_experts=2, num_experts_per_tok=1,
                  mamba_d_state=8, mamba_d_conv=4, mamba_expand=2),
    "qwen3_next": dict(layer_types=["linear_attention", "full_attention"]),
    "minimax": dict(layer_types=["linear_attention", "full_attention"], block_size=8),
    "llama4_text": dict(
        num_hidden_layers=4, intermediate_size=64, intermediate_size_mlp=96,
        num_experts_per_tok=1, moe_layers=[1], no_rope_layers=[1, 0, 1, 0],
        attention_chunk_size=CHUNK, floor_scale=4, attn_scale=0.5),
}

# Causal-LM model types that are not decoder-only language models: why they are left out.
_ENC_DEC = "an encoder-decoder (its decoder attends to encoder states)"
_COMPOSITE = "a multimodal composite; its text decoder is in the zoo under its own model type"
NOT_DECODERS = {
    **{t: _ENC_DEC for t in (
        "bart", "bigbird_pegasus", "blenderbot", "blenderbot-small", "marian", "mbart", "mvp",
        "pegasus", "plbart", "prophetnet", "whisper", "musicgen", "musicgen_melody", "moshi",
        "moss_transcribe_diarize", "trocr")},
    **{t: _COMPOSITE for t in (
        "gemma3", "gemma3n", "gemma4", "gemma4_unified", "gemma4_unified_assistant",
        "gemma4_assistant", "llama4", "mllama", "qwen3_5", "qwen3_5_moe", "qwen4_exp",
        "emu3", "git", "fuyu", "got_ocr2", "phi4_multimodal", "dots3_note", "blt")},
    "xlnet": "a permutation LM without a causal-LM training step (needs perm_mask)",
    "reformer": "a hashed-attention model that needs axial position sizes matching the length",
}

# Families the zoo requires to be present when the installed transformers has them (the
# brief of issue 17); absent ones are skipped with that reason.
REQUIRED = (
    "llama", "qwen2", "qwen3", "qwen3_moe", "mistral", "gemma2", "gemma3_text", "gpt_oss",
    "olmo2", "olmo3", "phi3", "granite", "cohere2", "smollm3", "exaone4", "glm4_moe",
    "ernie4_5", "llama4_text", "deepseek_v3",
    "qwen3_next", "minimax", "nemotron_h", "falcon_h1", "bamba", "jamba", "lfm2")

# The hybrid families the zoo requires to train exactly after ``dtf.prepare(model)`` (their
# sequence mixers then run gathered over the SP group), and to be refused without it: must be
# ``distattn.integrations.mixers.GATHERED_FAMILIES``.
EXPECTED_GATHERED = frozenset({
    "lfm2", "bamba", "granitemoehybrid", "nemotron_h", "falcon_h1", "jamba", "qwen3_next",
    "minimax"})

# The families the zoo requires to train exactly: the guard's allow-list must be this set
# (tests/test_zoo.py checks both ways), so no family is allowed without this proof.
EXPECTED_EXACT = frozenset({
    "llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "gemma2", "gemma3_text", "gpt_oss",
    "olmo2", "olmo3", "phi3", "granite", "cohere2", "smollm3", "exaone4", "glm4_moe",
    "ernie4_5", "llama4_text", "deepseek_v3"})

# What a refusal must name, for the families refused for a known sequence mixer (a regex on
# the message). Every refused family's message must also name the way out (``WAY_OUT``).
_MAMBA = r"layer type '(linear_attention|hybrid|mamba)'|Mamba"
MIXER_REFUSALS = {
    "qwen3_next": r"layer type 'linear_attention'",
    "qwen3_5_text": r"layer type 'linear_attention'",
    "qwen3_5_moe_text": r"layer type 'linear_attention'",
    "minimax": r"layer type 'linear_attention'|lightning",
    "nemotron_h": _MAMBA, "falcon_h1": _MAMBA, "bamba": _MAMBA, "jamba": _MAMBA,
    "granitemoehybrid": _MAMBA, "mamba": _MAMBA, "mamba2": _MAMBA, "falcon_mamba": _MAMBA,
    "lfm2": r"convolution", "lfm2_moe": r"convolution", "lfm3": r"convolution",
}
# Any other refused family: its message names the family, a mixer layer type or a mixer the
# config describes.
FAMILY_REFUSAL = r"family '[\w-]+' .* not in distattn's allow-list|layer \d+ has layer type " \
                 r"'\w+'|its config describes"
# sp_loss's refusal of a forward that never ran distattn's attention (it does not see the
# model, so it names neither; dtf.prepare does).
NEVER_RAN = r"never ran distattn's attention function"
WAY_OUT = "without sequence parallelism"


class Unbuildable(Exception):
    """The family does not build tiny (or is absent) in the installed transformers."""


def families() -> list:
    """Every causal-LM model type of the installed transformers that the zoo builds."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return sorted(t for t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if t not in NOT_DECODERS)


def config(model_type):
    """The tiny config of ``model_type`` (raises ``Unbuildable``)."""
    import transformers as tf
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    if model_type not in CONFIG_MAPPING_NAMES:
        raise Unbuildable(f"{model_type} is not in transformers {tf.__version__}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            default = tf.AutoConfig.for_model(model_type)
            kwargs = dict(TINY)
            for name, value in vars(default).items():
                if ("dropout" in name or "pdrop" in name) and isinstance(value, float):
                    kwargs[name] = 0.0
            mla = hasattr(default, "qk_rope_head_dim")      # MLA: head_dim is the RoPE part,
            if mla:                                          # and K/V heads = query heads
                kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
            for name, value in SHRINK.items():
                if name == "head_dim" and mla:
                    continue
                settable = not isinstance(getattr(type(default), name, None), property)
                if settable and hasattr(default, name) and (
                        name != "sliding_window" or getattr(default, name) is not None):
                    kwargs[name] = value
            kwargs.update(OVERRIDES.get(model_type, {}))
            return tf.AutoConfig.for_model(model_type, **kwargs)
        except Exception as exc:
            raise Unbuildable(f"{model_type}: tiny config fails: {type(exc).__name__}: "
                              f"{str(exc)[:200]}") from exc


def build(model_type):
    """The tiny model (fp32, train mode, eager attention), the same weights in every process
    (seed 0). Raises ``Unbuildable``."""
    import transformers as tf
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    cfg = config(model_type)
    cls = getattr(tf, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, ""), None)
    if cls is not None and ".deprecated." in cls.__module__:
        raise Unbuildable(f"{model_type}: deprecated in transformers {tf.__version__} "
                          f"(models/deprecated, unmaintained modelling code)")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
        except Exception as exc:
            raise Unbuildable(f"{model_type}: tiny model fails to build: "
                              f"{type(exc).__name__}: {str(exc)[:200]}") from exc
    model.float().train()
    return model


def batch():
    """The full batch every rank holds: [2, 32] ids, labels with ignored tokens inside and
    at the end of a sequence."""
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(1, VOCAB, (BATCH, SEQ), generator=g)
    labels = ids.clone()
    labels[0, 5:9] = -100
    labels[1, -3:] = -100
    return {"input_ids": ids, "labels": labels}
