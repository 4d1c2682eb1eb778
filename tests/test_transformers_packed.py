"""Packed documents through the transformers integration, on a gloo world of 4 CPU processes.

One row packs documents of varied lengths (1-token documents, a length that divides nothing),
position_ids restarting at 0 at every document and labels -100 at document starts, exactly as
transformers' DataCollatorWithFlattening builds them. Training on it with distattn must equal
training each document on its own in one process (eager attention): the loss to 1e-5 and the
parameter gradients, summed over the SP group, to 1e-4 (fp32). A packed batch without its
document boundaries must raise on every rank, never attend across documents silently.
"""
import pytest
import torch

from spawn import run_world
from test_transformers import _from_bytes, _to_bytes, build_model, rel_err, sp_train_step

pytest.importorskip("transformers")

WORLD, VOCAB = 4, 101
DOC_LENS = (1, 9, 17, 3, 26, 1, 6)        # 63 tokens: divides nothing any layout needs
MESHES = {"ring4": 1, "ulysses2xring2": 2, "ulysses4": 4}
CASES = [  # (model, mesh, layout, rematerialization-aware checkpointing)
    ("llama", "ring4", "zigzag", False), ("llama", "ulysses2xring2", "packed", True),
    ("llama", "ring4", "stripe", False), ("qwen2", "ring4", "packed", False),
    ("qwen2", "ulysses2xring2", "zigzag", True), ("qwen2", "ulysses4", "contiguous", False),
]


def case_id(case):
    model, mesh, layout, ckpt = case
    return f"{model}-{mesh}-{layout}-{'remat' if ckpt else 'plain'}"


def packed_batch():
    """What DataCollatorWithFlattening makes of DOC_LENS documents: one row."""
    g = torch.Generator().manual_seed(99)
    ids = torch.randint(0, VOCAB, (1, sum(DOC_LENS)), generator=g)
    position_ids = torch.cat([torch.arange(n) for n in DOC_LENS]).unsqueeze(0)
    labels = ids.clone()
    starts = torch.tensor((0,) + DOC_LENS).cumsum(0)[:-1]
    labels[0, starts] = -100
    labels[0, 20:23] = -100                 # some ignored tokens inside a document
    return ids, labels, position_ids


def run_cases(rank, world):
    import torch.distributed as dist

    import distattn
    from distattn.integrations import transformers as dtf

    ids, labels, position_ids = packed_batch()
    batch = {"input_ids": ids, "labels": labels, "position_ids": position_ids}
    meshes = {name: distattn.SPMesh.build(ulysses_degree=u) for name, u in MESHES.items()}
    results = {}
    for case in CASES:
        kind, mesh_name, layout, ckpt = case
        local, _, loss, grads = sp_train_step(build_model(kind), meshes[mesh_name], layout,
                                              batch, ckpt,
                                              f"distattn_packed_{mesh_name}_{layout}")
        results[case_id(case)] = {"loss": loss.detach().clone(),
                                  "grads": grads if rank == 0 else None,
                                  "keys": sorted(local),
                                  "cu": local[dtf.CU_SEQLENS_KEY]}
    # Without the boundaries (only input_ids and position_ids passed), every rank raises
    # before communicating; then a good call shows that no rank was left behind.
    mesh = meshes["ring4"]
    name = dtf.register(mesh, layout="zigzag", name="distattn_packed_forgotten")
    model = build_model("llama")
    model.set_attn_implementation(name)
    local = dtf.shard_batch(batch, mesh, layout="zigzag")
    try:
        model(input_ids=local["input_ids"], position_ids=local["position_ids"], use_cache=False)
        results["forgotten"] = None
    except ValueError as exc:
        results["forgotten"] = str(exc)
    model(**{k: v for k, v in local.items() if k != "shift_labels"}, use_cache=False)
    dist.barrier()
    return _to_bytes(results)


@pytest.fixture(scope="module")
def world_results():
    return [_from_bytes(r) for r in run_world(WORLD, run_cases)]


@pytest.fixture(scope="module")
def references():
    """Each document trained on its own in one process: the token-mean loss over all
    documents' labelled tokens, and its gradients."""
    ids, labels, _ = packed_batch()
    refs = {}
    for kind in ("llama", "qwen2"):
        model = build_model(kind)
        model.set_attn_implementation("eager")
        total, count = 0.0, 0
        start = 0
        for n in DOC_LENS:
            doc_ids, doc_labels = ids[:, start:start + n], labels[:, start:start + n]
            start += n
            logits = model(input_ids=doc_ids, use_cache=False).logits[0, :-1]
            target = doc_labels[0, 1:]
            total = total + torch.nn.functional.cross_entropy(
                logits, target, ignore_index=-100, reduction="sum")
            count += int((target != -100).sum())
        loss = total / count
        loss.backward()
        refs[kind] = {"loss": loss.detach(),
                      "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}
    return refs


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_packed_training_equals_per_document_training(world_results, references, case):
    ref = references[case[0]]
    per_rank = [r[case_id(case)] for r in world_results]
    for rank, r in enumerate(per_rank):
        assert torch.equal(r["loss"], per_rank[0]["loss"]), f"rank {rank}: another loss"
        assert rel_err(r["loss"], ref["loss"]) <= 1e-5, (r["loss"].item(), ref["loss"].item())
        assert r["cu"] == tuple(torch.tensor((0,) + DOC_LENS).cumsum(0).tolist())
        assert "distattn_cu_seqlens" in r["keys"]
    grads = per_rank[0]["grads"]
    for pname, g in ref["grads"].items():
        assert g.abs().max() > 0, f"{pname}: reference gradient is zero"
        err = rel_err(grads[pname], g)
        assert err <= 1e-4, f"{pname}: relative gradient error {err:.2e}"


def test_forgotten_boundaries_raise_on_every_rank(world_results):
    for r in world_results:
        assert r["forgotten"] is not None, "a packed batch without boundaries ran"
        assert "distattn_cu_seqlens" in r["forgotten"]


def test_shard_batch_packed_errors():
    """Refused before any communication (no process group needed for these)."""
    from distattn.integrations import transformers as dtf
    from distattn.mesh import SPMesh

    mesh = SPMesh(1, 2, 0, 0, None, None, (0,), (0, 1))
    ids, labels, pos = packed_batch()
    with pytest.raises(ValueError, match="batch 1"):
        dtf.shard_batch({"input_ids": ids.expand(2, -1), "position_ids": pos.expand(2, -1)},
                        mesh, layout="zigzag")
    with pytest.raises(ValueError, match="layout='packed'"):
        dtf.shard_batch({"input_ids": ids}, mesh, layout="packed")
    local = dtf.shard_batch({"input_ids": ids, "labels": labels, "position_ids": pos}, mesh,
                            layout="packed")
    # the label of each document's last token is ignored, and so is every padding slot
    assert (local["shift_labels"] == -100).sum() >= len(DOC_LENS)


def test_shard_batch_takes_the_flattening_collators_boundaries():
    """DataCollatorWithFlattening's return_flash_attn_kwargs / return_seq_idx outputs carry
    the same boundaries as its position ids: accepted, checked, and sharded the same way."""
    from transformers import DataCollatorWithFlattening

    from distattn.integrations import transformers as dtf
    from distattn.mesh import SPMesh

    mesh = SPMesh(1, 2, 0, 0, None, None, (0,), (0, 1))
    ids, _, _ = packed_batch()
    docs, start = [], 0
    for n in DOC_LENS:
        docs.append({"input_ids": ids[0, start:start + n].tolist()})
        start += n
    plain = DataCollatorWithFlattening(return_tensors="pt")(docs)
    full = DataCollatorWithFlattening(return_tensors="pt", return_flash_attn_kwargs=True,
                                      return_seq_idx=True)(docs)
    assert {"cu_seq_lens_q", "seq_idx"} <= set(full)
    want = dtf.shard_batch(dict(plain), mesh, layout="packed")
    got = dtf.shard_batch(dict(full), mesh, layout="packed")
    assert set(got) == set(want)
    for key in want:
        same = (torch.equal(got[key], want[key]) if isinstance(want[key], torch.Tensor)
                else got[key] == want[key])
        assert same, key
    assert want[dtf.CU_SEQLENS_KEY] == tuple(torch.tensor((0,) + DOC_LENS).cumsum(0).tolist())
    # boundaries alone (no position ids) give the same documents
    alone = {k: v for k, v in full.items() if k != "position_ids"}
    assert dtf.shard_batch(alone, mesh, layout="packed")[dtf.CU_SEQLENS_KEY] == \
        want[dtf.CU_SEQLENS_KEY]
    # and contradicting ones are refused
    bad = dict(full)
    bad["cu_seq_lens_q"] = bad["cu_seq_lens_k"] = torch.tensor([0, 5, sum(DOC_LENS)],
                                                               dtype=torch.int32)
    with pytest.raises(ValueError, match="differ|disagree"):
        dtf.shard_batch(bad, mesh, layout="packed")
