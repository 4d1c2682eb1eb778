"""The model zoo (issue 17): every causal-LM family of the installed transformers, built tiny
(tests/zoo_cases.py), either trains exactly under sequence parallelism or is refused on every
rank before any communication, naming the layer or feature and the way out.

One spawned world of 4 gloo processes runs every family on two meshes -- ring 4 with the
zigzag layout, and Ulysses 2 x ring 2 (USP) with the contiguous layout -- one fp32 training
step through ``dtf.register`` / ``dtf.shard_batch`` / ``dtf.sp_loss``. Each family's
one-process reference (eager attention on the full sequence, transformers' own loss) is
computed in the world as well, by one rank (round robin), without any distributed call.

- exact: no rank refuses, every rank reports the same loss, within 1e-5 (relative) of the
  reference, and every parameter gradient summed over the SP group is within 1e-4 of the
  reference's (max abs difference / max abs reference value);
- refused: every rank raises ``UnsupportedModelError`` with the same message and the way
  out, in the forward (the mask or attention function, before their first collective),
  naming the family's mixer layer (``zoo_cases.MIXER_REFUSALS``) or the family
  (``FAMILY_REFUSAL``); or in ``sp_loss`` (before its all-reduce) for models whose attention
  never reaches distattn. ``dtf.prepare(model)`` must name the family or mixer for all.
- a model that under SP fails in its own code on some ranks (seen at 4.57: a RoPE table
  sized to the local length, indexed with global positions) must still stop every rank
  before any communication, the others refused by ``sp_loss``;
- a family whose tiny model does not build, or fails on one process too, is not trained:
  its default config must be refused by the guard.

Expected exact are the families whose ``config.model_type`` the zoo lists
(``zoo_cases.EXPECTED_EXACT``), which must be the guard's allow-list. ``DISTATTN_ZOO_TABLE=path`` writes
the measured table (markdown) to ``path`` (docs/TRAINING.md, "Model zoo");
``DISTATTN_ZOO_ONLY=llama,bloom`` runs only those families. ``DISTATTN_ZOO_PROBE=1`` lifts the
allow-list in the world (every other check of the guard stays) and measures every family that
only the allow-list refuses: the table then shows which are exact, the evidence for extending
``EXACT_FAMILIES``; the tests of refusals by the allow-list are skipped in that mode.
"""
import io
import os
import re
import warnings

import pytest
import torch

from spawn import run_world

pytest.importorskip("transformers")
import zoo_cases as zc  # noqa: E402

WORLD = 4
MESHES = {"ring4-zigzag": (1, "zigzag"), "usp2x2-contiguous": (2, "contiguous")}
GATHERED = "gathered "           # result key prefix: the step after dtf.prepare (hybrids)
LOSS_TOL, GRAD_TOL = 1e-5, 1e-4
# DISTATTN_ZOO_ONLY=llama,bloom runs those families only (while debugging one).
FAMILIES = [f for f in zc.families() if f in os.environ.get("DISTATTN_ZOO_ONLY", f).split(",")]
PROBE = os.environ.get("DISTATTN_ZOO_PROBE") == "1"


# --------------------------------------------------------------------------------------------
# in the world
# --------------------------------------------------------------------------------------------
def _reference(model, batch):
    """One eager step on one process: transformers' own causal-LM loss on the full batch."""
    model.set_attn_implementation("eager")
    out = model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False)
    out.loss.backward()
    grads = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
             for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return {"loss": out.loss.item(), "grads": grads}


def _eager_error(model, batch):
    """The error of one eager step on one process (the tiny model itself broken), or None."""
    try:
        _reference(model, batch)
    except Exception as exc:   # returned to the parent
        return f"{type(exc).__name__}: {exc}"
    return None


def _sp_step(model, mesh, layout, attn, batch, rank, **model_kwargs):
    """One SP training step; returns the loss and (rank 0) the gradients summed over the
    world, or the refusal: (exception type, message, stage)."""
    import torch.distributed as dist

    from distattn.integrations import transformers as dtf
    model.zero_grad(set_to_none=True)
    stage = "set_attn_implementation"
    try:
        model.set_attn_implementation(attn)
        stage = "shard_batch"
        local = dtf.shard_batch(batch, mesh, layout=layout)
        stage = "forward"
        out = model(**{k: v for k, v in local.items() if k != "shift_labels"},
                    use_cache=False, **model_kwargs)
        stage = "sp_loss"
        loss = dtf.sp_loss(out.logits, local["shift_labels"], mesh)
        stage = "backward"
        loss.backward()
    except Exception as exc:   # returned to the parent, which asserts what it must be
        return {"refused": (type(exc).__name__, str(exc), stage)}
    names = [n for n, _ in model.named_parameters()]
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                      for p in model.parameters()])
    dist.all_reduce(flat)
    grads = None
    if rank == 0:
        grads, offset = {}, 0
        for n, p in zip(names, model.parameters()):
            grads[n] = flat[offset:offset + p.numel()].view_as(p).clone()
            offset += p.numel()
    return {"loss": loss.item(), "grads": grads}


def _probes(meshes, batch, rank):
    """The guard's gaps, each through the real path on ring 4: an unknown family, an unknown
    layer type, a model left on its own attention, a layer that computes attention itself,
    attention arguments distattn does not run."""
    import copy

    mesh, layout, attn = meshes["ring4-zigzag"]

    def llama(**config_attrs):
        model = zc.build("llama")
        for k, v in config_attrs.items():
            setattr(model.config, k, v)
        return model

    def own_layer():                 # layer 1 keeps eager attention: computes it itself
        model = llama()
        model.set_attn_implementation(attn)
        own = copy.copy(model.config)
        own._attn_implementation = "eager"
        model.model.layers[1].self_attn.config = own
        return model

    step = lambda model, **kw: _sp_step(model, mesh, layout, attn, batch, rank, **kw)
    return {
        "unknown_family": step(llama(model_type="brand_new_family")),
        "unknown_layer_type": step(llama(layer_types=["full_attention", "brand_new_mixer"])),
        "eager_model": _sp_step(llama(), mesh, layout, "eager", batch, rank),
        "own_attention_layer": step(own_layer()),
        "flash_boundaries": step(llama(), cu_seq_lens_q=torch.tensor([0, 32])),
        "unknown_kwarg": step(llama(), brand_new_attention_arg=torch.ones(3)),
        "router_logits": step(zc.build("qwen3_moe"), output_router_logits=True),
    }


def _gathered_families():
    """The hybrid families ``dtf.prepare`` runs with gathered mixers (none before they were
    added to distattn)."""
    try:
        from distattn.integrations.mixers import GATHERED_FAMILIES
    except ImportError:
        return {}
    return GATHERED_FAMILIES


class _AnyFamily:
    """An allow-list holding every family (``DISTATTN_ZOO_PROBE``)."""

    def __contains__(self, model_type):
        return True


def run_zoo(rank, world, families, probe=False):
    import logging

    import distattn
    from distattn.integrations import guard
    from distattn.integrations import transformers as dtf
    if probe:
        guard.EXACT_FAMILIES = _AnyFamily()
    logging.disable(logging.WARNING)   # transformers' warnings for families it cannot switch
    warnings.simplefilter("ignore")
    meshes = {}
    for name, (ulysses, layout) in MESHES.items():
        mesh = distattn.SPMesh.build(ulysses_degree=ulysses)
        meshes[name] = (mesh, layout, dtf.register(mesh, layout=layout,
                                                   name=f"distattn_zoo_{name}"))
    batch = zc.batch()
    results = {}
    for i, family in enumerate(families):
        try:
            model = zc.build(family)
        except zc.Unbuildable as exc:
            results[family] = {"unbuildable": str(exc)}
            continue
        res = {"model_type": model.config.model_type}
        hybrid = model.config.model_type in _gathered_families()
        if rank == i % world and (guard.config_verdict(model.config).error is None or hybrid):
            try:
                res["reference"] = _reference(model, batch)
            except Exception as exc:   # the tiny model fails on one process: "broken"
                res["eager_error"] = f"{type(exc).__name__}: {exc}"
        for name, (mesh, layout, attn) in meshes.items():
            res[name] = _sp_step(model, mesh, layout, attn, batch, rank)
        if "eager_error" not in res and any(
                res[m].get("refused", ("UnsupportedModelError",))[0] != "UnsupportedModelError"
                for m in meshes):   # an error of the model's own: does it fail on one process?
            res["eager_error"] = _eager_error(model, batch)
        try:
            dtf.prepare(model)          # the up-front check: config and module classes
            res["prepare"] = None
        except guard.UnsupportedModelError as exc:
            res["prepare"] = str(exc)
        if hybrid and res["prepare"] is None:   # its mixers now run gathered over the group
            for name, (mesh, layout, attn) in meshes.items():
                res[GATHERED + name] = _sp_step(model, mesh, layout, attn, batch, rank)
        results[family] = res
        del model
    results["_probes"] = _probes(meshes, batch, rank)
    return _to_bytes(results)


def _to_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# in pytest
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def zoo():
    """{family: {"ranks": [per-rank results], "reference": ...}}, plus the table when asked."""
    per_rank = [torch.load(io.BytesIO(r), weights_only=False)
                for r in run_world(WORLD, run_zoo, FAMILIES, PROBE, timeout=900)]
    zoo = {}
    for family in FAMILIES + ["_probes"]:
        ranks = [r[family] for r in per_rank]
        refs = [r["reference"] for r in ranks if isinstance(r, dict) and "reference" in r]
        zoo[family] = {"ranks": ranks, "reference": refs[0] if refs else None}
    path = os.environ.get("DISTATTN_ZOO_TABLE")
    if path:
        with open(path, "w") as f:
            f.write(_table(zoo))
    return zoo


def _errors(ref, got):
    """(relative loss error, worst gradient error, its parameter). A parameter's gradient
    error is max |sp - ref| / max |ref|, relative to the parameter's own gradient; a gradient
    that is zero up to rounding (max |ref| below 1e-3 of the model's largest, e.g. the key
    bias, to which softmax is invariant) is measured against that floor instead."""
    loss_err = abs(got["loss"] - ref["loss"]) / abs(ref["loss"])
    floor = 1e-3 * max(g.abs().max().item() for g in ref["grads"].values())
    worst, where = 0.0, None
    for name, g in ref["grads"].items():
        err = (got["grads"][name] - g).abs().max().item() / max(g.abs().max().item(), floor)
        if err >= worst:
            worst, where = err, name
    return loss_err, worst, where


def _verdict(zoo, family, mesh):
    """What happened to ``family`` on ``mesh``, on all ranks:

    - ("exact", (loss error, gradient error, parameter), per-rank losses): trained on every
      rank (``unchecked`` instead when the guard refuses its config: no reference);
    - ("refused", message, stage): the same UnsupportedModelError on every rank;
    - ("crash", per-rank errors): every rank raised before any communication, some in the
      model's own code (which one process runs fine);
    - ("broken", error) / ("unbuildable", why): the tiny model fails on one process too, or
      does not build;
    - ("mixed", per-rank errors): some ranks trained, some raised."""
    entry = zoo[family]
    ranks = entry["ranks"]
    if "unbuildable" in ranks[0]:
        return ("unbuildable", ranks[0]["unbuildable"])
    eager = [r["eager_error"] for r in ranks if r.get("eager_error")]
    if eager:       # deterministic: one process fails, every process would
        return ("broken", eager[0])
    refused = [r[mesh].get("refused") for r in ranks]
    if not any(refused):
        if entry["reference"] is None:
            return ("unchecked", "ran under SP though the guard refuses its config")
        return ("exact", _errors(entry["reference"], ranks[0][mesh]),
                [r[mesh]["loss"] for r in ranks])
    if not all(refused):
        return ("mixed", refused)
    if all(x == refused[0] for x in refused) and refused[0][0] == "UnsupportedModelError":
        return ("refused", refused[0][1], refused[0][2])
    return ("crash", refused)


def _expected_exact(zoo, family):
    """The zoo expects exactness by the model's config.model_type (an alias such as
    code_llama builds a llama)."""
    return zoo[family]["ranks"][0].get("model_type", family) in zc.EXPECTED_EXACT


def _expected_refusal(family):
    """The regex a refusal in the forward, or by ``dtf.prepare``, must match."""
    return zc.MIXER_REFUSALS.get(family, zc.FAMILY_REFUSAL)


CASES = [(f, m) for f in FAMILIES for m in MESHES]


@pytest.mark.parametrize("family,mesh", CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_exact_or_refused(zoo, family, mesh):
    verdict = _verdict(zoo, family, mesh)
    if PROBE and not _expected_exact(zoo, family):
        pytest.skip("DISTATTN_ZOO_PROBE: measured for the table only")
    if verdict[0] in ("unbuildable", "broken"):
        _check_unbuildable(zoo, family, verdict[1])
    elif _expected_exact(zoo, family):
        assert verdict[0] == "exact", f"{family} must train exactly, got {verdict}"
        (loss_err, grad_err, where), losses = verdict[1], verdict[2]
        assert all(x == losses[0] for x in losses), f"ranks disagree on the loss: {losses}"
        assert loss_err <= LOSS_TOL, f"loss error {loss_err:.2e}"
        assert grad_err <= GRAD_TOL, f"gradient error {grad_err:.2e} in {where}"
    elif verdict[0] == "refused":
        message, stage = verdict[1], verdict[2]
        if stage == "forward":      # the mask or attention function, before its collective
            assert re.search(_expected_refusal(family), message), message
        else:                       # its attention never reached distattn
            assert stage == "sp_loss" and re.search(zc.NEVER_RAN, message), (stage, message)
        assert zc.WAY_OUT in message, message
    else:
        # A model that fails in its own code on some ranks under SP (a RoPE table sized to the
        # local length, indexed with global positions) never reaches distattn: every rank
        # must still stop before any communication, those reaching sp_loss refused there.
        assert verdict[0] == "crash", f"{family} must be refused on every rank: {verdict}"
        for kind, message, stage in verdict[1]:
            assert stage in ("forward", "sp_loss"), (kind, message, stage)
            if stage == "sp_loss":
                assert kind == "UnsupportedModelError" and re.search(zc.NEVER_RAN, message)


HYBRIDS = [(f, m) for f in zc.EXPECTED_GATHERED for m in MESHES]


@pytest.mark.parametrize("family,mesh", HYBRIDS, ids=[f"{f}-{m}" for f, m in HYBRIDS])
def test_hybrid_is_exact_after_prepare(zoo, family, mesh):
    """A hybrid refused on the plain path (above) trains exactly once ``dtf.prepare(model)``
    runs its sequence mixers gathered over the SP group."""
    if family not in zoo:
        pytest.skip(f"{family} is not in the zoo (DISTATTN_ZOO_ONLY or transformers version)")
    ranks = zoo[family]["ranks"]
    if "unbuildable" in ranks[0]:
        pytest.skip(ranks[0]["unbuildable"])
    from distattn.integrations.mixers import version_error
    if version_error(family) is not None:
        # this family's transformers 4.x code builds its own 4-D causal mask: dtf.prepare
        # refuses it on every rank, naming the version, before any communication
        for r in ranks:
            assert r["prepare"] == version_error(family), r["prepare"]
        pytest.xfail(f"{family}: {version_error(family)[:120]}")
    assert ranks[0]["prepare"] is None, ranks[0]["prepare"]
    verdict = _verdict(zoo, family, GATHERED + mesh)
    import transformers
    if verdict[0] != "exact" and int(transformers.__version__.split(".")[0]) < 5:
        # transformers 4.57's hybrid code builds its own 4-D mask or keeps its own attention
        # for some of these families: they must still be refused on every rank, before any
        # communication (tests/test_transformers_hybrid.py fails there as well).
        assert verdict[0] in ("refused", "crash"), verdict
        errors = [(verdict[1], verdict[2])] if verdict[0] == "refused" else \
            [(message, stage) for _, message, stage in verdict[1]]
        assert all(stage in ("forward", "sp_loss") for _, stage in errors), errors
        pytest.xfail(f"{family} at transformers {transformers.__version__}: refused after "
                     f"dtf.prepare: {errors[0][0][:200]}")
    assert verdict[0] == "exact", f"{family} after dtf.prepare: {verdict}"
    (loss_err, grad_err, where), losses = verdict[1], verdict[2]
    assert all(x == losses[0] for x in losses), f"ranks disagree on the loss: {losses}"
    assert loss_err <= LOSS_TOL, f"loss error {loss_err:.2e}"
    assert grad_err <= GRAD_TOL, f"gradient error {grad_err:.2e} in {where}"


def test_the_zoo_expects_exactly_the_gathered_hybrids():
    assert set(_gathered_families()) == set(zc.EXPECTED_GATHERED)


@pytest.mark.parametrize("family", FAMILIES)
def test_prepare_names_what_it_refuses(zoo, family):
    """``dtf.prepare(model)`` passes the families the zoo trains exactly and refuses every
    other one up front, naming the family or its mixer (also where the training step could
    only be refused by ``sp_loss``, which does not see the model)."""
    ranks = zoo[family]["ranks"]
    if "unbuildable" in ranks[0]:
        pytest.skip(ranks[0]["unbuildable"])
    if PROBE:
        pytest.skip("DISTATTN_ZOO_PROBE: the allow-list is lifted")
    messages = [r["prepare"] for r in ranks]
    assert all(m == messages[0] for m in messages)
    from distattn.integrations.mixers import version_error
    if version_error(ranks[0]["model_type"]) is not None:     # a hybrid at transformers 4.x
        assert messages[0] == version_error(ranks[0]["model_type"]), messages[0]
    elif _expected_exact(zoo, family) or ranks[0]["model_type"] in zc.EXPECTED_GATHERED:
        assert messages[0] is None, messages[0]
    else:
        assert messages[0] is not None, f"dtf.prepare accepts {family}"
        assert re.search(_expected_refusal(family), messages[0]), messages[0]
        assert zc.WAY_OUT in messages[0]


def _check_unbuildable(zoo, family, why):
    """A family the zoo cannot build tiny (or whose tiny model fails on one process too): its
    default config must still be refused (unless the zoo expects it exact: then not building
    it is a failure)."""
    assert not _expected_exact(zoo, family), why
    import transformers as tf

    from distattn.integrations import guard
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = tf.AutoConfig.for_model(family)
    except Exception as exc:
        pytest.skip(f"{why}; its default config fails too: {exc}")
    assert guard.config_verdict(config).error is not None, f"{family}'s config is accepted"


def test_the_zoo_expects_exactly_the_allow_list():
    """Every allow-listed family is proven here, and only those are expected exact."""
    from distattn.integrations import guard
    assert set(guard.EXACT_FAMILIES) == set(zc.EXPECTED_EXACT)


@pytest.mark.parametrize("family", zc.REQUIRED)
def test_required_family_is_in_the_zoo(family):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    if family not in CONFIG_MAPPING_NAMES:
        import transformers
        pytest.skip(f"{family} is not in transformers {transformers.__version__}")
    assert family in zc.families()


@pytest.mark.parametrize("probe,needle", [
    ("unknown_family", r"'brand_new_family'.*not in distattn's allow-list"),
    ("unknown_layer_type", r"layer 1 has layer type 'brand_new_mixer', which distattn does "
                           r"not know"),
    ("eager_model", r"never ran distattn's attention function.*set_attn_implementation"),
    ("own_attention_layer", r"layers \[1\] of model family 'llama'.*never ran distattn's "
                            r"attention function"),
])
def test_guard_gaps_are_refused(zoo, probe, needle):
    """A family or layer type transformers adds later, a model left on its own attention, a
    layer computing attention itself: refused on every rank, naming it and the way out."""
    if PROBE:
        pytest.skip("DISTATTN_ZOO_PROBE: the allow-list is lifted")
    runs = [r[probe] for r in zoo["_probes"]["ranks"]]
    assert all(r.get("refused") for r in runs), runs
    assert all(r["refused"] == runs[0]["refused"] for r in runs)
    kind, message, stage = runs[0]["refused"]
    assert kind == "UnsupportedModelError", (kind, message)
    assert re.search(needle, message), message
    assert zc.WAY_OUT in message, message


@pytest.mark.parametrize("probe,needle", [
    ("flash_boundaries", r"cu_seq_lens_q=Tensor of shape \(2,\).*dtf\.shard_batch"),
    ("unknown_kwarg", r"brand_new_attention_arg=Tensor of shape \(3,\), which distattn does "
                      r"not know"),
    ("router_logits", r"router logits.*this rank's tokens only.*output_router_logits=False"),
])
def test_attention_arguments_distattn_does_not_run_are_refused(zoo, probe, needle):
    runs = [r[probe] for r in zoo["_probes"]["ranks"]]
    assert all(r.get("refused") for r in runs), runs
    kind, message, stage = runs[0]["refused"]
    assert (kind, stage) == ("NotImplementedError", "forward"), (kind, message)
    assert re.search(needle, message), message


# --------------------------------------------------------------------------------------------
# the table (docs/TRAINING.md, "Model zoo")
# --------------------------------------------------------------------------------------------
def _reason(family, message, stage):
    if stage == "sp_loss":
        return "its attention never reaches distattn (refused by `sp_loss`)"
    m = re.search(r"layer type '(\w+)'", message)
    if m:
        return f"layer type `{m.group(1)}`"
    if "its config describes" in message:
        return re.search(r"its config describes ([^(]+)", message).group(1).strip()
    if "allow-list" in message:
        return "not in the allow-list"
    return message[:80]


def _table(zoo) -> str:
    import transformers
    meshes = list(MESHES)
    lines = [f"Measured with transformers {transformers.__version__}, torch "
             f"{torch.__version__}, 4 gloo CPU processes, fp32, batch {zc.BATCH} x "
             f"{zc.SEQ} tokens, one training step against one-process eager training "
             f"(`tests/test_zoo.py`; `DISTATTN_ZOO_TABLE=path` regenerates this table). "
             f"Errors: loss |sp - ref| / |ref|; gradient max |sp - ref| / max |ref| over the "
             f"worst parameter.", "",
             "| family | " + " | ".join(meshes) + " |", "|---|" + "---|" * len(meshes)]
    refused, unbuildable = {}, {}
    for family in FAMILIES:
        cells = []
        for mesh in meshes:
            v = _verdict(zoo, family, mesh)
            if v[0] == "exact":
                loss_err, grad_err, _ = v[1]
                ok = loss_err <= LOSS_TOL and grad_err <= GRAD_TOL and len(set(v[2])) == 1
                lifted = "" if _expected_exact(zoo, family) else "allow-list lifted: "
                cells.append(f"{lifted}{'exact' if ok else 'NOT exact'}: loss {loss_err:.1e}, "
                             f"grads {grad_err:.1e}")
            elif v[0] == "refused":
                cells.append(_reason(family, v[1], v[2]))
            elif v[0] in ("unbuildable", "broken"):
                cells.append(None)
                unbuildable[family] = v[1] if v[0] == "unbuildable" else \
                    f"the tiny model fails on one process too: {v[1]}"
            elif v[0] == "crash":
                other = sorted({f"{k}: {m}"[:60] for k, m, st in v[1]
                                if k != "UnsupportedModelError"})
                rest = ", the other ranks refused by `sp_loss`" if len(other) < WORLD and any(
                    k == "UnsupportedModelError" for k, _, _ in v[1]) else ""
                cells.append(f"raises before any communication on every rank ({other[0]}"
                             f"{', ...' if len(other) > 1 else ''}){rest}")
            else:
                cells.append(f"FAILED: {v[0]}")
        if cells[0] is None:
            pass
        elif all(c.startswith(("exact", "FAILED", "allow-list lifted")) for c in cells):
            lines.append(f"| {family} | " + " | ".join(cells) + " |")
        elif len(set(cells)) == 1 and not cells[0].startswith("raises"):
            refused.setdefault(cells[0], []).append(family)
        else:
            lines.append(f"| {family} | " + " | ".join(cells) + " |")
    hybrids = [f for f in FAMILIES if f in zc.EXPECTED_GATHERED
               and "unbuildable" not in zoo[f]["ranks"][0]]
    if hybrids:
        lines += ["", "Hybrids after `dtf.prepare(model)` (refused above without it): their "
                      "sequence mixers run gathered over the SP group on zigzag, by state "
                      "passing on contiguous with transformers >= 5.24 (Jamba: gathered; "
                      "`mixers.passing_mode`):", "",
                  "| family | " + " | ".join(meshes) + " |", "|---|" + "---|" * len(meshes)]
        for family in hybrids:
            cells = []
            for mesh in meshes:
                v = _verdict(zoo, family, GATHERED + mesh)
                if v[0] == "exact":
                    cells.append(f"exact: loss {v[1][0]:.1e}, grads {v[1][1]:.1e}")
                else:
                    message = v[1] if v[0] == "refused" else v[1][0][1]
                    cells.append("refused on every rank: " + (
                        "its attention never reaches distattn (`sp_loss`)"
                        if "never ran" in message else
                        re.sub(r"attn_implementation='[^']*' \(distattn\) ", "", message)[:60]))
            lines.append(f"| {family} | " + " | ".join(cells) + " |")
    lines += ["", "Refused on every rank, on both meshes (the reason the message names):", ""]
    for reason, fams in sorted(refused.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"- {reason} ({len(fams)}): {', '.join(fams)}")
    if unbuildable:
        lines += ["", "Not trained by the zoo: no tiny model (their default configs are refused "
                      "by the guard):", ""]
        for family, why in unbuildable.items():
            why = why.split(": ", 1)[-1].splitlines()[0].rstrip(": ")
            lines.append(f"- {family}: {why[:120]}")
    return "\n".join(lines) + "\n"
