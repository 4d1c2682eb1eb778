"""dtf.register(..., override=KEY): distattn under transformers' own attention keys.

On a gloo world of 2 CPU processes (a ring of 2, zigzag), a tiny fp32 Llama trains one SP step
under the overridden "flash_attention_2" key (selected with dtf.set_attn_implementation: there
is no flash_attn package here, and transformers refuses the key without it) and under "sdpa"
(no selection at all: a model created without attn_implementation uses sdpa). Both must compute
bit for bit what the "distattn" key computes, and match an independent one-process model (eager
attention, transformers' own loss on the full sequence) to 1e-5. dtf.unregister must put
transformers' own functions back (the same objects), after which sdpa runs one-process again.
"""
import pytest
import torch

from spawn import run_world
from test_transformers import _error, _from_bytes, _to_bytes, build_model, make_batch, rel_err

pytest.importorskip("transformers")

WORLD, TOL = 2, 1e-5
KEYS = ("flash_attention_2", "sdpa")


def train_step(model, mesh, batch):
    """One SP step of ``model`` (attention already selected): loss and gradients summed over
    the SP group (= the world)."""
    import torch.distributed as dist
    from distattn.integrations import transformers as dtf

    local = dtf.shard_batch(batch, mesh, layout="zigzag")
    out = model(**{k: v for k, v in local.items() if k != "shift_labels"}, use_cache=False)
    loss = dtf.sp_loss(out.logits, local["shift_labels"], mesh)
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.detach().clone()
        dist.all_reduce(g)
        grads[name] = g
    return {"loss": loss.detach().clone(), "grads": grads,
            "attn": model.config._attn_implementation}


def run_cases(rank, world):
    import distattn
    from distattn.integrations import transformers as dtf
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    originals = {k: (AttentionInterface()[k], AttentionMaskInterface()[k]) for k in KEYS}
    ids, labels = make_batch()
    batch = {"input_ids": ids, "labels": labels}
    mesh = distattn.SPMesh.build()
    results = {}

    model = build_model("llama")
    model.set_attn_implementation(dtf.register(mesh, layout="zigzag"))
    results["distattn"] = train_step(model, mesh, batch)

    # flash_attention_2: registered twice (the second replaces distattn's function and keeps
    # transformers' original for unregister), selected without transformers' package check.
    dtf.register(mesh, layout="contiguous", override="flash_attention_2")
    key = dtf.register(mesh, layout="zigzag", override="flash_attention_2")
    results["flash_attention_2"] = train_step(
        dtf.set_attn_implementation(build_model("llama"), key), mesh, batch)

    # sdpa: the default of a model created without attn_implementation.
    dtf.register(mesh, layout="zigzag", override="sdpa")
    results["sdpa"] = train_step(build_model("llama"), mesh, batch)

    chunked = build_model("llama")
    chunked.config.layer_types = ["chunked_attention", "full_attention"]
    chunked.config.attention_chunk_size = 8
    results["refusals"] = {
        "flash_chunked": _error(lambda: dtf.set_attn_implementation(chunked, key)),
        "eager": _error(lambda: dtf.register(mesh, override="eager")),
        "flex": _error(lambda: dtf.register(mesh, override="flex_attention")),
        "unknown_key": _error(lambda: dtf.register(mesh, override="my_attention")),
        "name_and_override": _error(lambda: dtf.register(mesh, name="mine", override="sdpa")),
        "builtin_name": _error(lambda: dtf.register(mesh, name="flash_attention_2")),
        "select_unregistered": _error(lambda: dtf.set_attn_implementation(
            build_model("llama"), "flash_attention_3")),
        "unregister_unknown": _error(lambda: dtf.unregister("never_registered")),
    }

    for k in KEYS:
        dtf.unregister(k)
    results["restored"] = {k: (AttentionInterface()[k] is originals[k][0],
                               AttentionMaskInterface()[k] is originals[k][1]) for k in KEYS}
    # After unregister, sdpa is transformers' again: one process, the full sequence, no SP.
    model = build_model("llama")
    with torch.no_grad():
        sdpa = model(input_ids=ids, use_cache=False).logits
        model.set_attn_implementation("eager")
        eager = model(input_ids=ids, use_cache=False).logits
    results["sdpa_after_unregister"] = rel_err(sdpa, eager)
    return _to_bytes(results)


@pytest.fixture(scope="module")
def world_results():
    return [_from_bytes(r) for r in run_world(WORLD, run_cases)]


@pytest.fixture(scope="module")
def reference():
    ids, labels = make_batch()
    model = build_model("llama")
    model.set_attn_implementation("eager")
    out = model(input_ids=ids, labels=labels, use_cache=False)
    out.loss.backward()
    return {"loss": out.loss.detach(),
            "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}


@pytest.mark.parametrize("key", KEYS)
def test_overridden_key_trains_like_distattn_and_one_process(world_results, reference, key):
    for rank, r in enumerate(world_results):
        got, base = r[key], r["distattn"]
        assert got["attn"] == key, f"rank {rank}: the model does not use {key!r}"
        assert torch.equal(got["loss"], base["loss"]), f"rank {rank}: loss differs from distattn"
        assert rel_err(got["loss"], reference["loss"]) <= TOL, (got["loss"], reference["loss"])
        for name, g in reference["grads"].items():
            assert torch.equal(got["grads"][name], base["grads"][name]), (rank, name)
            assert rel_err(got["grads"][name], g) <= TOL, (rank, name)


def test_unregister_restores_transformers_functions(world_results):
    for r in world_results:
        assert r["restored"] == {k: (True, True) for k in KEYS}
        assert r["sdpa_after_unregister"] <= TOL


@pytest.mark.parametrize("what,words", [
    ("eager", "'eager' is never looked up"),
    ("flash_chunked", "has chunked attention layers"),
    ("flex", "'flex_attention'"),
    ("unknown_key", "pass name= instead"),
    ("name_and_override", "not both"),
    ("builtin_name", "override='flash_attention_2'"),
    ("select_unregistered", "not registered by dtf.register"),
    ("unregister_unknown", "'never_registered' was not registered"),
])
def test_refuses_clearly(world_results, what, words):
    for r in world_results:
        got = r["refusals"][what]
        assert got is not None and got[0] == "ValueError" and words in got[1], got
