"""The OpenRLHF pattern through distattn.compat.ring_flash_attn's hf adapter: a tiny float64
Llama with attn_implementation "flash_attention_2", ``substitute_hf_flash_attn`` once,
``update_ring_flash_attn_params(cu_seqlens, group)`` per batch, and one packed row split
contiguously over 2 gloo ranks. Loss and gradients (all-reduced) equal per-document
one-process training with sdpa attention (1e-10)."""
from __future__ import annotations

import torch

from spawn import run_world

DOC_LENS = (5, 11, 3, 9)           # 28 tokens, documents cross the rank boundary
VOCAB = 64


def build_model():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      attention_dropout=0.0)
    return LlamaForCausalLM(cfg).double()


def batch():
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, VOCAB, (1, sum(DOC_LENS)), generator=g)
    pos = torch.cat([torch.arange(n) for n in DOC_LENS]).unsqueeze(0)
    # next-token targets inside each document (-100 at each document's last token)
    targets = torch.full_like(ids, -100)
    start = 0
    for n in DOC_LENS:
        targets[0, start:start + n - 1] = ids[0, start + 1:start + n]
        start += n
    return ids, pos, targets


def _sp_step(rank, world):
    import torch.distributed as dist
    from distattn.compat.ring_flash_attn.adapters import hf_adapter

    model = build_model()
    model.config._attn_implementation = "flash_attention_2"
    hf_adapter.substitute_hf_flash_attn(dist.group.WORLD, heads_k_stride=1)
    ids, pos, targets = batch()
    S = ids.shape[1]
    cu = torch.tensor((0,) + DOC_LENS, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    hf_adapter.update_ring_flash_attn_params(cu, dist.group.WORLD)
    n = S // world
    sl = slice(rank * n, (rank + 1) * n)
    logits = model(input_ids=ids[:, sl], position_ids=pos[:, sl], use_cache=False).logits
    count = int((targets != -100).sum())
    loss = torch.nn.functional.cross_entropy(logits[0], targets[0, sl], ignore_index=-100,
                                             reduction="sum") / count
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.clone()
        dist.all_reduce(g)
        grads[name] = g.tolist()         # plain data through the result queue
    return float(total), grads


def test_openrlhf_pattern_equals_per_document_training():
    per_rank = run_world(2, _sp_step)
    model = build_model()
    model.set_attn_implementation("sdpa")   # eager softmaxes in float32
    ids, pos, targets = batch()
    count = int((targets != -100).sum())
    loss, start = 0.0, 0
    for n in DOC_LENS:
        logits = model(input_ids=ids[:, start:start + n], use_cache=False).logits
        loss = loss + torch.nn.functional.cross_entropy(
            logits[0], targets[0, start:start + n], ignore_index=-100, reduction="sum")
        start += n
    loss = loss / count
    loss.backward()
    for sp_loss, grads in per_rank:
        assert abs(sp_loss - float(loss)) <= 1e-10 * abs(float(loss))
        for name, p in model.named_parameters():
            err = (torch.tensor(grads[name], dtype=torch.float64) - p.grad).abs().max() / p.grad.abs().max().clamp_min(1e-30)
            assert err <= 1e-10, (name, float(err))
