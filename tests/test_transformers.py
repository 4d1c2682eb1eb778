"""transformers integration on a real gloo world of 4 CPU processes.

Tiny Llama (MHA) and Qwen2 (GQA, biased projections) models from transformers' own modelling
code, fp32, sequence-parallel as ring 4, Ulysses 2 x ring 2 and Ulysses 4, zigzag and
contiguous, rematerialization-aware checkpointing off and on. After one step, the loss (on
every rank), the logits and every parameter gradient summed over the SP group must match an
independent single-process model (eager attention, transformers' own loss on the full
sequence, computed in the pytest process) to 1e-5 relative. One spawned world runs every case.
"""
import io

import pytest
import torch

from spawn import run_world

pytest.importorskip("transformers")

WORLD = 4
BATCH, SEQ, VOCAB = 2, 32, 101
MESHES = {"ring4": 1, "ulysses2xring2": 2, "ulysses4": 4}   # name -> ulysses degree
LAYOUTS = ("zigzag", "contiguous")
MODELS = ("llama", "qwen2")
CASES = [(m, mesh, layout, ckpt) for m in MODELS for mesh in MESHES for layout in LAYOUTS
         for ckpt in (False, True)]
TOL = 1e-5


def case_id(case):
    model, mesh, layout, ckpt = case
    return f"{model}-{mesh}-{layout}-{'remat' if ckpt else 'plain'}"


def build_model(kind, **overrides):
    """The same tiny model (same weights) in every process."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=4 * SEQ,
                  tie_word_embeddings=False)
    common.update(overrides)
    if kind == "llama":
        cfg, cls = LlamaConfig(num_key_value_heads=4, **common), LlamaForCausalLM
    else:
        cfg, cls = Qwen2Config(num_key_value_heads=2, **common), Qwen2ForCausalLM
    torch.manual_seed(0)
    model = cls(cfg).float()
    model.train()
    return model


def make_batch():
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels = ids.clone()
    labels[0, 5:9] = -100      # ignored tokens inside a sequence ...
    labels[1, -3:] = -100      # ... and at its end
    return ids, labels


def _error(fn):
    try:
        fn()
    except Exception as exc:  # returned to the parent, which asserts type and message
        return type(exc).__name__, str(exc)
    return None


def _refusals(mesh, ids, dtf):
    """What the integration must refuse, each before any communication."""
    name = "distattn_refusals"
    dtf.register(mesh, layout="zigzag", name=name)
    local = dtf.shard_batch({"input_ids": ids}, mesh, layout="zigzag")
    inputs = dict(input_ids=local["input_ids"], position_ids=local["position_ids"],
                  use_cache=False)
    pad = torch.ones_like(local["input_ids"])
    pad[0, 0] = 0

    def run(model, **extra):
        model.set_attn_implementation(name)
        model(**inputs, **extra)

    def run_full(model):          # every rank passes the whole, unsharded batch
        model.set_attn_implementation(name)
        model(input_ids=ids, use_cache=False)

    def generate(model):          # model.generate instead of dtf.generate
        model.set_attn_implementation(name)
        model.eval().generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2)

    return {
        "padding": _error(lambda: run(build_model("llama"), attention_mask=pad)),
        "mask4d": _error(lambda: run(build_model("llama"), attention_mask=torch.zeros(
            BATCH, 1, pad.shape[1], pad.shape[1]))),
        "dropout": _error(lambda: run(build_model("llama", attention_dropout=0.1))),
        "output_attentions": _error(lambda: run(build_model("llama"), output_attentions=True)),
        "builtin_name": _error(lambda: dtf.register(mesh, name="sdpa")),
        "bad_layout": _error(lambda: dtf.register(mesh, layout="diagonal")),
        "bad_schedule": _error(lambda: dtf.register(mesh, schedule="fastest")),
        "seq_len": _error(lambda: dtf.shard_batch({"input_ids": ids[:, :SEQ - 2]}, mesh)),
        "padded_batch": _error(lambda: dtf.shard_batch(
            {"input_ids": ids, "attention_mask": torch.zeros_like(ids)}, mesh)),
        "unknown_key": _error(lambda: dtf.shard_batch({"input_ids": ids, "pixel_values": ids},
                                                      mesh)),
        "unsharded": _error(lambda: run_full(build_model("llama"))),
        "plain_generate": _error(lambda: generate(build_model("llama"))),
        "loss_shapes": _error(lambda: dtf.sp_loss(torch.zeros(BATCH, 3, VOCAB),
                                                  torch.zeros(BATCH, 4, dtype=torch.long),
                                                  mesh)),
    }


def sp_train_step(model, mesh, layout, batch, ckpt, name):
    """One distattn training step of ``model`` on ``batch`` (registered as ``name``): returns
    (local shard, output, loss, parameter gradients summed over the world = the SP group)."""
    import torch.distributed as dist
    from distattn.integrations import transformers as dtf

    model.set_attn_implementation(dtf.register(mesh, layout=layout, name=name))
    if ckpt:
        dtf.checkpoint_layers(model)
    local = dtf.shard_batch(batch, mesh, layout=layout)
    out = model(**{k: v for k, v in local.items() if k != "shift_labels"}, use_cache=False)
    loss = dtf.sp_loss(out.logits, local["shift_labels"], mesh)
    loss.backward()
    grads = {}
    for pname, p in model.named_parameters():
        g = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(g)
        grads[pname] = g
    return local, out, loss, grads


def run_cases(rank, world):
    import distattn
    from distattn.integrations import transformers as dtf

    ids, labels = make_batch()
    meshes = {name: distattn.SPMesh.build(ulysses_degree=u) for name, u in MESHES.items()}
    results = {}
    for case in CASES:
        kind, mesh_name, layout, ckpt = case
        mesh = meshes[mesh_name]
        local, out, loss, grads = sp_train_step(
            build_model(kind), mesh, layout, {"input_ids": ids, "labels": labels}, ckpt,
            f"distattn_{mesh_name}_{layout}")
        results[case_id(case)] = {
            "loss": loss.detach().clone(),
            "logits": distattn.unshard(out.logits.detach(), mesh, dim=1, layout=layout),
            "grads": grads if rank == 0 else None,
            "local": {k: v.clone() for k, v in local.items()},
            "full": {"positions": distattn.unshard(local["position_ids"], mesh, dim=1,
                                                   layout=layout),
                     "shift_labels": distattn.unshard(local["shift_labels"], mesh, dim=1,
                                                      layout=layout)},
        }
    # An all-ones 2-D attention mask is the same as none.
    mesh = meshes["ulysses2xring2"]
    name = dtf.register(mesh, layout="zigzag", name="distattn_ones_mask")
    model = build_model("qwen2")
    model.set_attn_implementation(name)
    local = dtf.shard_batch({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, mesh)
    with torch.no_grad():
        kw = dict(input_ids=local["input_ids"], position_ids=local["position_ids"],
                  use_cache=False)
        results["ones_mask"] = (model(**kw, attention_mask=torch.ones_like(local["input_ids"]))
                                .logits - model(**kw).logits).abs().max().item()
    results["refusals"] = _refusals(meshes["ring4"], ids, dtf)
    return _to_bytes(results)


def _to_bytes(obj) -> bytes:
    """Tensors cannot cross the result queue after their process exits: send bytes."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _from_bytes(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=False)


@pytest.fixture(scope="module")
def world_results():
    return [_from_bytes(r) for r in run_world(WORLD, run_cases)]


@pytest.fixture(scope="module")
def references():
    """Single-process reference per model: eager attention, the full sequence, and
    transformers' own causal-LM loss (it shifts the labels itself)."""
    ids, labels = make_batch()
    refs = {}
    for kind in MODELS:
        model = build_model(kind)
        model.set_attn_implementation("eager")
        out = model(input_ids=ids, labels=labels, use_cache=False)
        out.loss.backward()
        refs[kind] = {"loss": out.loss.detach(), "logits": out.logits.detach(),
                      "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}
    return refs


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def assert_step_matches(per_rank, ref, grad_tol=None):
    """One SP training step (per rank: loss, unsharded logits; rank 0: gradients summed over
    the group) equals one process ``ref``: the same loss on every rank, loss and logits to
    1e-5 relative, every gradient that is not zero (an expert no token was routed to) to
    ``grad_tol[name]`` (default 1e-4); at least half the parameters compared."""
    for rank, r in enumerate(per_rank):
        assert torch.equal(r["loss"], per_rank[0]["loss"]), f"rank {rank}: another loss"
        assert rel_err(r["loss"], ref["loss"]) <= 1e-5, (r["loss"].item(), ref["loss"].item())
        assert rel_err(r["logits"], ref["logits"]) <= 1e-5, f"rank {rank} logits"
    grads = per_rank[0]["grads"]
    checked = 0
    for pname, g in ref["grads"].items():
        if g.abs().max() == 0:
            continue
        err, tol = rel_err(grads[pname], g), (grad_tol or {}).get(pname, 1e-4)
        assert err <= tol, f"{pname}: relative gradient error {err:.2e} > {tol:.2e}"
        checked += 1
    assert checked >= len(ref["grads"]) // 2


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_one_step_matches_single_process(world_results, references, case):
    ref = references[case[0]]
    per_rank = [r[case_id(case)] for r in world_results]
    losses = [r["loss"] for r in per_rank]
    for rank, loss in enumerate(losses):
        assert torch.equal(loss, losses[0]), f"rank {rank} reports a different loss"
        assert rel_err(loss, ref["loss"]) <= TOL, (loss.item(), ref["loss"].item())
    for rank, r in enumerate(per_rank):
        assert rel_err(r["logits"], ref["logits"]) <= TOL, f"rank {rank} logits"
    grads = per_rank[0]["grads"]
    assert grads.keys() == ref["grads"].keys()
    for pname, g in ref["grads"].items():
        assert g.abs().max() > 0, f"{pname}: reference gradient is zero"
        err = rel_err(grads[pname], g)
        assert err <= TOL, f"{pname}: relative gradient error {err:.2e}"


def test_shard_batch_contract(world_results):
    """Labels are shifted on the full sequence (so shard boundaries lose nothing), -100 where
    there is no next token, and positions are the global token indices."""
    ids, labels = make_batch()
    expected = torch.full_like(labels, -100)
    expected[:, :-1] = labels[:, 1:]
    for case in CASES:
        for r in world_results:
            res = r[case_id(case)]
            assert torch.equal(res["full"]["shift_labels"], expected), case_id(case)
            assert torch.equal(res["full"]["positions"],
                               torch.arange(SEQ).expand(BATCH, -1)), case_id(case)
            local = res["local"]
            assert set(local) == {"input_ids", "position_ids", "shift_labels"}
            n = SEQ // WORLD
            assert all(t.shape == (BATCH, n) for t in local.values())
            assert torch.equal(local["input_ids"],
                               torch.gather(ids, 1, local["position_ids"]))


def test_all_ones_mask_is_accepted(world_results):
    for r in world_results:
        assert r["ones_mask"] == 0.0


@pytest.mark.parametrize("what,exc,words", [
    ("padding", "ValueError", "padding"),
    ("mask4d", "ValueError", "attention_mask"),
    ("dropout", "NotImplementedError", "dropout"),
    ("output_attentions", "NotImplementedError", "output_attentions"),
    ("builtin_name", "ValueError", "'sdpa'"),
    ("bad_layout", "ValueError", "layout"),
    ("bad_schedule", "ValueError", "schedule"),
    ("seq_len", "ValueError", "seq_len=30"),
    ("padded_batch", "ValueError", "padding"),
    ("unknown_key", "ValueError", "pixel_values"),
    ("loss_shapes", "ValueError", "shift_labels"),
    ("unsharded", "ValueError", "dtf.shard_batch"),
    ("plain_generate", "ValueError", "dtf.generate(model, input_ids, mesh)"),
])
def test_refuses_clearly(world_results, what, exc, words):
    for r in world_results:
        got = r["refusals"][what]
        assert got is not None, f"{what} was not refused"
        assert got[0] == exc and words in got[1], got
