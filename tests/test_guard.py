"""The model guard (distattn/integrations/guard.py), without a world: the verdict is local and
deterministic (every rank computes it from the same config), so one process checks it.
Families of the allow-list pass (Llama 4's chunked layers too); hybrid sequence mixers, unknown layer
types, unknown families and length-dependent RoPE past its switch length are refused by name.
"""
import re
import warnings

import pytest

pytest.importorskip("transformers")
import transformers as tf  # noqa: E402

from distattn.integrations import guard  # noqa: E402

TINY = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def cfg(model_type, **extra):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = tf.AutoConfig.for_model(model_type, **TINY)
    for k, v in extra.items():
        setattr(c, k, v)
    return c


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral", "gemma2", "phi3",
                                        "llama4_text", "deepseek_v3"])
def test_allowed_families_pass(model_type):
    assert guard.config_verdict(cfg(model_type)).error is None


@pytest.mark.parametrize("model_type,needle", [
    ("qwen3_next", "'linear_attention'"), ("minimax", "'linear_attention'"),
    ("jamba", "amba"), ("lfm2", "convolution"), ("bamba", "'linear_attention'|Mamba"),
    ("falcon_h1", "'hybrid'|Mamba"), ("bloom", "EXACT_FAMILIES")])
def test_refused_families_name_the_reason(model_type, needle):
    try:
        c = cfg(model_type)
    except Exception as exc:   # absent in this transformers version
        pytest.skip(f"{model_type}: {exc}")
    with pytest.raises(guard.UnsupportedModelError, match="sequence parallelism") as info:
        guard.check_config(c)
    assert re.search(needle, str(info.value)), str(info.value)


def test_unknown_layer_type_is_refused():
    c = cfg("llama")
    c.layer_types = ["full_attention", "some_future_mixer"]
    with pytest.raises(guard.UnsupportedModelError, match="'some_future_mixer'.*does not know"):
        guard.check_config(c)


def test_length_dependent_rope_has_a_limit():
    c = cfg("llama")
    if hasattr(c, "rope_parameters") and c.rope_parameters is not None:
        c.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    else:
        c.rope_scaling = {"rope_type": "dynamic", "factor": 2.0}
    verdict = guard.check_config(c)
    assert verdict.max_len == 128 and verdict.rope_type == "dynamic"
    guard.check_length(verdict, 128)
    with pytest.raises(guard.UnsupportedModelError, match="'dynamic'.*at most 128"):
        guard.check_length(verdict, 256)


def test_static_rope_types_pass():
    c = cfg("llama")
    spec = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    if hasattr(c, "rope_parameters") and c.rope_parameters is not None:
        c.rope_parameters = spec
    else:
        c.rope_scaling = spec
    assert guard.check_config(c).max_len is None


def test_attention_kwargs_are_run_or_refused_by_name():
    """Every keyword argument an attention function receives is read by distattn, known not to
    change attention, or refused -- naming the argument and the way out; an argument distattn
    does not know is refused too, so one a later transformers adds is never silently dropped."""
    import torch

    from distattn.integrations import hf
    kinds = (hf.HANDLED_ATTENTION_KWARGS, hf.INERT_ATTENTION_KWARGS,
             set(hf.UNSUPPORTED_ATTENTION_KWARGS))
    assert all(not (a & b) for i, a in enumerate(kinds) for b in kinds[i + 1:])
    check = lambda **kw: hf.check_attention_kwargs("who", kw)
    check(**{k: torch.ones(2) for k in hf.HANDLED_ATTENTION_KWARGS | hf.INERT_ATTENTION_KWARGS})
    check(**{k: None for k in hf.UNSUPPORTED_ATTENTION_KWARGS}, some_new_flag=False)
    for arg, (what, fix) in hf.UNSUPPORTED_ATTENTION_KWARGS.items():
        with pytest.raises(NotImplementedError) as info:
            check(**{arg: torch.zeros(2, 3)})
        assert str(info.value) == f"who does not run {what} (got {arg}=Tensor of shape (2, 3)): " \
                                  f"{fix}"
    with pytest.raises(NotImplementedError, match=r"who got the attention argument "
                                                  r"brand_new_arg=7, which distattn does not "
                                                  r"know.*without sequence parallelism"):
        check(brand_new_arg=7)
    hf.check_attention_kwargs("who", {"output_router_logits": True},
                              allow=("output_router_logits",))


def test_every_layer_must_reach_distattn():
    """``guard.attention_layers``: the layers whose attention sp_loss requires to have run
    through distattn -- every decoder layer (of the text config for a composite one), or,
    with ``layer_types``, every attention layer (a hybrid's mixer and MLP layers do not)."""
    assert guard.attention_layers(cfg("llama")) == [0, 1]
    composite = cfg("qwen2")
    composite.text_config = cfg("llama", num_hidden_layers=3)
    assert guard.attention_layers(composite) == [0, 1, 2]
    hybrid = cfg("llama", layer_types=["linear_attention", "full_attention", "mlp", "hybrid",
                                       "sliding_attention"])
    assert guard.attention_layers(hybrid) == [1, 3, 4]


def test_a_hybrid_whose_mixers_are_not_found_is_refused(monkeypatch):
    """If a transformers version renames a hybrid's mixer, dtf.prepare must refuse the model
    rather than let the mixer run on this rank's tokens only."""
    transformers = pytest.importorskip("transformers")
    from distattn.integrations import mixers

    config = transformers.Lfm2Config(vocab_size=101, hidden_size=32, intermediate_size=48,
                                     num_hidden_layers=2, num_attention_heads=2,
                                     num_key_value_heads=1,
                                     layer_types=["conv", "full_attention"])
    model = transformers.AutoModelForCausalLM.from_config(config)
    monkeypatch.setitem(mixers.GATHERED_FAMILIES, "lfm2",
                        ("short causal convolutions", "renamed_conv", "ShortConv"))
    with pytest.raises(guard.UnsupportedModelError, match="found no sequence mixer of 'lfm2'"):
        guard.prepare(model)
