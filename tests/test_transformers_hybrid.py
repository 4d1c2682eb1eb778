"""Hybrid models (Mamba / Mamba2, Gated DeltaNet, lightning attention, short convolutions)
through the transformers integration, on a gloo world of 4 CPU processes: after
``dtf.prepare(model)`` their sequence mixers run gathered over the SP group
(``distattn.integrations.mixers``), and one training step (ring 4 zigzag; Ulysses 2 x ring 2
contiguous with rematerialization-aware checkpointing) must match one-process eager training:
loss and logits to 1e-5, every parameter gradient summed over the SP group to 1e-4, in fp32.
Qwen3-Next runs in fp64, but its Gated DeltaNet computes in fp32 whatever the model's dtype
(transformers' torch_chunk_gated_delta_rule casts), so its gradients carry fp32 rounding: each
is held to 1e-4 or 8 x the one-process difference between an fp32 and an fp64 model, whichever
is larger (the SP sum adds up P backward passes' rounding).
Without ``dtf.prepare`` the same models are refused on every rank, naming the way out.
"""
import warnings

import pytest
import torch

from spawn import run_world
from test_transformers import (_from_bytes, _to_bytes, assert_step_matches, rel_err,
                               sp_train_step)
from test_transformers_variants import VOCAB, make_batch

pytest.importorskip("transformers")

WORLD = 4
FAMILIES = ("lfm2", "bamba", "granitemoehybrid", "nemotron_h", "falcon_h1", "jamba",
            "qwen3_next", "minimax")
# zigzag: the mixers run gathered; contiguous: state passing (PASSING_FAMILIES, transformers
# >= PASSING_SINCE; gathered otherwise), plain and with rematerialization
MESHES = (("ring4", "zigzag", False), ("ring4", "contiguous", False),
          ("ulysses2xring2", "contiguous", True))
CASES = [(family, mesh, layout, ckpt) for family in FAMILIES for mesh, layout, ckpt in MESHES]
# One row packing documents (DataCollatorWithFlattening style): each document's state must
# reset at its start. Contiguous on ring 4: documents continue across ranks 1, 2 and 3
# (state passing), also on Ulysses 2 x ring 2 with rematerialization; zigzag: gathered.
DOC_LENS = (5, 1, 12, 3, 11)         # 32 tokens
PACKED_MESHES = (("ring4", "contiguous", False), ("ulysses2xring2", "contiguous", True),
                 ("ulysses2xring2", "zigzag", True))
PACKED = [(family, mesh, layout, ckpt) for family in FAMILIES
          for mesh, layout, ckpt in PACKED_MESHES]
DTYPES = {"qwen3_next": torch.float64}      # default: float32


def case_id(case, packed=False):
    family, mesh, layout, ckpt = case
    return f"{family}-{mesh}-{layout}-{'remat' if ckpt else 'plain'}{'-packed' if packed else ''}"


def packed_batch():
    """DOC_LENS documents in one row: position_ids restart at every document, labels -100 at
    document starts (what DataCollatorWithFlattening makes)."""
    g = torch.Generator().manual_seed(77)
    ids = torch.randint(0, VOCAB, (1, sum(DOC_LENS)), generator=g)
    position_ids = torch.cat([torch.arange(n) for n in DOC_LENS]).unsqueeze(0)
    labels = ids.clone()
    labels[0, torch.tensor((0,) + DOC_LENS).cumsum(0)[:-1]] = -100
    return ids, labels, position_ids


def _config(family):
    """A tiny config of ``family`` (mixer layer first, then attention), or None where the
    installed transformers lacks it."""
    import transformers as tf
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=False)
    mamba2 = dict(mamba_n_heads=4, mamba_d_head=32, mamba_d_state=8, mamba_chunk_size=8,
                  mamba_n_groups=1)
    linear_first = ["linear_attention", "full_attention"]
    builders = {
        "lfm2": lambda: tf.Lfm2Config(**{**common, "layer_types": ["conv", "full_attention"]},
                                      conv_L_cache=3),
        "bamba": lambda: tf.BambaConfig(**common, attn_layer_indices=[1], **mamba2),
        "granitemoehybrid": lambda: tf.GraniteMoeHybridConfig(
            **common, layer_types=["mamba", "attention"], num_local_experts=2,
            num_experts_per_tok=1, **mamba2),
        "nemotron_h": lambda: tf.NemotronHConfig(
            **{**common, "num_hidden_layers": 3}, hybrid_override_pattern="M*-",
            mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=8, chunk_size=8, n_groups=1),
        "falcon_h1": lambda: tf.FalconH1Config(**common, mamba_d_ssm=128, **mamba2),
        "jamba": lambda: tf.JambaConfig(
            **common, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
            expert_layer_offset=1, num_experts=2, num_experts_per_tok=1, mamba_d_state=8,
            mamba_d_conv=4, mamba_expand=2,
            use_mamba_kernels=False),     # 4.57 raises on CPU without it (5.x ignores it)
        "qwen3_next": lambda: tf.Qwen3NextConfig(
            **common, layer_types=linear_first, head_dim=16, linear_num_value_heads=4,
            linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
            linear_conv_kernel_dim=4, num_experts=4, num_experts_per_tok=2,
            moe_intermediate_size=32, shared_expert_intermediate_size=32),
        "minimax": lambda: tf.MiniMaxConfig(**common, layer_types=linear_first, head_dim=16,
                                            num_local_experts=4, num_experts_per_tok=2,
                                            block_size=8),
    }
    try:
        return builders[family]()
    except AttributeError:      # the family is newer than the installed transformers
        return None


def build_model(family, dtype=None):
    import transformers as tf
    config = _config(family)
    if config is None:
        return None
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tf.AutoModelForCausalLM.from_config(config).to(
            dtype or DTYPES.get(family, torch.float32))
    if model.dtype == torch.float64 and hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")      # grouped_mm has no float64
    model.train()
    return model


def _error(fn):
    try:
        fn()
    except Exception as exc:   # the parent asserts on the type and the message
        return type(exc).__name__, str(exc)
    return None


def run_cases(rank, world):
    import distattn
    from distattn.integrations import transformers as dtf
    from distattn.integrations.mixers import mixer_forms

    ids, labels = make_batch()
    batch = {"input_ids": ids, "labels": labels}
    meshes = {"ring4": distattn.SPMesh.build(ulysses_degree=1),
              "ulysses2xring2": distattn.SPMesh.build(ulysses_degree=2)}
    results = {}
    for family in FAMILIES:
        model = build_model(family)
        if model is None:
            continue
        # refused without dtf.prepare: on every rank, before any attention collective
        results[f"{family}-unprepared"] = _error(lambda: sp_train_step(
            model, meshes["ring4"], "zigzag", batch, False, "distattn_hybrid_unprepared"))
    for case in CASES:
        family, mesh_name, layout, ckpt = case
        model = build_model(family)
        if model is None:
            continue
        refused = _error(lambda: dtf.prepare(model))
        if refused is not None:          # transformers 4.x for some families (see below)
            results[case_id(case)] = {"refused": refused}
            continue
        mesh = meshes[mesh_name]
        _, out, loss, grads = sp_train_step(model, mesh, layout, batch, ckpt,
                                            f"distattn_hybrid_{mesh_name}_{layout}")
        results[case_id(case)] = {
            "loss": loss.detach().clone(),
            "logits": distattn.unshard(out.logits.detach(), mesh, dim=1, layout=layout),
            "grads": grads if rank == 0 else None,
            "forms": mixer_forms(model)}
    ids, labels, position_ids = packed_batch()
    batch = {"input_ids": ids, "labels": labels, "position_ids": position_ids}
    for case in PACKED:
        family, mesh_name, layout, ckpt = case
        model = build_model(family)
        if model is None or _error(lambda: dtf.prepare(model)) is not None:
            continue
        mesh = meshes[mesh_name]
        _, out, loss, grads = sp_train_step(model, mesh, layout, batch, ckpt,
                                            f"distattn_hybrid_{mesh_name}_{layout}")
        results[case_id(case, True)] = {"loss": loss.detach().clone(),
                                        "grads": grads if rank == 0 else None,
                                        "forms": mixer_forms(model)}
    return _to_bytes(results)


@pytest.fixture(scope="module")
def world_results():
    return [_from_bytes(r) for r in run_world(WORLD, run_cases)]


def _one_process(family, dtype=None):
    ids, labels = make_batch()
    model = build_model(family, dtype)
    model.set_attn_implementation("eager")
    out = model(input_ids=ids, labels=labels, use_cache=False)
    out.loss.backward()
    return {"loss": out.loss.detach(), "logits": out.logits.detach(),
            "grads": {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
                      for n, p in model.named_parameters()}}


@pytest.fixture(scope="module")
def references():
    from distattn.integrations.mixers import version_error
    refs = {}
    for family in FAMILIES:
        if _config(family) is None or version_error(family) is not None:
            continue
        refs[family] = _one_process(family)
        tol = {n: 1e-4 for n in refs[family]["grads"]}
        if family in DTYPES:        # the model's own fp32 rounding (see the module docstring)
            fp32 = _one_process(family, torch.float32)["grads"]
            for n, g in refs[family]["grads"].items():
                if g.abs().max() > 0:
                    tol[n] = max(1e-4, 8 * rel_err(fp32[n].to(g.dtype), g))
        refs[family]["tol"] = tol
    return refs


@pytest.mark.parametrize("family", FAMILIES)
def test_hybrid_refused_without_prepare(world_results, family):
    if f"{family}-unprepared" not in world_results[0]:
        pytest.skip(f"{family} is not in this transformers")
    for rank, r in enumerate(world_results):
        got = r[f"{family}-unprepared"]
        assert got is not None, f"rank {rank}: {family} trained without dtf.prepare"
        assert got[0] == "UnsupportedModelError", (rank, got)
        assert "dtf.prepare(model)" in got[1], got[1]


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_hybrid_models_match_single_process(world_results, references, case):
    from distattn.integrations.mixers import version_error
    if version_error(case[0]) is not None and case_id(case) in world_results[0]:
        for r in world_results:      # refused by dtf.prepare on every rank, naming why
            assert r[case_id(case)]["refused"] == ("UnsupportedModelError",
                                                   version_error(case[0])), r[case_id(case)]
        pytest.skip(version_error(case[0]))
    if case[0] not in references:
        pytest.skip(f"{case[0]} is not in this transformers")
    ref = references[case[0]]
    got = [r[case_id(case)] for r in world_results]
    assert_step_matches([{k: v for k, v in g.items() if k != "forms"} for g in got], ref,
                        ref["tol"])
    assert_forms(case, got)


def _per_document(family, dtype=None):
    """Each packed document trained on its own in one process: the token-mean loss over
    all documents' labelled tokens, and its gradients."""
    ids, labels, _ = packed_batch()
    model = build_model(family, dtype)
    model.set_attn_implementation("eager")
    total, count, start = 0.0, 0, 0
    for n in DOC_LENS:
        logits = model(input_ids=ids[:, start:start + n], use_cache=False).logits[0, :-1]
        target = labels[0, start + 1:start + n]
        start += n
        total = total + torch.nn.functional.cross_entropy(logits, target, ignore_index=-100,
                                                          reduction="sum")
        count += int((target != -100).sum())
    loss = total / count
    loss.backward()
    return {"loss": loss.detach(),
            "grads": {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
                      for n, p in model.named_parameters()}}


@pytest.mark.parametrize("case", PACKED, ids=[case_id(c, True) for c in PACKED])
def test_packed_hybrid_equals_per_document_training(world_results, references, case):
    if case_id(case, True) not in world_results[0]:
        pytest.skip(f"{case[0]}: not in this transformers, or refused by dtf.prepare")
    ref = _per_document(case[0])
    tol = references[case[0]]["tol"]
    got = [r[case_id(case, True)] for r in world_results]
    for rank, r in enumerate(got):
        assert torch.equal(r["loss"], got[0]["loss"]), f"rank {rank}: another loss"
        assert rel_err(r["loss"], ref["loss"]) <= 1e-5, (r["loss"].item(), ref["loss"].item())
    checked = 0
    for pname, g in ref["grads"].items():
        if g.abs().max() == 0:
            continue
        err = rel_err(got[0]["grads"][pname], g)
        assert err <= tol[pname], f"{pname}: relative gradient error {err:.2e}"
        checked += 1
    assert checked >= len(ref["grads"]) // 2
    assert_forms(case, got)


def expected_form(case):
    """The form the case's mixers must have run in (see mixers.passing_mode)."""
    from distattn.integrations import hf
    from distattn.integrations.mixers import PASSING_FAMILIES, PASSING_SINCE
    family, _, layout, _ = case
    if layout == "contiguous" and family in PASSING_FAMILIES and hf.version() >= PASSING_SINCE:
        return f"passing ({PASSING_FAMILIES[family]})"
    return "gathered"


def assert_forms(case, got):
    want = expected_form(case)
    for rank, g in enumerate(got):
        assert g["forms"] and set(g["forms"].values()) == {want}, (rank, want, g["forms"])
