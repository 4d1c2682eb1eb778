"""The CUDA host path traced on fake CUDA tensors (no GPU): shapes, dtypes and op schemas.

Backends ``torch`` (PyTorch's meta kernels for its flash ops) and ``cuda`` (this project's
``distattn::`` custom ops, kernels/ops.py, whose fake implementations check the launches'
arguments) run ``dist_flash_attn`` and ``dist_flash_attn_backward`` on one rank through
every mask kind. What runs is everything but the kernels themselves.
"""
from __future__ import annotations

import re
import types

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

import distattn
import distattn.attention
from distattn.hybrid import USPAttention
from distattn.kernels import ops, torch_sdpa
from distattn.kernels.cuda import CudaBackend
from fake_cuda import fake_cuda, mesh  # noqa: F401  (mesh: a fixture)

CASES = {   # name: (dist_flash_attn kwargs, (Hq, Hkv), (D, Dv), local length)
    "dense": (dict(), (4, 4), (64, 64), 64),
    "causal_gqa": (dict(causal=True), (4, 2), (64, 64), 64),
    "mqa_d128": (dict(causal=True), (4, 1), (128, 128), 48),
    "documents": (dict(causal=True, cu_seqlens=[0, 20, 45, 64]), (4, 2), (64, 64), 64),
    "window": (dict(causal=True, window=(7, 0)), (4, 2), (64, 64), 64),
    "softcap": (dict(causal=True, softcap=30.0), (4, 2), (64, 64), 64),
    "sinks": (dict(causal=True), (4, 2), (64, 64), 64),
    "mla": (dict(causal=True), (4, 2), (192, 128), 32),
}




@pytest.fixture
def cuda_ops(monkeypatch):
    """The cuda backend as if the extension were built for a GPU here: its launches go to
    the custom ops (fake implementations under FakeTensorMode)."""
    from distattn.kernels import cuda
    monkeypatch.setattr(cuda, "extension_error", lambda: None)
    monkeypatch.setattr(CudaBackend, "unavailable", lambda self: None)
    monkeypatch.setattr(CudaBackend, "head_dim_pairs",
                        lambda self: ((64, 64), (128, 128), (192, 128)))
    monkeypatch.setattr(CudaBackend, "_check_device_code", lambda self, device: None)


class OpLog(TorchDispatchMode):
    """Names of the ops dispatched (inside FakeTensorMode)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _run(mesh, backend, case, dtype):
    kw, (hq, hkv), (d, dv), n = CASES[case]
    with fake_cuda(), OpLog() as log:
        q = torch.randn(1, n, hq, d, device="cuda", dtype=dtype)
        k = torch.randn(1, n, hkv, d, device="cuda", dtype=dtype)
        v = torch.randn(1, n, hkv, dv, device="cuda", dtype=dtype)
        if case == "sinks":
            kw = dict(kw, sinks=torch.randn(hq, device="cuda", dtype=torch.float32))
        out, lse = distattn.dist_flash_attn(q, k, v, mesh=mesh, backend=backend,
                                            return_lse=True, **kw)
        assert out.device.type == "cuda" and out.dtype == dtype
        assert tuple(out.shape) == (1, n, hq, dv)
        assert lse.dtype == torch.float32 and tuple(lse.shape) == (1, hq, n)
        dout = torch.randn_like(out)
        grads = distattn.attention.dist_flash_attn_backward(dout, q, k, v, out, lse, mesh=mesh,
                                                  backend=backend, **kw)
        for g, t in zip(grads, (q, k, v)):
            assert tuple(g.shape) == tuple(t.shape) and g.dtype == dtype
        if case == "sinks":
            assert len(grads) == 4 and tuple(grads[3].shape) == (hq,)
        # autograd's backward (the Function's own code; .backward() itself cannot run here)
        # (one rank: the head-sharded tensors it saves are the sequence-sharded ones)
        sinks = kw.get("sinks")
        ctx = types.SimpleNamespace(saved_tensors=(q, k, v, out, lse, sinks)
                                    + ((out, lse) if sinks is not None else ()),
                                    hkv=hkv, split=None,
                                    cfg=distattn.attention.prepare(q, k, v, mesh=mesh,
                                                                   backend=backend, **kw))
        agrads = USPAttention.backward(ctx, dout, None)
        for g, t in zip(agrads[:3], (q, k, v)):
            assert tuple(g.shape) == tuple(t.shape) and g.dtype == dtype
    return log.names


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_torch_backend_on_fake_cuda(mesh, case, dtype):
    names = _run(mesh, "torch", case, dtype)
    assert not any(n.startswith("distattn.") for n in names)
    if case not in ("softcap", "mla"):   # those pieces run on the reference math
        assert "aten._flash_attention_forward" in names
        assert "aten._flash_attention_backward" in names


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_cuda_backend_on_fake_cuda(mesh, cuda_ops, case, dtype):
    names = _run(mesh, "cuda", case, dtype)
    assert "distattn.fwd_acc" in names or "distattn.fwd" in names
    assert "distattn.bwd" in names
    assert not any(n.startswith("aten._flash") or n.startswith("aten._scaled_dot") for n in names)


def test_op_schemas():
    """The ops mutate exactly their outputs and return nothing."""
    schemas = {name: str(getattr(torch.ops.distattn, name).default._schema)
               for name in ("fwd", "fwd_acc", "bwd", "merge")}
    def mutated(schema):
        return re.findall(r"Tensor\(a\d+!\) (\w+)", schema)
    assert mutated(schemas["fwd"]) == ["out", "lse"]
    assert mutated(schemas["fwd_acc"]) == ["out_acc", "lse_acc"]
    assert mutated(schemas["bwd"]) == ["dq", "dk", "dv"]
    assert mutated(schemas["merge"]) == ["out_acc", "lse_acc"]
    assert "[] pieces" in schemas["fwd"] and "bool accumulate" in schemas["bwd"]
    assert all(s.endswith("-> ()") for s in schemas.values())


def test_pieces_round_trip():
    pieces = [(0, 10, 0, 12, None, 3), (10, 20, 12, 30, -4, None)]
    assert ops.piece_tuples(ops.flat_pieces(pieces)) == pieces


@pytest.mark.parametrize("bad", ["lse_dtype", "out_shape", "piece_outside", "dq_dtype"])
def test_fake_implementations_refuse_bad_launches(bad):
    with fake_cuda():
        q = torch.randn(1, 16, 4, 64, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, 16, 2, 64, device="cuda", dtype=torch.bfloat16)
        out = torch.empty_like(q)
        lse = torch.empty(1, 4, 16, device="cuda",
                          dtype=torch.bfloat16 if bad == "lse_dtype" else torch.float32)
        pieces = ops.flat_pieces([(0, 16, 0, 17 if bad == "piece_outside" else 16, None, 0)])
        with pytest.raises((TypeError, ValueError)):
            if bad == "dq_dtype":
                g = torch.empty(q.shape, device="cuda", dtype=torch.bfloat16)
                gk = torch.empty(k.shape, device="cuda", dtype=torch.float32)
                ops.bwd(out, q, k, k, out, lse, g, gk, gk.clone(), 0.1, pieces, 0.0, False)
            else:
                ops.fwd(q, k, k, out[:, :8] if bad == "out_shape" else out, lse, 0.1, pieces,
                        0.0)


def test_ops_refuse_to_run_without_the_extension():
    """Outside a fake mode the CUDA kernel of an op needs distattn._C (absent here)."""
    from distattn.kernels import cuda
    if cuda.extension_error() is None:
        pytest.skip("the extension and a GPU are present")
    with pytest.raises(RuntimeError, match="cannot run"):
        ops._extension("cuda")


# -- opt-in measured kernel pick (TorchBackend(pick="measure"); unverified on a GPU) ----------
@pytest.mark.parametrize("name", sorted(torch_sdpa.CUDA_PIECE_KERNELS))
@pytest.mark.parametrize("causal", [False, True])
def test_piece_kernel_candidates_trace(name, causal):
    """Each candidate's forward and backward on fake CUDA tensors: the contract's out and lse
    (natural log, [B, H, Sq] float32, whatever layout the kernel keeps it in)."""
    kernel = torch_sdpa.CUDA_PIECE_KERNELS[name]
    with fake_cuda():
        q, k, v = (torch.randn(2, 4, 32, 64, device="cuda", dtype=torch.bfloat16)
                   for _ in range(3))
        out, lse = kernel.forward(q, k, v, causal, 0.125)
        assert tuple(out.shape) == (2, 4, 32, 64) and out.dtype == torch.bfloat16
        assert tuple(lse.shape) == (2, 4, 32) and lse.dtype == torch.float32
        grads = kernel.backward(torch.randn_like(out), q, k, v, out, lse, causal, 0.125)
        assert [tuple(g.shape) for g in grads] == [tuple(t.shape) for t in (q, k, v)]


def test_cudnn_candidate_through_the_backend(mesh, monkeypatch):
    """dist_flash_attn forward and backward with cuDNN as the piece kernel, on fake CUDA."""
    monkeypatch.setattr(torch_sdpa.TorchBackend, "varlen_ops", None)
    monkeypatch.setattr(torch_sdpa.TorchBackend, "piece_kernels",
                        {"flash": torch_sdpa.CUDA_PIECE_KERNELS["cudnn"]})
    names = _run(mesh, "torch", "causal_gqa", torch.bfloat16)
    assert "aten._scaled_dot_product_cudnn_attention" in names
    assert "aten._scaled_dot_product_cudnn_attention_backward" in names
    assert not any(n.startswith("aten._flash") for n in names)


def test_measured_pick_caches_the_fastest():
    """Fake timer: the fastest candidate wins, once per key; a raising one is left out."""
    cost = {"a": 3.0, "b": 1.0, "c": 2.0}
    timed = []

    def timer(fn, repeats):
        name = fn()
        timed.append(name)
        if name == "b_broken":
            raise RuntimeError("unsupported shape")
        return cost[name]

    pick = torch_sdpa.MeasuredPick(timer)
    cands = {n: (lambda n=n: n) for n in cost}
    assert pick.pick("k1", cands) == "b" and sorted(timed) == ["a", "b", "c"]
    assert pick.pick("k1", cands) == "b" and len(timed) == 3        # cached: no new timing
    cost["a"] = 0.5
    assert pick.pick("k2", cands) == "a" and len(timed) == 6        # per key
    assert pick.pick("k3", {"b_broken": lambda: "b_broken", "c": lambda: "c"}) == "c"
    with pytest.raises(RuntimeError, match="unsupported"):
        pick.pick("k4", {"b_broken": lambda: "b_broken"})


def test_measured_pick_on_the_backend(monkeypatch):
    """pick="measure": per-piece kernel and block strategy come from the picker (mocked
    candidates, CPU tensors standing in for CUDA ones); default: no picker, flash."""
    monkeypatch.delenv("DISTATTN_SDPA_PICK", raising=False)
    assert torch_sdpa.TorchBackend().picker is None
    monkeypatch.setenv("DISTATTN_SDPA_PICK", "measure")
    assert torch_sdpa.TorchBackend().picker is not None
    monkeypatch.setenv("DISTATTN_SDPA_PICK", "fastest")
    with pytest.raises(ValueError, match="DISTATTN_SDPA_PICK"):
        torch_sdpa.TorchBackend()
    calls = []
    fake = lambda tag, ms: torch_sdpa.PieceKernel(
        lambda *a: calls.append(tag) or ms, lambda *a: calls.append(tag + "_bwd"))
    monkeypatch.setattr(torch_sdpa.TorchBackend, "piece_kernels",
                        {"flash": fake("flash", 2.0), "cudnn": fake("cudnn", 1.0)})
    be = torch_sdpa.TorchBackend(pick="measure", timer=lambda fn, r: fn())
    q = torch.zeros(1, 2, 8, 16)
    for _ in range(2):
        assert be._piece_kernel(q, q, q, True, 0.1) is be.piece_kernels["cudnn"]
    assert calls == ["flash", "cudnn"] and list(be.picker.choice.values()) == ["cudnn"]
