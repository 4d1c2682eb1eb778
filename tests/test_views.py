"""Every schedule accepts non-contiguous q/k/v/dout/out/lse views, on a gloo world of 4 CPU
processes.

The views are what callers pass: ``.transpose(1, 2)`` of [B, H, S, D] tensors (the
transformers integration), a last-dim slice of a wider tensor (a fused QKV projection, Phi-3),
both together, and a sequence-strided view. Wherever a view's storage holds other elements
they are NaN, so reading one shows. Schedules: the helper schedule (ring 4 and USP 2 x 2,
"auto" on the contiguous causal layout), the ring (zigzag, stripe, packed documents), Ulysses
4 (even and uneven heads), MLA; backends torch and reference in fp64 and the emulated kernels
in fp16. Checked against a dense one-process fp64 reference (1e-10 in fp64), and out, lse and
gradients bitwise equal to the same call on contiguous inputs, also through
``dist_flash_attn_backward`` with view arguments.
"""
import pytest
import torch

from dist_cases import DOC_SETS, _rel, dense_attention, visibility
from spawn import run_world

WORLD = 4
KINDS = ("transpose", "slice", "transpose_slice", "seq_stride")
# (ulysses, layout, causal, schedule, backend, hq, hkv, dv, docs)
CASES = (
    (1, "contiguous", True, "auto", "torch", 4, 2, 8, ""),        # helper schedule, ring 4
    (1, "contiguous", True, "helper", "reference", 4, 4, 8, ""),
    (1, "zigzag", True, "ring", "torch", 4, 1, 8, ""),
    (1, "stripe", False, "ring", "reference", 4, 2, 8, ""),
    (2, "contiguous", True, "auto", "reference", 4, 2, 8, ""),    # helper schedule, USP 2 x 2
    (2, "zigzag", True, "ring", "torch", 4, 2, 8, ""),
    (2, "packed", True, "ring", "torch", 4, 2, 8, "mixed"),
    (4, "contiguous", True, "auto", "torch", 4, 2, 8, ""),        # Ulysses 4
    (4, "zigzag", False, "auto", "reference", 6, 2, 8, ""),       # uneven heads
    (1, "zigzag", True, "ring", "torch", 4, 2, 16, ""),           # MLA
    (1, "contiguous", True, "auto", "emulate", 4, 2, 64, ""),
    (2, "zigzag", True, "ring", "emulate", 4, 2, 64, ""),
)


def case_id(case):
    u, lay, causal, sched, be, hq, hkv, dv, docs = case
    return (f"u{u}-{lay}-{'causal' if causal else 'full'}-{sched}-{be}-h{hq}kv{hkv}-dv{dv}"
            + (f"-{docs}" if docs else ""))


def as_view(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The values of x [B, S, H, D] as a non-contiguous view; the rest of its storage NaN."""
    nan = torch.full_like(x, float("nan"))
    if kind == "transpose":
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if kind == "slice":
        return torch.cat([x, nan], -1)[..., :x.shape[-1]]
    if kind == "transpose_slice":
        return torch.cat([x, nan], -1).transpose(1, 2).contiguous().transpose(1, 2)[
            ..., :x.shape[-1]]
    if kind == "seq_stride":
        return torch.stack([x, nan], 2)[:, :, 0]
    raise ValueError(kind)


def run_cases(rank, world, cases):
    import distattn
    from distattn.attention import dist_flash_attn, dist_flash_attn_backward

    meshes, results = {}, {}
    for case in cases:
        u, lay, causal, sched, be, hq, hkv, dv, docs = case
        if u not in meshes:
            meshes[u] = distattn.SPMesh.build(ulysses_degree=u)
        mesh = meshes[u]
        dtype = torch.float16 if be == "emulate" else torch.float64
        d = 64 if be == "emulate" else 8
        cu = DOC_SETS[docs](world) if docs else None
        seq = cu[-1] if cu else 2 * world * 3
        batch = 1 if cu else 2
        gen = torch.Generator().manual_seed(3)
        full = [torch.randn(batch, seq, h, e, generator=gen, dtype=torch.float64).to(dtype)
                for h, e in ((hq, d), (hkv, d), (hkv, dv), (hq, dv))]
        kw = dict(mesh=mesh, causal=causal, layout=lay, schedule=sched, backend=be,
                  cu_seqlens=cu)
        local = [distattn.shard(t, mesh, dim=1, layout=lay, cu_seqlens=cu).contiguous()
                 for t in full]

        def call(q, k, v, dout):
            q, k, v = (t.requires_grad_() for t in (q, k, v))
            out, lse = dist_flash_attn(q, k, v, return_lse=True, **kw)
            out.backward(dout)
            return out.detach(), lse, q.grad, k.grad, v.grad

        plain = call(*(t.clone() for t in local))
        ref_in = [t.double().requires_grad_() for t in full[:3]]
        ref_out, ref_lse = dense_attention(*ref_in, visibility(seq, cu, causal))
        ref = [ref_out, ref_lse] + list(torch.autograd.grad(ref_out, ref_in, full[3].double()))
        ref = [distattn.shard(t.detach(), mesh, dim=2 if i == 1 else 1, layout=lay,
                              cu_seqlens=cu) for i, t in enumerate(ref)]
        real = distattn.layout.local_indices(seq, mesh, lay, cu) >= 0
        pick = lambda t, i: t[:, :, real] if i == 1 else t[:, real]
        res = {}
        for kind in KINDS:
            views = [as_view(t, kind) for t in local]
            # (a transposed view with one head, MQA's K/V, is contiguous)
            assert not any(t.is_contiguous() for t in views if t.shape[2] > 1), kind
            got = call(*views)
            out_v, lse_v = as_view(got[0], kind), got[1].transpose(1, 2).contiguous() \
                .transpose(1, 2)
            again = dist_flash_attn_backward(views[3], *(as_view(t, kind) for t in local[:3]),
                                             out_v, lse_v, **kw)
            res[kind] = {
                "same_as_contiguous": all(torch.equal(a, b) for a, b in zip(got, plain)),
                "backward_fn_same": all(torch.equal(a, b) for a, b in zip(again, plain[2:])),
                "err": max(_rel(pick(g, i), pick(r, i))
                           for i, (g, r) in enumerate(zip(got, ref))),
            }
        results[case_id(case)] = res
    return results


@pytest.fixture(scope="module")
def results():
    return run_world(WORLD, run_cases, list(CASES))


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_views_match_contiguous_and_reference(results, case):
    tol = 1e-10 if case[4] != "emulate" else 2e-2
    for rank, res in enumerate(results):
        for kind, r in res[case_id(case)].items():
            where = f"rank {rank}, {kind} views"
            assert r["same_as_contiguous"], f"{where}: result differs from contiguous inputs"
            assert r["backward_fn_same"], f"{where}: dist_flash_attn_backward differs"
            assert r["err"] <= tol, f"{where}: relative error {r['err']:.3e}"
