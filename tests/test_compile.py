"""torch.compile(fullgraph=True) traces a one-rank dist_flash_attn call without a graph break.

Backend "aot_eager" (inductor on CPU is slow): one frame, the kernels in the forward graph,
and out and gradients equal to the eager call.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch._dynamo.backends.common import aot_autograd

import distattn
from fake_cuda import mesh  # noqa: F401  (a fixture: the one-rank mesh)

CASES = {
    "causal_gqa": dict(causal=True),
    "documents_window": dict(causal=True, cu_seqlens=[0, 10, 29, 48], window=(6, 0)),
}


# What the forward graph must call: the emulator's custom op, PyTorch's CPU flash kernel, or
# for windows on "torch" the reference math (a band with a lower bound, docs/DESIGN.md).
KERNELS = {
    ("causal_gqa", "torch"): "torch.ops.aten._scaled_dot_product_flash_attention_for_cpu",
    ("documents_window", "torch"): "torch.ops.aten.bmm",
    ("causal_gqa", "emulate"): "torch.ops.distattn.fwd",
    ("documents_window", "emulate"): "torch.ops.distattn.fwd",
}




@pytest.mark.parametrize("backend,dtype", [("torch", torch.float32), ("torch", torch.float64),
                                           ("emulate", torch.bfloat16)])
@pytest.mark.parametrize("case", sorted(CASES))
def test_fullgraph_one_rank(mesh, case, backend, dtype):
    torch._dynamo.reset()
    kw = dict(CASES[case], mesh=mesh, backend=backend)
    graphs = []

    def record(gm, _inputs):
        graphs.append(gm.code)
        return gm.forward

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 48, h, 64, generator=g).to(dtype).requires_grad_()
               for h in (4, 2, 2))

    def f(q, k, v):
        return distattn.dist_flash_attn(q, k, v, **kw) * 2

    out = torch.compile(f, fullgraph=True, backend=aot_autograd(fw_compiler=record))(q, k, v)
    ref = f(q, k, v)
    assert len(graphs) == 1, "one forward graph: no graph break"
    assert KERNELS[case, backend] in graphs[0]
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    dout = torch.randn_like(ref)
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(ref, (q, k, v), dout)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# -- device-keyed tensor caches and traces (kernels/device_cache.py) --------------------------
def test_device_caches_are_bypassed_while_tracing():
    """Built under a fake mode, the launch arrays and nonfinite pieces are neither cached nor
    read from the cache; the eager entries stay real and are reused."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    from distattn import nonfinite
    from distattn.kernels import varlen
    from distattn.kernels.mask import Mask
    mask, cpu = Mask.causal(0), torch.device("cpu")
    for fn in (lambda: varlen.launch_tensors(mask, 24, 24, 1, cpu)[0].cu_q,
               lambda: nonfinite._pieces(mask, 24, 24, cpu)[0][6]):
        eager = fn()
        info = (varlen.launch_tensors.cache_info(), nonfinite._pieces.cache_info())
        with FakeTensorMode():
            assert isinstance(fn(), FakeTensor)
        assert (varlen.launch_tensors.cache_info(), nonfinite._pieces.cache_info()) == info
        again = fn()
        assert again is eager and not isinstance(again, FakeTensor)


def _math_varlen(q, k, v, scale):
    """Causal attention of one sequence of rows q [n, Hq, D], k/v [n, Hkv, D] (float64):
    (out, lse [Hq, n], probabilities [Hq, n, n], expanded k, expanded v)."""
    g = q.shape[1] // k.shape[1]
    ke, ve = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = torch.einsum("qhd,khd->hqk", q, ke) * scale
    n = q.shape[0]
    s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.unsqueeze(-1))
    return torch.einsum("hqk,khd->qhd", p, ve), lse, p, ke, ve


class TraceableVarlen:
    """A traceable CPU float64 stand-in for the varlen flash ops, for one causal sequence
    (batch 1, no documents). It records whether an *eager* call got a fake launch array --
    the bug a device-keyed cache filled during a trace would cause."""

    def __init__(self):
        self.eager_fakes = self.eager_calls = 0

    def _see(self, cu):
        from torch._subclasses.fake_tensor import FakeTensor
        if torch._C._len_torch_dispatch_stack() == 0:    # eager: the array must be real
            self.eager_calls += 1
            self.eager_fakes += isinstance(cu, FakeTensor)

    def forward(self, q, k, v, cu_q, cu_k, max_q, max_k, dropout, causal, ret, *, scale,
                window_size_left, window_size_right):
        self._see(cu_q)
        assert causal and window_size_left == -1
        out, lse, *_ = _math_varlen(q, k, v, scale)
        return out, lse

    def backward(self, dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, dropout, causal,
                 rng, unused, *, scale, window_size_left, window_size_right):
        self._see(cu_k)
        _, _, p, ke, ve = _math_varlen(q, k, v, scale)
        dp = torch.einsum("qhd,khd->hqk", dout, ve)
        ds = p * (dp - (dout * out).sum(-1).t().unsqueeze(-1))
        g = q.shape[1] // k.shape[1]
        fold = lambda t: t.unflatten(1, (k.shape[1], g)).sum(2)
        return (torch.einsum("hqk,khd->qhd", ds, ke) * scale,
                fold(torch.einsum("hqk,qhd->khd", ds, q) * scale),
                fold(torch.einsum("hqk,qhd->khd", p, dout)))


def test_eager_forward_compile_eager_backward(mesh, monkeypatch):
    """An eager forward, then a compile (forward and backward traced), then the eager
    forward's backward: the eager calls only ever see real launch arrays, and the eager and
    compiled results agree."""
    from distattn.kernels.torch_sdpa import FlashVarlenOps, TorchBackend
    ops = TraceableVarlen()
    monkeypatch.setattr(TorchBackend, "varlen_ops", FlashVarlenOps(
        ops.forward, ops.backward, ("cpu",), (torch.float64,)))
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 48, h, 16, generator=g, dtype=torch.float64).requires_grad_()
               for h in (4, 2, 2))

    def f(q, k, v):
        return distattn.dist_flash_attn(q, k, v, mesh=mesh, causal=True, backend="torch")

    eager = f(q, k, v)                         # fills the caches with real tensors
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v)                    # traces forward and backward
    dout = torch.randn_like(eager)
    want = torch.autograd.grad(eager, (q, k, v), dout)     # eager backward after the trace
    got = torch.autograd.grad(out, (q, k, v), dout)
    again = f(q, k, v)                         # and an eager forward after it all
    assert ops.eager_calls >= 3 and ops.eager_fakes == 0
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
    torch.testing.assert_close(again, eager, rtol=0, atol=0)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
