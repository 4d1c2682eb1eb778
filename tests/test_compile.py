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

CASES = {
    "causal_gqa": dict(causal=True),
    "documents_window": dict(causal=True, cu_seqlens=[0, 10, 29, 48], window=(6, 0)),
}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    if not dist.is_initialized():
        store = dist.FileStore(str(tmp_path_factory.mktemp("pg") / "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield distattn.SPMesh.build(ulysses_degree=1, ring_degree=1)


# Not yet: documents/window and backend "emulate" stop in Dynamo ("Unsupported output type
# for nonstrict_trace-ed function"); see docs/DESIGN.md, "torch.compile".
@pytest.mark.parametrize("backend,dtype", [("torch", torch.float32)])
@pytest.mark.parametrize("case", ["causal_gqa"])
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
    kernel = "distattn.fwd" if backend == "emulate" else "aten._scaled_dot_product_flash"
    assert kernel in graphs[0]
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    dout = torch.randn_like(ref)
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(ref, (q, k, v), dout)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
