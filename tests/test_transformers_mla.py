"""MLA and uneven Ulysses heads through the transformers integration, on a gloo world of 4
CPU processes. DeepseekV3 (tiny: qk_nope 16 + qk_rope 8 = q/k head dim 24, v_head_dim 16) and a
Qwen2 whose 6 q / 3 K/V heads split unevenly over Ulysses 2. One training step with distattn
(ring 4 zigzag; Ulysses 2 x ring 2 contiguous) must match one-process eager training: loss and
logits to 1e-5, every parameter gradient summed over the SP group to 1e-4, in fp32. And
``dtf.generate`` greedy (prefill then decode through the ShardedKVCache) equals
``model.generate`` for DeepseekV3 on both meshes. (5.24's DeepseekV3 hands its cache the
compressed latents; distattn's cache layers keep the expanded K/V of its own ShardedKVCache.)

The distattn attention function gets V at its true head dim (transformers pads V only for its
flash-attention paths), so no score or output element is computed on padding.
"""
import warnings

import pytest
import torch

from spawn import run_world
from test_transformers import _from_bytes, _to_bytes, rel_err, sp_train_step

pytest.importorskip("transformers")

WORLD, BATCH, SEQ, VOCAB = 4, 2, 32, 101
CASES = [(model, mesh, layout)
         for model in ("deepseek_v3", "qwen2_uneven")
         for mesh, layout in (("ring4", "zigzag"), ("ulysses2xring2", "contiguous"))]


def case_id(case):
    return "-".join(case)


def build_model(kind):
    import transformers as tf
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "deepseek_v3":
            cfg = tf.DeepseekV3Config(
                vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                num_hidden_layers=2, first_k_dense_replace=1, n_routed_experts=4,
                num_experts_per_tok=2, n_group=1, topk_group=1, n_shared_experts=1,
                num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None,
                kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                max_position_embeddings=4 * SEQ, tie_word_embeddings=False)
            model = tf.DeepseekV3ForCausalLM(cfg).float()
        else:
            cfg = tf.Qwen2Config(vocab_size=VOCAB, hidden_size=48, intermediate_size=96,
                                 num_hidden_layers=2, num_attention_heads=6,
                                 num_key_value_heads=3, max_position_embeddings=4 * SEQ,
                                 tie_word_embeddings=False)
            model = tf.Qwen2ForCausalLM(cfg).float()
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
        kind, mesh_name, layout = case
        mesh = meshes[mesh_name]
        _, out, loss, grads = sp_train_step(build_model(kind), mesh, layout,
                                            {"input_ids": ids, "labels": labels}, False,
                                            f"distattn_mla_{mesh_name}_{layout}")
        results[case_id(case)] = {
            "loss": loss.detach().clone(),
            "logits": distattn.unshard(out.logits.detach(), mesh, dim=1, layout=layout),
            "grads": grads if rank == 0 else None}
    from distattn.integrations import transformers as dtf
    model = build_model("deepseek_v3").eval()
    for mesh_name, mesh in meshes.items():
        results[f"generate-{mesh_name}"] = dtf.generate(model, gen_prompts(), mesh,
                                                        max_new_tokens=6, do_sample=False)
    return _to_bytes(results)


def gen_prompts():
    return torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(1))


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


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_mla_and_uneven_models_match_single_process(world_results, references, case):
    ref = references[case[0]]
    per_rank = [r[case_id(case)] for r in world_results]
    for rank, r in enumerate(per_rank):
        assert torch.equal(r["loss"], per_rank[0]["loss"]), f"rank {rank}: another loss"
        assert rel_err(r["loss"], ref["loss"]) <= 1e-5, (r["loss"].item(), ref["loss"].item())
        assert rel_err(r["logits"], ref["logits"]) <= 1e-5, f"rank {rank} logits"
    grads, checked = per_rank[0]["grads"], 0
    for pname, g in ref["grads"].items():
        if g.abs().max() == 0:       # e.g. experts no token was routed to
            continue
        err = rel_err(grads[pname], g)
        assert err <= 1e-4, f"{pname}: gradient relative error {err:.2e}"
        checked += 1
    assert checked > 10


@pytest.mark.parametrize("mesh_name", ("ring4", "ulysses2xring2"))
def test_deepseek_v3_generate_greedy_equals_one_process(world_results, mesh_name):
    model = build_model("deepseek_v3").eval()
    ref = model.generate(gen_prompts(), max_new_tokens=6, do_sample=False,
                         pad_token_id=model.config.eos_token_id)
    for rank, r in enumerate(world_results):
        assert torch.equal(r[f"generate-{mesh_name}"], ref), f"rank {rank}"
