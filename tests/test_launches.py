"""Kernel launches per ring step outside the attention kernel, counted (not timed) by
bench/host.py's ``step_counts``: rank 0 of a zigzag causal plan, communication stubbed, the
difference between a P=8 and a P=2 plan per step. Views, metadata ops and bare allocations
are not launches (``host.op_kind``). CPU rows run the finite-call path. Fake CUDA rows
(FakeTensorMode) count what a GPU would launch: "finite call" what a call with finite inputs
launches (the default on CUDA, ``DISTATTN_FINITE_CHECK=sync``: one host read per call), the
others the tensor-op non-finite path (a call with a non-finite input, and every call under
torch.compile, CUDA graph capture or ``DISTATTN_FINITE_CHECK=device``).

The budgets are today's counts: a change that adds a launch to a step fails here (lower
them when a change removes some). Issue 20's target is <= 8 outside the attention kernel."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))
import host  # noqa: E402

# (device, backend, (Hq, Hkv), D, dtype) -> (forward, backward) launches/step, at most
BUDGET = {
    ("cpu", "null", (2, 2), 16, torch.float32): (0, 2),      # the dK/dV partial sum: zero, add
    ("cpu", "torch", (2, 2), 16, torch.float32): (7, 5),     # merge 7; + 3 gradient adds
    ("cpu", "torch", (4, 2), 16, torch.float32): (7, 5),     # GQA: one call for all heads
    ("fake cuda", "null", (4, 2), 64, torch.bfloat16): (28, 15),   # the non-finite path
    ("fake cuda", "torch", (4, 2), 64, torch.bfloat16): (36, 19),
    ("fake cuda", "cuda", (4, 2), 64, torch.bfloat16): (28, 15),
    # a call with finite inputs: the backends' own launches on a GPU
    ("fake cuda, finite call", "null", (4, 2), 64, torch.bfloat16): (0, 2),
    ("fake cuda, finite call", "torch", (4, 2), 64, torch.bfloat16): (8, 6),  # + lse fix-up
    ("fake cuda, finite call", "cuda", (4, 2), 64, torch.bfloat16): (0, 2),   # fused merge/adds
}


@pytest.mark.parametrize("run", sorted(BUDGET, key=str), ids=lambda r: f"{r[0]}-{r[1]}-{r[2]}")
@pytest.mark.parametrize("which", ["fwd", "bwd"])
def test_launches_per_step(run, which):
    per = host.step_counts(which, *run, P=8)
    budget = BUDGET[run][which == "bwd"]
    assert per["launch"] <= budget, (per["launch"], per["names"])
    assert per["attention"] == (0 if run[1] == "null" else 1)


def test_op_kinds():
    aten = torch.ops.aten
    assert host.op_kind(aten.transpose.int) == host.op_kind(aten.as_strided.default) == "view"
    assert host.op_kind(aten.empty.memory_format) == "view"
    assert host.op_kind(aten.add_.Tensor) == host.op_kind(aten.zeros.default) == "launch"
    assert host.op_kind(torch.ops.distattn.fwd_acc.default) == "attention"
    assert host.op_kind(torch.ops.distattn.merge.default) == "launch"
    assert host.op_kind(aten._scaled_dot_product_flash_attention_for_cpu.default) == \
        "attention"


def test_finite_check_modes(monkeypatch):
    """DISTATTN_FINITE_CHECK=sync (the default; unverified on a GPU) makes plain CUDA tensors
    host-readable -- the "fake cuda, finite call" rows above are what a finite call launches
    -- and "device" only plain CPU tensors. Traced tensors never are, nor CUDA tensors
    while a CUDA graph is captured. (No CUDA tensor exists here: a meta tensor stands in for
    the device check.)"""
    from distattn import nonfinite
    monkeypatch.delenv("DISTATTN_FINITE_CHECK", raising=False)
    assert nonfinite._sync_check_devices() == ("cuda",)
    monkeypatch.setenv("DISTATTN_FINITE_CHECK", "device")
    assert nonfinite._sync_check_devices() == ()
    monkeypatch.setenv("DISTATTN_FINITE_CHECK", "always")
    with pytest.raises(ValueError, match="DISTATTN_FINITE_CHECK"):
        nonfinite._sync_check_devices()
    meta = torch.empty(2, device="meta")
    monkeypatch.setattr(nonfinite, "SYNC_CHECK_DEVICES", ())
    assert nonfinite.host_readable(torch.zeros(2)) and not nonfinite.host_readable(meta)
    monkeypatch.setattr(nonfinite, "SYNC_CHECK_DEVICES", ("meta",))
    assert nonfinite.host_readable(meta)
    monkeypatch.setattr(nonfinite, "_capturing", lambda t: t.device.type == "meta")
    assert not nonfinite.host_readable(meta)            # graph capture: no host read
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():                        # traced tensors never are
        monkeypatch.setattr(nonfinite, "SYNC_CHECK_DEVICES", ("cpu", "meta"))
        assert not nonfinite.host_readable(torch.zeros(2))
