"""Worker-side code of the distributed tests: runs inside each spawned rank (see spawn.py).

Each function takes (rank, world, ...) and returns plain data (errors, messages) that the
pytest process asserts on. References are computed on every rank from the full tensors, in
float64, with autograd through the reference math: independent of the hand-written backward.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

import distattn
from distattn.layout import local_indices, ring_layout

DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16,
          "fp16": torch.float16}


@dataclass(frozen=True)
class Case:
    world: int
    ulysses: int
    ring: int
    placement: str
    layout: str
    causal: bool
    hq: int
    hkv: int
    head_dim: int
    batch: int
    dtype: str
    backend: str
    schedule: str = "auto"
    docs: str = ""          # a name in DOC_SETS: packed documents (cu_seqlens), any length
    window: tuple = None    # (left, right), -1 unbounded
    softcap: float = 0.0
    sinks: bool = False
    v_head_dim: int = 0     # MLA: V's head dim when it differs from q/k's (0: the same)

    @property
    def dv(self) -> int:
        return self.v_head_dim or self.head_dim

    @property
    def id(self) -> str:
        return (f"w{self.world}-u{self.ulysses}r{self.ring}-{self.placement}-{self.layout}-"
                f"{'causal' if self.causal else 'full'}-h{self.hq}kv{self.hkv}-d{self.head_dim}"
                f"-b{self.batch}-{self.dtype}-{self.backend}-{self.schedule}"
                + (f"-docs_{self.docs}" if self.docs else "")
                + (f"-win{self.window[0]}_{self.window[1]}" if self.window else "")
                + (f"-cap{self.softcap}" if self.softcap else "")
                + ("-sinks" if self.sinks else "")
                + (f"-dv{self.v_head_dim}" if self.v_head_dim else ""))

    @property
    def cu_seqlens(self):
        return DOC_SETS[self.docs](self.world) if self.docs else None

    @property
    def seq_len(self) -> int:
        if self.docs:
            return self.cu_seqlens[-1]
        # 3 tokens per zigzag chunk (odd on purpose): a multiple of every layout's need.
        return 2 * self.world * 3


def _mixed_docs(world: int) -> tuple:
    """A 1-token document, one shorter than a zigzag chunk, one over every rank, a short
    tail; the true length divides by nothing the layouts need."""
    long = 5 * world + 3
    return (0, 1, 3, 3 + long, 3 + long + 2, 3 + long + 2 + world + 1)


def _random_docs(world: int) -> tuple:
    gen = torch.Generator().manual_seed(world)
    lens = torch.randint(1, 3 * world + 2, (2 * world + 1,), generator=gen).tolist()
    return tuple(int(x) for x in torch.tensor([0] + lens).cumsum(0))


DOC_SETS = {
    "mixed": _mixed_docs,
    "random": _random_docs,
    "one": lambda world: (0, 4 * world + 1),     # any length: one document, odd length
}


def mesh_shapes(world: int):
    """Every (ulysses, ring, placement) for a world; both placements only where they differ."""
    for u in range(1, world + 1):
        if world % u == 0:
            r = world // u
            yield u, r, "ulysses_inner"
            if u > 1 and r > 1:
                yield u, r, "ring_inner"


def attention_cases(world: int) -> list[Case]:
    """mesh x placement x layout x causal x heads fully crossed (world 8: the K/V heads cycle
    instead, each still with every mesh -- its 8 ranks share 2 cores); head_dim, batch,
    dtype and backend cycle through their values so each appears with every mesh. Contiguous
    causal cases run twice: schedule "auto" (the helper schedule where the ring has > 1
    rank) and the plain ring."""
    cases, i, j = [], 0, 0
    for u, r, placement in mesh_shapes(world):
        for layout in ("contiguous", "zigzag", "stripe"):
            for causal in (False, True):
                schedules = ("auto", "ring") if layout == "contiguous" and causal else ("auto",)
                j += 1
                for hkv in (8, 2, 1) if world < 8 else ((8, 2, 1)[j % 3],):
                    for schedule in schedules:
                        cases.append(Case(world, u, r, placement, layout, causal, 8, hkv,
                                          (32, 64)[i % 2], (1, 2)[(i // 2) % 2],
                                          ("fp64", "fp32")[(i // 4) % 2],
                                          ("torch", "reference")[(i // 3) % 2], schedule))
                        i += 1
    return cases


def document_cases(world: int) -> list[Case]:
    """Packed documents and any length: mesh x placement x layout (packed too) x causal fully
    crossed; document sets, K/V heads, dtypes and backends cycle. Contiguous causal cases
    also run the helper schedule explicitly; a few run in bf16 and fp16."""
    cases, i = [], 0
    names = sorted(DOC_SETS)
    for u, r, placement in mesh_shapes(world):
        for layout in ("contiguous", "zigzag", "stripe", "packed"):
            for causal in (False, True):
                name = names[i % len(names)]
                helper = (layout == "contiguous" and causal and r > 1 and
                          (r % 2 or ring_layout(layout, DOC_SETS[name](world)[-1], r, u,
                                                DOC_SETS[name](world)).part_len % 2 == 0))
                for schedule in (("ring", "helper") if helper else ("auto",)):
                    cases.append(Case(world, u, r, placement, layout, causal, 8, (8, 2, 1)[i % 3],
                                      32, 1, ("fp64", "fp64", "fp32")[i % 3],
                                      ("torch", "reference")[(i // 2) % 2], schedule, name))
                    i += 1
    if world in (2, 4):
        for dtype in ("bf16", "fp16"):
            cases.append(Case(world, 1, world, "ulysses_inner", "packed", True, 4, 2, 32, 1,
                              dtype, "torch", "auto", "mixed"))
            cases.append(Case(world, 2, world // 2, "ulysses_inner", "zigzag", True, 4, 1, 32,
                              1, dtype, "reference", "auto", "random"))
    return cases


# (causal, window, softcap, sinks, docs): sliding windows narrower and wider than a zigzag
# chunk (3 tokens), asymmetric non-causal windows, softcap, sinks, windows with documents,
# and everything together.
VARIANTS = (
    (True, (2, 0), 0.0, False, ""),
    (True, (7, 0), 0.0, False, ""),
    (False, (3, 5), 0.0, False, ""),
    (True, None, 1.5, False, ""),
    (True, None, 0.0, True, ""),
    (False, (2, 2), 0.0, False, "random"),
    (True, (4, 0), 2.0, True, "mixed"),
    (False, None, 0.0, True, "one"),
)


def variant_cases(world: int) -> list[Case]:
    """Windows, softcap and sinks over every mesh and layout: each (mesh, layout) runs two
    variants, cycling through VARIANTS; contiguous causal ones also run the helper schedule
    where the ring part halves."""
    cases, i = [], 0
    for u, r, placement in mesh_shapes(world):
        for layout in ("contiguous", "zigzag", "stripe", "packed"):
            for _ in range(2):
                causal, window, softcap, sinks, docs = VARIANTS[i % len(VARIANTS)]
                docs = docs or ("one" if layout == "packed" else "")
                seq = DOC_SETS[docs](world)[-1] if docs else 2 * world * 3
                helper = (layout == "contiguous" and causal and r > 1 and
                          (r % 2 or ring_layout(layout, seq, r, u, DOC_SETS[docs](world)
                                                if docs else None).part_len % 2 == 0))
                for schedule in (("ring", "helper") if helper else ("auto",)):
                    cases.append(Case(world, u, r, placement, layout, causal, 8,
                                      (8, 2, 1)[i % 3], 32, 1, "fp64",
                                      ("torch", "reference")[(i // 3) % 2], schedule, docs,
                                      window, softcap, sinks))
                i += 1
    return cases


def helper_cases(world: int) -> list[Case]:
    """The helper schedule on a pure ring of any size (odd too), fp64, MHA/GQA/MQA."""
    return [Case(world, 1, world, "ulysses_inner", "contiguous", True, 8, hkv, 32, b, "fp64",
                 backend, "helper")
            for hkv in (8, 2, 1) for b, backend in ((1, "torch"), (2, "reference"))]


# (causal, window, softcap, sinks, docs) for the all-gather schedule: plain causal, a window
# shorter than a zigzag chunk, documents, everything together, an asymmetric non-causal
# window, causal documents.
ALLGATHER_VARIANTS = (
    (True, None, 0.0, False, ""),
    (True, (2, 0), 0.0, False, ""),
    (False, None, 0.0, False, "random"),
    (True, (4, 0), 2.0, True, "mixed"),
    (False, (3, 5), 0.0, False, ""),
    (True, None, 0.0, False, "mixed"),
)


def allgather_cases(world: int) -> list[Case]:
    """schedule="allgather" on every mesh and layout: each (mesh, layout) runs two variants of
    ALLGATHER_VARIANTS (documents, windows, softcap, sinks), fp64, MHA/GQA/MQA, both
    backends; plus one MLA case and one fp16 case per world. World 8 runs two small cases
    only (a pure ring and a 2 x 4 USP), to keep its spawn short."""
    if world == 8:
        return [Case(8, 1, 8, "ulysses_inner", "zigzag", True, 8, 2, 32, 1, "fp64", "torch",
                     "allgather", "mixed", (4, 0)),
                Case(8, 2, 4, "ring_inner", "packed", False, 8, 1, 32, 1, "fp64", "reference",
                     "allgather", "random", (3, 5), 0.0, True)]
    cases, i = [], 0
    for u, r, placement in mesh_shapes(world):
        for layout in ("contiguous", "zigzag", "stripe", "packed"):
            for _ in range(2):
                causal, window, softcap, sinks, docs = ALLGATHER_VARIANTS[
                    i % len(ALLGATHER_VARIANTS)]
                docs = docs or ("one" if layout == "packed" else "")
                cases.append(Case(world, u, r, placement, layout, causal, 8, (8, 2, 1)[i % 3],
                                  32, 1, "fp64", ("torch", "reference")[(i // 2) % 2],
                                  "allgather", docs, window, softcap, sinks))
                i += 1
    cases.append(Case(world, 1, world, "ulysses_inner", "zigzag", True, 8, 2, 32, 1, "fp64",
                      "reference", "allgather", "mixed", (4, 0), v_head_dim=16))
    cases.append(Case(world, 1, world, "ulysses_inner", "stripe", True, 4, 2, 32, 1, "fp16",
                      "torch", "allgather", "random"))
    return cases


class Meshes:
    """One SPMesh per (ulysses, placement) inside a worker: building groups is collective and
    not free, so cases share them."""

    def __init__(self):
        self._meshes = {}

    def get(self, ulysses: int, placement: str):
        key = (ulysses, placement)
        if key not in self._meshes:
            self._meshes[key] = distattn.SPMesh.build(ulysses_degree=ulysses, placement=placement)
        return self._meshes[key]


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().double(), ref.detach().double()
    finite = torch.isfinite(ref)
    if not torch.equal(finite, torch.isfinite(a)):
        return float("inf")
    scale = ref[finite].abs().max().clamp_min(1e-30) if finite.any() else torch.tensor(1.0)
    return float(((a - ref)[finite].abs().max() / scale) if finite.any() else 0.0)


def visibility(seq_len: int, cu_seqlens=None, causal: bool = False, window=None):
    """[S, S] bool: query i sees key j. Brute force on global indices, independent of
    distattn's mask algebra."""
    i = torch.arange(seq_len).unsqueeze(1)
    j = torch.arange(seq_len).unsqueeze(0)
    vis = torch.ones(seq_len, seq_len, dtype=torch.bool)
    if cu_seqlens is not None:
        doc = torch.bucketize(torch.arange(seq_len), torch.tensor(cu_seqlens[1:]), right=True)
        vis &= doc.unsqueeze(1) == doc.unsqueeze(0)
    if causal:
        vis &= j <= i
    if window is not None:
        left, right = window
        if left >= 0:
            vis &= j >= i - left
        if right >= 0:
            vis &= j <= i + right
    return vis


def dense_attention(q, k, v, visible, scale=None, softcap=0.0, sinks=None):
    """(out [B, S, Hq, D], lse [B, Hq, S]) in q's dtype with an explicit [S, S] mask: plain
    tensor math (K/V heads repeated for GQA), no distattn code. Differentiable."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    group = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    if sinks is not None:
        lse = torch.logaddexp(lse, sinks.to(lse.dtype).view(1, -1, 1))
    p = torch.exp(s - lse.unsqueeze(-1))
    return torch.einsum("bhqk,bkhd->bqhd", p, v), lse


def run_case(case: Case, mesh) -> dict:
    dtype = DTYPES[case.dtype]
    cu = case.cu_seqlens
    # crc32, not hash(): str hashes differ between processes, and every rank needs the same data
    gen = torch.Generator().manual_seed(zlib.crc32(case.id.encode()))
    S, B, D = case.seq_len, case.batch, case.head_dim
    q = torch.randn(B, S, case.hq, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, S, case.hkv, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, S, case.hkv, case.dv, generator=gen, dtype=torch.float64)
    dout = torch.randn(B, S, case.hq, case.dv, generator=gen, dtype=torch.float64)
    q, k, v, dout = (t.to(dtype) for t in (q, k, v, dout))

    sinks = (torch.randn(case.hq, generator=gen, dtype=torch.float64).to(dtype)
             if case.sinks else None)
    variant = dict(softcap=case.softcap, sinks=sinks)
    visible = visibility(S, cu, case.causal, case.window)

    # float64 reference from the same (rounded) inputs, gradients by autograd.
    ref_in = [t.to(torch.float64, copy=True).requires_grad_() for t in (q, k, v)]
    if sinks is not None:
        ref_in.append(sinks.to(torch.float64, copy=True).requires_grad_())
    ref_out, ref_lse = dense_attention(*ref_in[:3], visible, softcap=case.softcap,
                                       sinks=ref_in[3] if sinks is not None else None)
    ref_grads = torch.autograd.grad(ref_out, ref_in, dout.double())
    math_err = {}
    if dtype in (torch.bfloat16, torch.float16):   # FlashAttention's rule needs PyTorch math
        low_in = [t.detach().clone().requires_grad_() for t in (q, k, v)]  # error in dtype
        low_out, low_lse = dense_attention(*low_in, visible)
        low_grads = torch.autograd.grad(low_out, low_in, dout)
        math_err = {"out": _rel(low_out, ref_out), "lse": _rel(low_lse, ref_lse),
                    **{n: _rel(g, r) for n, g, r in zip(("dq", "dk", "dv"), low_grads,
                                                         ref_grads)}}

    def local(t, dim=1):
        return distattn.shard(t, mesh, dim=dim, layout=case.layout, cu_seqlens=cu)

    # Padding slots hold NaN in q/k/v and random upstream gradients: they must stay inert.
    held = local_indices(S, mesh, case.layout, cu)
    pad = held < 0
    real = ~pad

    def ref_local(t, dim=1):   # this rank's rows of a reference (padding: row 0, not compared)
        return t.index_select(dim, held.clamp_min(0))   # no collective, unlike shard

    # one shard call for the four inputs (each call is an agreement, a collective)
    parts = (q, k, v, dout)
    joined = local(torch.cat([t.flatten(2) for t in parts], dim=2))
    ql, kl, vl, dl = (c.unflatten(2, t.shape[2:]).clone() for c, t in
                      zip(joined.split([t[0, 0].numel() for t in parts], dim=2), parts))
    for t in (ql, kl, vl):
        t[:, pad] = float("nan")
    ql, kl, vl = (t.requires_grad_() for t in (ql, kl, vl))
    dl[:, pad] = torch.randn(dl[:, pad].shape, generator=gen).to(dtype)
    sl = sinks.clone().requires_grad_() if sinks is not None else None
    out, lse = distattn.dist_flash_attn(ql, kl, vl, mesh=mesh, causal=case.causal,
                                        layout=case.layout, backend=case.backend,
                                        schedule=case.schedule, return_lse=True,
                                        cu_seqlens=cu, window=case.window,
                                        softcap=case.softcap or None, sinks=sl)
    out.backward(dl)
    if sl is not None:          # a replicated parameter: the SP group's sum is the gradient
        dsinks = sl.grad.clone()
        torch.distributed.all_reduce(dsinks)
    inert = bool(pad.any()) and (
        bool((out[:, pad] == 0).all()) and bool((lse[:, :, pad] == float("-inf")).all())
        and all(bool((g[:, pad] == 0).all()) for g in (ql.grad, kl.grad, vl.grad)))
    return {
        "dtype_ok": out.dtype == dtype and ql.grad.dtype == dtype and kl.grad.dtype == dtype,
        "lse_dtype": str(lse.dtype),
        "shard_ok": all(torch.equal(a[:, real], ref_local(t)[:, real])
                        for a, t in ((ql.detach(), q), (kl.detach(), k), (vl.detach(), v),
                                     (dl, dout))),
        "math_err": math_err,
        "padding": int(pad.sum()),
        "inert": inert,
        "out": _rel(out[:, real], ref_local(ref_out)[:, real]),
        "lse": _rel(lse[:, :, real], ref_local(ref_lse, dim=2)[:, :, real]),
        "dq": _rel(ql.grad[:, real], ref_local(ref_grads[0])[:, real]),
        "dk": _rel(kl.grad[:, real], ref_local(ref_grads[1])[:, real]),
        "dv": _rel(vl.grad[:, real], ref_local(ref_grads[2])[:, real]),
        "dsinks": _rel(dsinks, ref_grads[3]) if sl is not None else 0.0,
    }


def run_attention_cases(rank: int, world: int, cases: list[Case]) -> dict:
    meshes = Meshes()
    return {c.id: run_case(c, meshes.get(c.ulysses, c.placement)) for c in cases}


def run_layout_roundtrips(rank: int, world: int) -> dict:
    """unshard(shard(x)) == x and positions == shard(arange) for every mesh and layout, on
    dims 1 and 2 (sequence as in q and as in lse)."""
    meshes, results = Meshes(), {}
    for u, r, placement in mesh_shapes(world):
        mesh = meshes.get(u, placement)
        for layout in ("contiguous", "zigzag", "stripe"):
            seq = 2 * world * 5
            x = torch.arange(2 * seq * 3, dtype=torch.float64).reshape(2, seq, 3)
            ok = True
            for dim in (1, -2):
                back = distattn.unshard(distattn.shard(x, mesh, dim=dim, layout=layout), mesh,
                                        dim=dim, layout=layout)
                ok &= torch.equal(back, x)
            pos = distattn.positions(seq, mesh, layout=layout)
            ok &= torch.equal(pos, distattn.shard(torch.arange(seq), mesh, dim=0, layout=layout))
            results[f"u{u}r{r}-{placement}-{layout}"] = (ok, pos.tolist())
        for layout in ("contiguous", "zigzag", "stripe", "packed"):   # documents, any length
            cu = _mixed_docs(world)
            x = torch.randn(2, cu[-1], 3, dtype=torch.float64,
                            generator=torch.Generator().manual_seed(7))   # same on every rank
            ok = all(torch.equal(distattn.unshard(distattn.shard(x, mesh, dim=dim, layout=layout,
                                                                 cu_seqlens=cu),
                                                  mesh, dim=dim, layout=layout, cu_seqlens=cu), x)
                     for dim in (1, -2))
            results[f"u{u}r{r}-{placement}-{layout}-docs"] = (ok, None)
    return results


def _outcome(fn) -> tuple:
    """('ok', '') or (exception type name, message)."""
    try:
        fn()
        return ("ok", "")
    except Exception as exc:  # the test asserts on the type and message
        return (type(exc).__name__, str(exc))


def run_error_cases(rank: int, world: int) -> dict:
    """Every bad call of item 8 of the core issue, on every rank at once, followed by a good
    call: if any check came after a collective, ranks would desynchronise and hang here."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    mesh = distattn.SPMesh.build(ulysses_degree=2)          # 2 x 2 on world 4
    ring = distattn.SPMesh.from_group(None)                 # ring of 4
    B, S, H, D = 1, 4, 4, 8
    q = torch.randn(B, S, H, D)
    k = torch.randn(B, S, 2, D)
    v = torch.randn(B, S, 2, D)
    call = lambda *a, **kw: (lambda: distattn.dist_flash_attn(*a, **kw))
    cases = {
        "q_not_tensor": call(q.numpy(), k, v, mesh=ring),
        "q_3d": call(q[0], k, v, mesh=ring),
        "int_dtype": call(q.long(), k.long(), v.long(), mesh=ring),
        "mixed_dtype": call(q.double(), k, v, mesh=ring),
        "kv_shape": call(q, k, v[:, :, :1], mesh=ring),
        "batch": call(q.expand(2, -1, -1, -1), k, v, mesh=ring),
        "seq": call(q[:, :2], k, v, mesh=ring),
        "head_dim": call(q[..., :4], k, v, mesh=ring),
        "gqa_ratio": call(q[:, :, :3], k, v, mesh=ring),
        "ulysses_heads": call(torch.randn(B, S, 1, D), torch.randn(B, S, 1, D),
                              torch.randn(B, S, 1, D), mesh=mesh),
        "zigzag_odd_local": call(q[:, :3], k[:, :3], v[:, :3], mesh=ring, layout="zigzag"),
        "layout": call(q, k, v, mesh=ring, layout="snake"),
        "schedule": call(q, k, v, mesh=ring, schedule="fastest"),
        "helper_zigzag": call(q, k, v, mesh=ring, schedule="helper", causal=True,
                              layout="zigzag"),
        "helper_full": call(q, k, v, mesh=ring, schedule="helper", causal=False),
        "helper_odd_local": call(q[:, :3], k[:, :3], v[:, :3], mesh=ring, schedule="helper",
                                 causal=True),
        "profiler_type": call(q, k, v, mesh=ring, profiler="yes"),
        "backend": call(q, k, v, mesh=ring, backend="triton"),
        "scale": call(q, k, v, mesh=ring, softmax_scale=-1.0),
        "causal_type": call(q, k, v, mesh=ring, causal="yes"),
        "mesh_type": call(q, k, v, mesh="world"),
        "cuda_missing": call(q, k, v, mesh=ring, backend="cuda"),
        "cu_not_increasing": call(q, k, v, mesh=ring, cu_seqlens=[0, 8, 8, 16]),
        "cu_not_from_zero": call(q, k, v, mesh=ring, cu_seqlens=[1, 16]),
        "cu_not_ints": call(q, k, v, mesh=ring, cu_seqlens=[0.0, 16.0]),
        "cu_differs_from_shard": call(q, k, v, mesh=ring, cu_seqlens=[0, 7, 20]),
        "cu_with_batch": call(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1),
                              v.expand(2, -1, -1, -1), mesh=ring, cu_seqlens=[0, 16]),
        "packed_without_cu": call(q, k, v, mesh=ring, layout="packed"),
        "window_negative": call(q, k, v, mesh=ring, window=(-2, 0)),
        "window_shape": call(q, k, v, mesh=ring, window=4),
        "softcap_zero": call(q, k, v, mesh=ring, softcap=0.0),
        "softcap_negative": call(q, k, v, mesh=ring, softcap=-30.0),
        "sinks_shape": call(q, k, v, mesh=ring, sinks=torch.zeros(H + 1)),
        "sinks_dtype": call(q, k, v, mesh=ring, sinks=torch.zeros(H, dtype=torch.long)),
        "shard_cu_past_tensor": lambda: distattn.shard(torch.zeros(1, 16), ring,
                                                       cu_seqlens=[0, 9, 20]),
        "unshard_cu_differs": lambda: distattn.unshard(q, ring, cu_seqlens=[0, 7, 20]),
        "build_bad_degree": lambda: distattn.SPMesh.build(ulysses_degree=3),
        "build_bad_product": lambda: distattn.SPMesh.build(ulysses_degree=2, ring_degree=4),
        "build_bad_placement": lambda: distattn.SPMesh.build(ulysses_degree=2,
                                                             placement="diagonal"),
        "device_mesh_bad_dim": lambda: distattn.SPMesh.from_device_mesh(
            init_device_mesh("cpu", (2, 2), mesh_dim_names=("a", "b")), "sp_u", "b"),
    }
    results = {name: _outcome(fn) for name, fn in cases.items()}
    # The group must still be in step: a good call on both meshes, then a barrier.
    out = distattn.dist_flash_attn(q, k, v, mesh=mesh, causal=True)
    out = distattn.dist_flash_attn(q, k, v, mesh=ring, causal=True)
    dist.barrier()
    results["good_call_after_errors"] = ("ok" if out.shape == q.shape else "bad shape", "")
    return results


def run_mesh_checks(rank: int, world: int) -> dict:
    """Coordinates of both placements, and from_device_mesh agreeing with build."""
    from torch.distributed.device_mesh import init_device_mesh

    res = {}
    for placement in ("ulysses_inner", "ring_inner"):
        m = distattn.SPMesh.build(ulysses_degree=2, placement=placement)
        res[placement] = (m.ulysses_rank, m.ring_rank, list(m.ulysses_ranks), list(m.ring_ranks),
                          m.ring_prev, m.ring_next)
    dm = init_device_mesh("cpu", (2, 2), mesh_dim_names=("sp_r", "sp_u"))
    m = distattn.SPMesh.from_device_mesh(dm, ulysses_dim="sp_u", ring_dim="sp_r")
    res["device_mesh"] = (m.ulysses_rank, m.ring_rank, list(m.ulysses_ranks), list(m.ring_ranks),
                          m.ring_prev, m.ring_next, m.placement)
    # The device-mesh mesh computes the same attention as the built one.
    case = Case(world, 2, 2, "ulysses_inner", "zigzag", True, 8, 2, 32, 1, "fp64", "torch")
    res["device_mesh_attention"] = run_case(case, m)
    # A plain (dp, sp) mesh: each dp replica's "sp" dimension is its own SP group (found by
    # name, or named with sp_dim=), a ring or split by ulysses_degree.
    dp_sp = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "sp"))
    m = distattn.SPMesh.from_device_mesh(dp_sp)
    res["dp_sp"] = (m.ulysses_degree, m.ring_degree, list(m.ring_ranks))
    one = init_device_mesh("cpu", (1, 4), mesh_dim_names=("data", "context"))
    m = distattn.SPMesh.from_device_mesh(one, sp_dim="context", ulysses_degree=2)
    res["sp_dim"] = (m.ulysses_degree, m.ring_degree, list(m.ulysses_ranks), list(m.ring_ranks))
    res["sp_dim_attention"] = run_case(case, m)
    return res


def run_profile_check(rank: int, world: int) -> dict:
    """A StepProfiler records compute and wait for every step of both passes and schedules,
    without changing the result."""
    from distattn.profile import StepProfiler

    res = {}
    for schedule in ("ring", "helper", "allgather"):
        prof = StepProfiler()
        q = torch.randn(1, 4, 2, 8, dtype=torch.float64, requires_grad=True)
        out = distattn.dist_flash_attn(q, q, q, causal=True, schedule=schedule, profiler=prof)
        plain = distattn.dist_flash_attn(q, q, q, causal=True, schedule=schedule)
        out.sum().backward()
        res[schedule] = {"rows": prof.summary(), "same": torch.equal(out, plain)}
    return res


def run_ulysses_collectives(rank: int, world: int) -> dict:
    """seq_to_heads / heads_to_seq: layout of the result, inverse of each other, and their
    gradients (by autograd through the collectives) equal the single-process ones."""
    from distattn.ulysses import heads_to_seq, seq_to_heads

    mesh = distattn.SPMesh.build(ulysses_degree=world)
    gen = torch.Generator().manual_seed(5)
    full = torch.randn(2, 3 * world, 2 * world, 4, generator=gen, dtype=torch.float64)
    weight = torch.randn(full.shape, generator=gen, dtype=torch.float64)
    x = distattn.shard(full, mesh, dim=1).clone().requires_grad_()
    h = seq_to_heads(x, mesh)
    heads = slice(rank * 2, rank * 2 + 2)
    layout_ok = torch.equal(h, full[:, :, heads])
    back = heads_to_seq(h, mesh)
    # a loss that depends on the head shard; its gradient w.r.t. x is weight on our tokens' heads
    (h * weight[:, :, heads]).sum().backward()
    return {"layout": layout_ok, "inverse": torch.equal(back, x),
            "grad": torch.equal(x.grad, distattn.shard(weight, mesh, dim=1))}
