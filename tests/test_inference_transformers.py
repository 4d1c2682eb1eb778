"""``dtf.generate`` on a real gloo world of 4 CPU processes: tiny Llama, Qwen2, Mistral (a
sliding window shorter than the sequence), Gemma 2 (windows and softcap) and gpt-oss (windows
and sinks) models in float64, ring 4 and USP 2x2; greedy tokens must equal one-process
``model.generate``, seeded sampling must give the same tokens on every rank (and the
one-process ones); continuations with pass-Q and pass-KV and a chunked prefill equal
one-process generation on the whole sequence. Refusals are raised before any collective.
(The core it runs on: tests/test_inference.py.)
"""
from __future__ import annotations

import pytest
import torch

from spawn import run_world
from test_inference import WORLD, _error, assert_refused

from distattn.inference import count_sent_bytes

# ---------------------------------------------------------------------------------------------
# transformers: models and worker
# ---------------------------------------------------------------------------------------------
VOCAB, PROMPT, NEW = 101, 19, 6
GREEDY_LENGTHS = (PROMPT, 37, 32)    # odd lengths, and one every mesh and layout divides
# name -> K/V heads (of 4 query heads). Mistral's window (8) cuts the 25-token sequences.
MODELS = {"llama": 4, "qwen2": 2, "mistral": 1}
# windows on alternating layers with softcap (Gemma 2) or sinks (gpt-oss): greedy only
VARIANT_MODELS = {"gemma2": 2, "gpt_oss": 2}
TF_MESHES = {"ring4": 1, "usp2x2": 2}                  # name -> Ulysses degree


def build_model(kind: str):
    """The same tiny float64 model (same weights) in every process."""
    import warnings

    import transformers as tf
    heads = {**MODELS, **VARIANT_MODELS}[kind]
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=heads,
                  max_position_embeddings=256, tie_word_embeddings=False)
    alternating = dict(sliding_window=6, head_dim=16,
                       layer_types=["sliding_attention", "full_attention"])
    config = {
        "llama": lambda: tf.LlamaConfig(**common),
        "qwen2": lambda: tf.Qwen2Config(**common),
        "mistral": lambda: tf.MistralConfig(**{"sliding_window": 8, **common}),
        "gemma2": lambda: tf.Gemma2Config(attn_logit_softcapping=20.0, **alternating,
                                          **common),
        "gpt_oss": lambda: tf.GptOssConfig(num_local_experts=4, num_experts_per_tok=2,
                                           **alternating, **common),
    }
    cls = {"llama": tf.LlamaForCausalLM, "qwen2": tf.Qwen2ForCausalLM,
           "mistral": tf.MistralForCausalLM, "gemma2": tf.Gemma2ForCausalLM,
           "gpt_oss": tf.GptOssForCausalLM}[kind]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls(config[kind]()).double().eval()
    if kind == "gpt_oss":
        if hasattr(model, "set_experts_implementation"):   # transformers 5: grouped_mm,
            model.set_experts_implementation("eager")      # which has no float64
        for layer in model.model.layers:               # sinks start near zero: make them count
            torch.nn.init.normal_(layer.self_attn.sinks, std=1.0)
    return model


def prompts(batch: int = 2, length: int = PROMPT, seed: int = 11) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def turn_two(first: torch.Tensor) -> torch.Tensor:
    """A follow-up turn: the first turn's ids and 7 new prompt tokens."""
    return torch.cat([first, prompts(first.shape[0], 7, seed=12)], dim=1)


def _generate_cases(dtf, mesh, model, ids):
    ones = torch.ones_like(ids)
    greedy = dtf.generate(model, ids, mesh, attention_mask=ones, max_new_tokens=NEW,
                          do_sample=False)
    torch.manual_seed(1234)
    sampled = dtf.generate(model, ids, mesh, attention_mask=ones, max_new_tokens=NEW,
                           do_sample=True, top_k=30, temperature=0.9)
    return greedy, sampled


def tf_refusals(dtf, meshes, ids):
    """Bad calls on every rank; none may reach a collective. Then one good call."""
    import torch.distributed as dist

    ring, usp = meshes["ring4"], meshes["usp2x2"]
    llama = build_model("llama")
    other_mesh_cache = dtf.sharded_cache(usp, llama.config)
    left_padded = torch.ones_like(ids)
    left_padded[0, :3] = 0
    window = build_model("mistral")
    res = {}
    with count_sent_bytes() as wire:
        call = lambda model=llama, x=ids, mesh=ring, **kw: (
            lambda: dtf.generate(model, x, mesh, max_new_tokens=2, **kw))
        res["short_prompt"] = _error(call(x=ids[:, :WORLD]))
        res["other_mesh"] = _error(call(past_key_values=other_mesh_cache))
        res["left_padding"] = _error(call(attention_mask=left_padded))
        res["beams"] = _error(call(num_beams=2))
        res["unknown_kwarg"] = _error(call(assistant_model=llama))
        res["window"] = _error(call(model=window, prefill_chunk_size=WORLD + 1))
        res["bad_strategy"] = _error(call(strategy="pass_z"))
        res["chunk_too_small"] = _error(call(prefill_chunk_size=2))
        res["not_a_cache"] = _error(call(past_key_values=object()))
    res["collectives_during_errors"] = wire["calls"]
    res["attn_implementation_kept"] = llama.config._attn_implementation
    # a cache continued with ids that do not extend it (found before any collective too)
    cache = dtf.sharded_cache(ring, llama.config)
    first = dtf.generate(llama, ids, ring, past_key_values=cache, max_new_tokens=2)
    wrong = first.clone()
    wrong[0, 0] = (wrong[0, 0] + 1) % VOCAB
    with count_sent_bytes() as wire:
        res["wrong_continuation"] = _error(lambda: dtf.generate(
            llama, torch.cat([wrong, ids[:, :3]], 1), ring, past_key_values=cache,
            max_new_tokens=2))
    res["collectives_during_errors"] += wire["calls"]
    dist.barrier()
    res["good_after_errors"] = dtf.generate(llama, ids, ring, max_new_tokens=2).shape[1]
    return res


def tf_disagreements(dtf, mesh, ids, rank: int) -> dict:
    """One rank (the last) generates differently: another max_new_tokens, another sampling
    seed, or logits of its own (a rank-dependent logits processor). Every rank must raise
    the same named error, and the next good call must work."""
    import transformers as tf

    class Nudge(tf.LogitsProcessor):      # the last rank prefers another token from step 2
        def __call__(self, input_ids, scores):
            if rank == WORLD - 1 and input_ids.shape[1] >= PROMPT + 2:
                scores = scores.clone()
                scores[:, 0] += 1e3
            return scores

    llama, odd = build_model("llama"), rank == WORLD - 1
    res = {}
    res["max_new_tokens"] = _error(lambda: dtf.generate(
        llama, ids, mesh, max_new_tokens=3 if odd else 2))
    torch.manual_seed(100 + rank)
    res["seed"] = _error(lambda: dtf.generate(llama, ids, mesh, max_new_tokens=2,
                                              do_sample=True))
    res["logits"] = _error(lambda: dtf.generate(
        llama, ids, mesh, max_new_tokens=4, logits_processor=tf.LogitsProcessorList([Nudge()])))
    res["good_after"] = dtf.generate(llama, ids, mesh, max_new_tokens=2).shape[1]
    return res


def tf_worker(rank: int, world: int) -> dict:
    import distattn
    from distattn.integrations import hf, transformers as dtf

    meshes = {name: distattn.SPMesh.build(ulysses_degree=u) for name, u in TF_MESHES.items()}
    ids = prompts()
    results = {}
    for kind in MODELS:
        model = build_model(kind)
        for mesh_name, mesh in meshes.items():
            greedy, sampled = _generate_cases(dtf, mesh, model, ids)
            results[f"{kind}-{mesh_name}"] = {"greedy": greedy, "sampled": sampled}
    for kind in [*MODELS, *VARIANT_MODELS]:
        model = build_model(kind)
        for mesh_name, mesh in meshes.items():
            for length in GREEDY_LENGTHS:
                cache, x = dtf.sharded_cache(mesh, model.config), prompts(length=length)
                out = dtf.generate(model, x, mesh, cache=cache, attention_mask=torch.ones_like(x),
                                   max_new_tokens=NEW, do_sample=False)
                results[f"{kind}-{mesh_name}-{length}"] = {
                    "greedy": out, "seq_len": cache.sharded.seq_len,
                    "counts": cache.sharded.counts, "work": dict(cache.sharded.work)}
    # continuations: pass-Q and pass-KV turns, and a chunked prefill; the cache's placement
    llama = build_model("llama")
    for mesh_name, mesh in meshes.items():
        cache = dtf.sharded_cache(mesh, llama.config)
        first = dtf.generate(llama, ids, mesh, past_key_values=cache, max_new_tokens=NEW)
        counts = [row[:] for row in cache.sharded.counts]
        local, nbytes = cache.sharded.local_len, cache.sharded.nbytes()
        second = dtf.generate(llama, turn_two(first), mesh, past_key_values=cache,
                              max_new_tokens=NEW, strategy="pass_q")
        third = dtf.generate(llama, turn_two(second), mesh, past_key_values=cache,
                             max_new_tokens=NEW, strategy="pass_kv")
        out = dtf.generate(llama, ids, mesh, max_new_tokens=NEW, prefill_chunk_size=WORLD + 1,
                           return_dict_in_generate=True)
        results[f"turns-{mesh_name}"] = {
            "first": first, "second": second, "third": third, "counts": counts,
            "local": local, "nbytes": nbytes, "chunked": out.sequences,
            "chunked_cache_type": type(hf.output_cache(out)).__name__,
            "chunked_cache_len": hf.output_cache(out).get_seq_length()}
    results["refusals"] = tf_refusals(dtf, meshes, ids)
    results["disagreements"] = tf_disagreements(dtf, meshes["usp2x2"], ids, rank)
    return results


# ---------------------------------------------------------------------------------------------
# transformers: assertions
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tf_results():
    pytest.importorskip("transformers")
    return run_world(WORLD, tf_worker)


@pytest.fixture(scope="module")
def tf_references():
    """One process, the model's own attention and DynamicCache."""
    pytest.importorskip("transformers")
    ids, refs = prompts(), {}
    for kind in MODELS:
        model = build_model(kind)
        ones = torch.ones_like(ids)
        greedy = model.generate(ids, attention_mask=ones, max_new_tokens=NEW, do_sample=False)
        torch.manual_seed(1234)
        sampled = model.generate(ids, attention_mask=ones, max_new_tokens=NEW, do_sample=True,
                                 top_k=30, temperature=0.9)
        refs[kind] = {"greedy": greedy, "sampled": sampled}
    for kind in [*MODELS, *VARIANT_MODELS]:
        model = build_model(kind)
        for length in GREEDY_LENGTHS:     # all-ones mask: a prompt may hold the pad id
            x = prompts(length=length)
            refs[f"{kind}-{length}"] = model.generate(x, attention_mask=torch.ones_like(x),
                                                      max_new_tokens=NEW, do_sample=False)
    llama = build_model("llama")
    gen = lambda x: llama.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW,
                                   do_sample=False)
    first = gen(ids)
    second = gen(turn_two(first))
    refs["turns"] = {"first": first, "second": second, "third": gen(turn_two(second))}
    return refs


@pytest.mark.parametrize("length", GREEDY_LENGTHS)
@pytest.mark.parametrize("mesh_name", TF_MESHES)
@pytest.mark.parametrize("kind", [*MODELS, *VARIANT_MODELS])
def test_generate_greedy_equals_one_process(tf_results, tf_references, kind, mesh_name,
                                            length):
    """Token for token, and the cache holds what it should: prompt + NEW - 1 tokens (the last
    new token is never fed back), each on one rank; the prompt but its last token prefilled
    once, sharded; every decode step one token (nothing re-fed)."""
    ref = tf_references[f"{kind}-{length}"]
    assert ref.shape == (2, length + NEW)
    for rank, r in enumerate(tf_results):
        got = r[f"{kind}-{mesh_name}-{length}"]
        assert torch.equal(got["greedy"], ref), f"rank {rank}:\n{got['greedy']}\n!=\n{ref}"
        assert got["seq_len"] == length + NEW - 1
        assert sum(c for row in got["counts"] for c in row) == length + NEW - 1
        assert got["work"]["replicated_steps"] == got["work"]["replicated_queries"] == NEW
    sharded = sum(r[f"{kind}-{mesh_name}-{length}"]["work"]["sharded_queries"]
                  for r in tf_results)
    assert sharded == length - 1


@pytest.mark.parametrize("mesh_name", TF_MESHES)
@pytest.mark.parametrize("kind", MODELS)
def test_generate_sampling_same_on_every_rank(tf_results, tf_references, kind, mesh_name):
    first = tf_results[0][f"{kind}-{mesh_name}"]["sampled"]
    for r in tf_results:
        assert torch.equal(r[f"{kind}-{mesh_name}"]["sampled"], first)
    # and the same draws as one process with the same seed (the logits agree to ~1e-15)
    assert torch.equal(first, tf_references[kind]["sampled"])
    assert not torch.equal(first, tf_references[kind]["greedy"]), "sampling did not sample"


@pytest.mark.parametrize("mesh_name", TF_MESHES)
def test_generate_continuations_and_chunked_prefill(tf_results, tf_references, mesh_name):
    ref = tf_references["turns"]
    for r in tf_results:
        got = r[f"turns-{mesh_name}"]
        for turn in ("first", "second", "third"):
            assert torch.equal(got[turn], ref[turn]), turn
        assert torch.equal(got["chunked"], ref["first"])
        assert got["chunked_cache_type"] == "ShardedCache"
        assert got["chunked_cache_len"] == PROMPT + NEW - 1


@pytest.mark.parametrize("mesh_name", TF_MESHES)
def test_generate_cache_is_sharded(tf_results, mesh_name):
    """After a first turn the cache holds PROMPT + NEW - 1 tokens (the last generated token is
    never fed back), each on one rank, about 1/P per rank; no rank allocates a full cache."""
    cached = PROMPT + NEW - 1
    kv_heads, head_dim, layers, batch = MODELS["llama"], 16, 2, 2
    full_bytes = 2 * layers * batch * cached * kv_heads * head_dim * 8
    counts = tf_results[0][f"turns-{mesh_name}"]["counts"]
    assert sum(c for row in counts for c in row) == cached
    for r in tf_results:
        got = r[f"turns-{mesh_name}"]
        assert got["counts"] == counts
        assert abs(got["local"] - cached / WORLD) <= 2 * WORLD
        assert got["nbytes"] < full_bytes / 2, (got["nbytes"], full_bytes)


@pytest.mark.parametrize("what,exc,words", [
    ("short_prompt", "ValueError", "at least 5 tokens"),
    ("other_mesh", "ValueError", "another mesh"),
    ("left_padding", "ValueError", "left padding"),
    ("beams", "ValueError", "num_beams=1"),
    ("unknown_kwarg", "ValueError", "assistant_model"),
    ("window", "NotImplementedError", "sliding window (8 tokens)"),
    ("bad_strategy", "ValueError", "strategy"),
    ("chunk_too_small", "ValueError", "prefill_chunk_size"),
    ("not_a_cache", "ValueError", "ShardedCache"),
    ("wrong_continuation", "ValueError", "must start with"),
])
def test_generate_refuses_before_communicating(tf_results, what, exc, words):
    assert_refused(tf_results, what, exc, words)
    for r in tf_results:
        assert r["refusals"]["attn_implementation_kept"] == "sdpa"
        assert r["refusals"]["good_after_errors"] == PROMPT + 2


@pytest.mark.parametrize("what,exc,words", [
    ("max_new_tokens", "ValueError", ["'generation_config'", "dtf.generate", "max_new_tokens"]),
    ("seed", "ValueError", ["'sampling_rng'", "dtf.generate"]),
    ("logits", "RuntimeError", ["generated different tokens", f"after {PROMPT + 3} tokens"]),
])
def test_generate_disagreements_raise_on_every_rank(tf_results, what, exc, words):
    """A rank generating differently raises the same error on every rank (none waits the
    timeout, none aborts), and the mesh generates correctly afterwards."""
    for r in tf_results:
        got = r["disagreements"][what]
        assert got is not None and got[0] == exc, (what, got)
        for w in words:
            assert w in got[1], (what, w, got[1])
        assert r["disagreements"]["good_after"] == PROMPT + 2
