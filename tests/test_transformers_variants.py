"""Models with sliding windows, softcap and sinks through the transformers integration, on a
gloo world of 4 CPU processes: Mistral (window on every layer), Qwen2 (window on some layers),
Gemma 2 (alternating windows + logit softcap), Gemma 3 (alternating windows, bidirectional
variant too), gpt-oss (alternating windows + attention sinks) and Llama with dynamic NTK RoPE
(exact below its switch length, refused on every rank past it). One training step with
distattn (ring 4 zigzag; Ulysses 2 x ring 2 contiguous with rematerialization-aware
checkpointing) must match one-process eager training: loss and logits to 1e-5, every
parameter gradient (sinks included) summed over the SP group to 1e-4, in fp32. The windows
(5 or 6 tokens) are narrower than a rank's 8 tokens, so the ring stops early.
"""
import warnings

import pytest
import torch

from spawn import run_world
from test_transformers import _from_bytes, _to_bytes, assert_step_matches, sp_train_step

pytest.importorskip("transformers")

WORLD, BATCH, SEQ, VOCAB = 4, 2, 32, 101
CASES = [(model, mesh, layout, ckpt)
         for model in ("mistral", "qwen2", "gemma2", "gemma3", "gemma3_bidirectional",
                       "gpt_oss", "llama_dynamic")
         for mesh, layout, ckpt in (("ring4", "zigzag", False),
                                    ("ulysses2xring2", "contiguous", True))]


def case_id(case):
    model, mesh, layout, ckpt = case
    return f"{model}-{mesh}-{layout}-{'remat' if ckpt else 'plain'}"


def _dynamic_rope(config):
    """Dynamic NTK RoPE (recomputed from the length when it passes max_position_embeddings),
    in transformers 5's rope_parameters or 4.57's rope_scaling."""
    if getattr(config, "rope_parameters", None) is not None:
        config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    else:
        config.rope_scaling = {"rope_type": "dynamic", "factor": 2.0}
    return config


def build_model(kind, max_positions=4 * SEQ):
    import transformers as tf
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=max_positions, tie_word_embeddings=False)
    alternating = ["sliding_attention", "full_attention"]
    cfg, cls = {
        "mistral": lambda: (tf.MistralConfig(sliding_window=5, **common),
                            tf.MistralForCausalLM),
        "qwen2": lambda: (tf.Qwen2Config(use_sliding_window=True, sliding_window=6,
                                         max_window_layers=1, **common), tf.Qwen2ForCausalLM),
        "gemma2": lambda: (tf.Gemma2Config(sliding_window=5, attn_logit_softcapping=20.0,
                                           head_dim=16, layer_types=alternating, **common),
                           tf.Gemma2ForCausalLM),
        "gemma3": lambda: (tf.Gemma3TextConfig(sliding_window=5, head_dim=16,
                                               layer_types=alternating, **common),
                           tf.Gemma3ForCausalLM),
        "gemma3_bidirectional": lambda: (tf.Gemma3TextConfig(
            sliding_window=5, head_dim=16, layer_types=alternating,
            use_bidirectional_attention=True, **common), tf.Gemma3ForCausalLM),
        "gpt_oss": lambda: (tf.GptOssConfig(sliding_window=5, head_dim=16, num_local_experts=4,
                                            num_experts_per_tok=2, layer_types=alternating,
                                            **common), tf.GptOssForCausalLM),
        "llama_dynamic": lambda: (_dynamic_rope(tf.LlamaConfig(**common)),
                                  tf.LlamaForCausalLM),
    }[kind]()
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls(cfg).float()
    if kind == "gpt_oss":        # sinks start at zero-ish; make them matter
        for layer in model.model.layers:
            torch.nn.init.normal_(layer.self_attn.sinks, std=1.0)
    model.train()
    return model


def make_batch():
    g = torch.Generator().manual_seed(4321)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels = ids.clone()
    labels[0, 3:6] = -100
    return ids, labels


def run_cases(rank, world):
    import distattn

    ids, labels = make_batch()
    meshes = {"ring4": distattn.SPMesh.build(ulysses_degree=1),
              "ulysses2xring2": distattn.SPMesh.build(ulysses_degree=2)}
    results = {}
    for case in CASES:
        kind, mesh_name, layout, ckpt = case
        mesh = meshes[mesh_name]
        _, out, loss, grads = sp_train_step(build_model(kind), mesh, layout,
                                            {"input_ids": ids, "labels": labels}, ckpt,
                                            f"distattn_variants_{mesh_name}_{layout}")
        results[case_id(case)] = {
            "loss": loss.detach().clone(),
            "logits": distattn.unshard(out.logits.detach(), mesh, dim=1, layout=layout),
            "grads": grads if rank == 0 else None}
    # dynamic NTK RoPE past its switch length (16 < 32 tokens): each rank would rescale from
    # its own positions, so it is refused, on every rank, before any attention collective
    try:
        sp_train_step(build_model("llama_dynamic", max_positions=SEQ // 2), meshes["ring4"],
                      "zigzag", {"input_ids": ids, "labels": labels}, False,
                      "distattn_variants_dynamic_long")
        results["dynamic_past_limit"] = None
    except Exception as exc:
        results["dynamic_past_limit"] = (type(exc).__name__, str(exc))
    return _to_bytes(results)


@pytest.fixture(scope="module")
def world_results():
    return [_from_bytes(r) for r in run_world(WORLD, run_cases)]


@pytest.fixture(scope="module")
def references():
    ids, labels = make_batch()
    refs = {}
    for kind in sorted({c[0] for c in CASES}):
        model = build_model(kind)
        model.set_attn_implementation("eager")
        out = model(input_ids=ids, labels=labels, use_cache=False)
        out.loss.backward()
        refs[kind] = {"loss": out.loss.detach(), "logits": out.logits.detach(),
                      "grads": {n: (p.grad.clone() if p.grad is not None
                                    else torch.zeros_like(p))
                                for n, p in model.named_parameters()}}
    return refs


def test_length_dependent_rope_past_its_limit_is_refused_on_every_rank(world_results):
    for rank, r in enumerate(world_results):
        got = r["dynamic_past_limit"]
        assert got is not None, f"rank {rank} trained dynamic RoPE past its limit"
        assert got[0] == "UnsupportedModelError" and "'dynamic'" in got[1], (rank, got)
        assert "at most 16" in got[1], got[1]


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_variant_models_match_single_process(world_results, references, case):
    ref = references[case[0]]
    assert_step_matches([r[case_id(case)] for r in world_results], ref)
    if case[0] == "gpt_oss":
        assert any("sinks" in n and ref["grads"][n].abs().max() > 0 for n in ref["grads"])
