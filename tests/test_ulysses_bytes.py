"""The Ulysses backward of the autograd path sends only dout (sequence -> heads) and dq, dK,
dV (heads -> sequence): q, K/V, out and lse stay head-sharded from the forward. Bytes counted
with ``count_sent_bytes`` on gloo worlds, exactly; fp64 gradients equal the explicit
``dist_flash_attn_backward`` (which converts everything) and the dense reference at 1e-12."""
import os

import pytest

from spawn import run_world

# (hq, hkv, dv): even, K/V heads repeated (hkv < U), uneven heads (the all_to_all_v path),
# and V's head dim differing from K's (also the all_to_all_v path); sinks on the last.
CASES = {2: ((4, 2, 8, False), (4, 1, 8, False), (3, 3, 8, False), (4, 2, 6, True)),
         4: ((8, 2, 8, False), (6, 6, 8, True))}


def _a2a(nbytes: int, world: int) -> int:
    """What ``count_sent_bytes`` counts for one all-to-all of a ``nbytes`` send buffer."""
    return nbytes * (world - 1) // world


def _run(rank: int, world: int, cases) -> dict:
    import torch

    import distattn
    from dist_cases import dense_attention, visibility
    from distattn.attention import dist_flash_attn_backward
    from distattn.inference import count_sent_bytes
    from distattn.ulysses import head_split

    os.environ["DISTATTN_CHECK"] = "0"        # agree once (warm-up), then count the a2a only
    mesh = distattn.SPMesh.build(ulysses_degree=world)
    B, n, D = 2, 4, 8
    S = n * world
    results = {}
    for hq, hkv, dv, with_sinks in cases:
        gen = torch.Generator().manual_seed(hq * 100 + hkv * 10 + dv)
        q = torch.randn(B, S, hq, D, generator=gen, dtype=torch.float64)
        k = torch.randn(B, S, hkv, D, generator=gen, dtype=torch.float64)
        v = torch.randn(B, S, hkv, dv, generator=gen, dtype=torch.float64)
        dout = torch.randn(B, S, hq, dv, generator=gen, dtype=torch.float64)
        sinks = torch.randn(hq, generator=gen, dtype=torch.float64) if with_sinks else None
        kw = dict(mesh=mesh, causal=True, layout="zigzag", sinks=sinks)
        ql, kl, vl, dl = (distattn.shard(t, mesh, dim=1, layout="zigzag")
                          for t in (q, k, v, dout))

        def step():
            leaves = [t.clone().requires_grad_() for t in (ql, kl, vl)]
            sl = None if sinks is None else sinks.clone().requires_grad_()
            out, lse = distattn.dist_flash_attn(*leaves, return_lse=True, **{**kw, "sinks": sl})
            with count_sent_bytes() as wire:
                out.backward(dl)
            grads = [t.grad for t in leaves] + ([] if sl is None else [sl.grad])
            return out.detach(), lse, grads, wire["bytes"]

        step()                                 # warm-up: the agreement of these fields
        out, lse, grads, sent = step()
        with count_sent_bytes() as wire:
            explicit = dist_flash_attn_backward(dl, ql, kl, vl, out, lse, **kw)
        # the formula: dout's send buffer, then dq and dK/dV as the head-sharded side has them
        split = head_split(hq, hkv, world)
        kv_heads = (len(split.kv_index[rank]) if not split.even or dv != D
                    else max(hkv, world) // world)
        q_heads = split.q_bounds[rank][1] - split.q_bounds[rank][0]
        expected = _a2a(dl.numel() * 8, world)
        if split.even and dv == D:             # dq, then dK and dV stacked
            expected += _a2a(B * S * q_heads * D * 8, world)
            expected += _a2a(B * S * kv_heads * (D + dv) * 8, world)
        else:                                  # one all_to_all_v of dq, dK, dV
            expected += _a2a(B * S * (q_heads * D + kv_heads * (D + dv)) * 8, world)

        ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
        ref_out, _ = dense_attention(*ref_in, visibility(S, causal=True), sinks=sinks)
        ref = [distattn.shard(g, mesh, dim=1, layout="zigzag")
               for g in torch.autograd.grad(ref_out, ref_in, dout)]
        rel = lambda a, b: ((a - b).abs().max() / b.abs().max()).item()
        results[(hq, hkv, dv, with_sinks)] = dict(
            sent=sent, expected=expected, explicit_sent=wire["bytes"],
            vs_explicit=max(rel(g, e) for g, e in zip(grads, explicit)),   # dsinks too
            vs_dense=max(rel(g, r) for g, r in zip(grads, ref)))
    return results


@pytest.mark.parametrize("world", sorted(CASES))
def test_ulysses_backward_sends_only_dout_and_grads(world):
    for rank, res in enumerate(run_world(world, _run, CASES[world])):
        for case, r in res.items():
            where = f"rank {rank}, (hq, hkv, dv, sinks) = {case}"
            assert r["sent"] == r["expected"], f"{where}: sent {r['sent']} != {r['expected']}"
            assert r["sent"] < r["explicit_sent"], where
            assert r["vs_explicit"] <= 1e-12, f"{where}: {r['vs_explicit']:.3e}"
            assert r["vs_dense"] <= 1e-12, f"{where}: {r['vs_dense']:.3e}"
