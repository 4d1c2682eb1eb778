"""transformers' Trainer under SP (dtf's SPTrainer and SPDataLoaderAdapter), on 4 gloo ranks.

The world is a (dp=2, sp=2) DeviceMesh; the SP mesh comes from its "sp" dimension. A tiny fp64
Llama trains with the real ``transformers.Trainer`` machinery (accelerate, DDP over all four
processes, SGD, gradient clipping, gradient accumulation), on two data sets:

- unpacked: 8 sequences of 32 tokens (some labels -100), one per device batch, 2 accumulated
  micro-batches per step, Ulysses 2, zigzag;
- packed: 8 documents of varied lengths, 2 per device batch, packed by transformers'
  ``DataCollatorWithFlattening``, ring 2, the ``packed`` layout.

Each rank records which examples every micro-batch held (the first token of every example is
its index). The pytest process then trains an independent one-process model (transformers'
sdpa attention -- its eager attention takes the softmax in float32 --, every example on its
own, the token-mean loss over the step's global batch, the same clipping and SGD) on those
examples: the weight changes must match it to 1e-10 and the losses the Trainer logged on every
rank to 1e-6 (the Trainer sums them in float32; 4.57 also rounds them to 4 decimals), every
rank must end with the same weights, and one epoch must train every example exactly once.
"""
import os
import tempfile

import pytest
import torch

from spawn import run_world
from test_transformers import _from_bytes, _to_bytes, build_model, rel_err

pytest.importorskip("transformers")
pytest.importorskip("accelerate")   # transformers' Trainer needs it

WORLD, VOCAB, LR, MAX_GRAD_NORM = 4, 101, 0.1, 1.0
DTYPE, TOL = torch.float64, 1e-10
LOSS_TOL = 1e-6      # the Trainer accumulates the loss it logs in float32
DOC_LENS = (5, 23, 9, 14, 3, 17, 11, 8)
CASES = {  # name -> (ulysses degree of the sp dimension, layout, packed, batch, accumulation)
    "unpacked": (2, "zigzag", False, 1, 2),
    "packed": (1, "packed", True, 2, 1),
}
STEPS = 2      # one epoch in both cases: 8 examples over 2 dp replicas x 2 micro-batches x 2


def dataset(packed: bool) -> list:
    """Examples as dicts of token lists (4.57's DataCollatorWithFlattening takes lists only);
    example i starts with token i (so a batch says which examples it holds)."""
    g = torch.Generator().manual_seed(7)
    examples = []
    for i, n in enumerate(DOC_LENS if packed else (32,) * 8):
        ids = torch.randint(8, VOCAB, (n,), generator=g)
        ids[0] = i
        labels = ids.clone()
        if not packed and i % 2 == 0:
            labels[5:9] = -100          # ignored tokens inside a sequence
        examples.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    return examples


def run_cases(rank, world):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      OMP_NUM_THREADS="1")     # accelerate reads these (the group exists)
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import DataCollatorWithFlattening, TrainingArguments, default_data_collator

    import distattn
    from distattn.integrations import transformers as dtf
    from distattn.integrations.trainer import SPTrainer

    class RecordingTrainer(SPTrainer):
        """Records, per optimizer step, the examples of every micro-batch (first tokens)."""
        seen: list = []

        def compute_loss(self, model, inputs, *args, **kwargs):
            cu = inputs.get(dtf.CU_SEQLENS_KEY)
            full = distattn.unshard(inputs["input_ids"], self.mesh, dim=1,
                                    layout=self.layout, cu_seqlens=cu)
            starts = cu[:-1] if cu is not None else (0,)
            self.seen.append((self.state.global_step,
                              [int(row[s]) for row in full for s in starts]))
            return super().compute_loss(model, inputs, *args, **kwargs)

    device_mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "sp"))
    results = {"dp_rank": device_mesh.get_local_rank("dp")}
    for case, (ulysses, layout, packed, batch, accumulation) in CASES.items():
        mesh = distattn.SPMesh.from_device_mesh(device_mesh, sp_dim="sp",
                                                ulysses_degree=ulysses)
        model = build_model("llama").to(DTYPE)
        model.set_attn_implementation(dtf.register(mesh, layout=layout, name=f"sp_{case}"))
        args = TrainingArguments(
            output_dir=tempfile.mkdtemp(prefix="distattn_trainer_"), use_cpu=True,
            report_to=[], save_strategy="no", disable_tqdm=True, seed=11, max_steps=STEPS,
            per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
            optim="sgd", learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0,
            max_grad_norm=MAX_GRAD_NORM, logging_steps=1)
        trainer = RecordingTrainer(
            model=model, args=args, train_dataset=dataset(packed), mesh=mesh,
            data_collator=DataCollatorWithFlattening() if packed else default_data_collator)
        trainer.seen = []
        trainer.train()
        results[case] = {
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
            "seen": trainer.seen,
            "weights": {n: p.detach().clone() for n, p in model.named_parameters()},
        }
    # What SPTrainer refuses, at construction.
    from test_transformers import _error
    mesh = distattn.SPMesh.from_device_mesh(device_mesh, sp_dim="sp")
    name = dtf.register(mesh, layout="zigzag", name="sp_refusals")

    def make(attn=name, layout=None, **overrides):
        model = build_model("llama")
        model.set_attn_implementation(attn)
        kw = dict(output_dir=tempfile.mkdtemp(prefix="distattn_trainer_"), use_cpu=True,
                  report_to=[], save_strategy="no", max_steps=1)
        SPTrainer(model=model, args=TrainingArguments(**kw, **overrides), mesh=mesh,
                  layout=layout, train_dataset=dataset(False))

    results["refusals"] = {
        "sdpa_model": _error(lambda: make(attn="sdpa")),
        "other_mesh": _error(lambda: make(attn="sp_unpacked")),
        "layout": _error(lambda: make(layout="contiguous")),
        "per_device_mean": _error(lambda: make(average_tokens_across_devices=False)),
        "label_smoothing": _error(lambda: make(label_smoothing_factor=0.1)),
    }
    return _to_bytes(results)


@pytest.fixture(scope="module")
def world_results():
    return [_from_bytes(r) for r in run_world(WORLD, run_cases)]


def steps_examples(world_results, case):
    """Per optimizer step, the examples of the step's global batch: every dp replica's
    micro-batches (as recorded by its SP rank 0 -- the others must agree)."""
    by_dp = {}
    for r in world_results:
        by_dp.setdefault(r["dp_rank"], []).append(r[case]["seen"])
    steps = {}
    for dp, seen in sorted(by_dp.items()):
        assert all(s == seen[0] for s in seen), f"dp replica {dp}: SP ranks trained on " \
                                                f"different examples"
        for step, examples in seen[0]:
            steps.setdefault(step, []).extend(examples)
    return [steps[s] for s in sorted(steps)]


def one_process_training(case, steps):
    """An independent reference: each example on its own (eager attention), the step's loss
    the mean over every labelled next-token prediction of its examples, clipping and SGD."""
    examples = dataset(CASES[case][2])
    model = build_model("llama").to(DTYPE)
    model.set_attn_implementation("sdpa")   # eager takes its softmax in fp32 even in fp64
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = []
    for step in steps:
        total, count = 0.0, 0
        for i in step:
            ids, labels = (torch.tensor(examples[i][k]) for k in ("input_ids", "labels"))
            logits = model(input_ids=ids[None], use_cache=False).logits[0, :-1]
            total = total + torch.nn.functional.cross_entropy(
                logits, labels[1:], ignore_index=-100, reduction="sum")
            count += int((labels[1:] != -100).sum())
        loss = total / count
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        with torch.no_grad():
            for p in model.parameters():
                p -= LR * p.grad
                p.grad = None
        losses.append(loss.item())
    return losses, initial, {n: p.detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize("case", list(CASES))
def test_trainer_matches_one_process(world_results, case):
    steps = steps_examples(world_results, case)
    assert len(steps) == STEPS
    assert sorted(i for step in steps for i in step) == list(range(8)), \
        f"one epoch must train every example once, got {steps}"
    ref_losses, initial, ref_weights = one_process_training(case, steps)
    import transformers
    rounded = tuple(int(v) for v in transformers.__version__.split(".")[:2]) < (5, 0)
    for rank, r in enumerate(world_results):
        logged = r[case]["losses"]
        assert len(logged) == STEPS, logged
        for got, ref in zip(logged, ref_losses):
            if rounded:     # 4.57 logs round(loss, 4)
                assert abs(got - ref) <= 5e-5 + 1e-6, (rank, logged, ref_losses)
            else:
                assert abs(got - ref) <= LOSS_TOL * abs(ref), (rank, logged, ref_losses)
        for name, w in r[case]["weights"].items():
            assert torch.equal(w, world_results[0][case]["weights"][name]), (rank, name)
    for name, w in world_results[0][case]["weights"].items():
        change, ref_change = w - initial[name], ref_weights[name] - initial[name]
        assert ref_change.abs().max() > 0, f"{name}: the reference did not train it"
        err = rel_err(change, ref_change)
        assert err <= TOL, f"{name}: relative error of the weight change {err:.2e}"


@pytest.mark.parametrize("what,words", [
    ("sdpa_model", "'sdpa' is not distattn's on this mesh"),
    ("other_mesh", "'sp_unpacked' is not distattn's on this mesh"),
    ("layout", "layout='contiguous' differs"),
    ("per_device_mean", "average_tokens_across_devices=False"),
    ("label_smoothing", "label_smoothing_factor"),
])
def test_sp_trainer_refuses_clearly(world_results, what, words):
    for r in world_results:
        got = r["refusals"][what]
        assert got is not None and got[0] == "ValueError" and words in got[1], got
