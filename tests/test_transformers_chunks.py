"""Llama 4's chunked attention through the transformers integration, on a gloo world of 4 CPU
processes: a tiny Llama4ForCausalLM (4 layers: chunked RoPE layers and full NoPE layers with
query temperature tuning, one MoE layer), chunk 5 < the sequence and not aligned with a rank's
8 tokens, floor_scale 4 so the NoPE temperature depends on the global row index. One SP
training step (ring 4 zigzag, Ulysses 4, USP 2x2 contiguous; and a packed row with restarting
position_ids) must match one-process eager training: loss and logits to 1e-5, every parameter
gradient summed over the SP group to 1e-4 relative, in fp32.
"""
import warnings

import pytest
import torch

from spawn import run_world
from test_transformers import _from_bytes, _to_bytes, assert_step_matches, sp_train_step

pytest.importorskip("transformers")

WORLD, BATCH, SEQ, VOCAB, CHUNK = 4, 2, 32, 101, 5
PACKED_DOCS = (0, 7, 19, 32)
CASES = [("ring4", "zigzag", False, False), ("ulysses4", "zigzag", False, False),
         ("usp2x2", "contiguous", True, False), ("ring4", "zigzag", False, True),
         ("usp2x2", "packed", False, True)]
MESHES = {"ring4": 1, "ulysses4": 4, "usp2x2": 2}


def case_id(case):
    mesh, layout, ckpt, packed = case
    return f"llama4-{mesh}-{layout}-{'remat' if ckpt else 'plain'}" + ("-packed" if packed else "")


def build_model():
    import transformers as tf
    cfg = tf.Llama4TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=64, intermediate_size_mlp=96,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_local_experts=2, num_experts_per_tok=1, moe_layers=[1],
        no_rope_layers=[1, 0, 1, 0], attention_chunk_size=CHUNK, floor_scale=4,
        attn_scale=0.5, max_position_embeddings=4 * SEQ, tie_word_embeddings=False)
    assert cfg.layer_types == ["chunked_attention", "full_attention"] * 2
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tf.Llama4ForCausalLM(cfg).float()
    model.train()
    return model


def make_batch(packed):
    g = torch.Generator().manual_seed(4321)
    if packed:
        ids = torch.randint(0, VOCAB, (1, SEQ), generator=g)
        pos = torch.cat([torch.arange(b - a) for a, b in zip(PACKED_DOCS[:-1], PACKED_DOCS[1:])])
        labels = ids.clone()
        labels[0, list(PACKED_DOCS[1:-1])] = -100   # no loss across a document end (as sp_loss)
        return {"input_ids": ids, "labels": labels, "position_ids": pos.unsqueeze(0)}
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels = ids.clone()
    labels[0, 3:6] = -100
    return {"input_ids": ids, "labels": labels}


def run_cases(rank, world):
    import distattn

    meshes = {name: distattn.SPMesh.build(ulysses_degree=u) for name, u in MESHES.items()}
    results = {}
    for case in CASES:
        mesh_name, layout, ckpt, packed = case
        mesh = meshes[mesh_name]
        local, out, loss, grads = sp_train_step(build_model(), mesh, layout, make_batch(packed),
                                                ckpt, f"distattn_chunks_{mesh_name}_{layout}")
        cu = local.get("distattn_cu_seqlens")
        results[case_id(case)] = {
            "loss": loss.detach().clone(),
            "logits": distattn.unshard(out.logits.detach(), mesh, dim=1, layout=layout,
                                       cu_seqlens=cu),
            "grads": grads if rank == 0 else None}
    return _to_bytes(results)


@pytest.fixture(scope="module")
def world_results():
    return [_from_bytes(r) for r in run_world(WORLD, run_cases)]


@pytest.fixture(scope="module")
def references():
    refs = {}
    for packed in (False, True):
        model = build_model()
        model.set_attn_implementation("eager")
        out = model(**make_batch(packed), use_cache=False)
        out.loss.backward()
        refs[packed] = {"loss": out.loss.detach(), "logits": out.logits.detach(),
                        "grads": {n: (p.grad.clone() if p.grad is not None
                                      else torch.zeros_like(p))
                                  for n, p in model.named_parameters()}}
    return refs


def test_reference_is_chunked():
    """The one-process reference really masks chunks: with a chunk covering the sequence the
    loss changes (so matching it tests the chunk mask)."""
    batch = make_batch(False)
    losses = []
    for chunk in (CHUNK, 4 * SEQ):
        model = build_model()
        model.config.attention_chunk_size = chunk
        model.set_attn_implementation("eager")
        with torch.no_grad():
            losses.append(model(**batch, use_cache=False).loss.item())
    assert abs(losses[0] - losses[1]) > 1e-3


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_llama4_chunked_matches_single_process(world_results, references, case):
    ref = references[case[3]]
    assert_step_matches([r[case_id(case)] for r in world_results], ref)


def test_chunk_size_mapping():
    from distattn.integrations import hf

    model = build_model()
    sizes = [hf.chunk_size(layer.self_attn) for layer in model.model.layers]
    assert sizes == [CHUNK, None, CHUNK, None]
    tuned = [hf.temperature_tuning(layer.self_attn) is not None for layer in model.model.layers]
    assert tuned == [False, True, False, True]
