"""distattn.mixers.gather alone: a sequence mixer run on the gathered sequence equals the same
mixer on one process, forward and backward, fp64 (1e-12), on gloo worlds 2, 3 and 4 (ring,
and Ulysses 2 x ring 2), every layout, lengths the layout divides, any length (one document
with inert padding slots) and one token per rank. The mixers: a causal depthwise conv1d
(Mamba's, LFM2's), a decayed cumulative sum (a linear recurrence, the shape of an SSM scan)
and both in a row, with parameters whose gradients are summed over the group."""
import pytest
import torch

from spawn import run_world

LAYOUTS = ("contiguous", "zigzag", "stripe")
H, K = 6, 4          # channels, conv kernel


def mixer(x, weight, decay):
    """[B, S, H] -> [B, S, H]: causal depthwise conv, then y_t = decay * y_{t-1} + x_t."""
    h = torch.nn.functional.conv1d(x.transpose(1, 2), weight, padding=K - 1,
                                   groups=H)[..., :x.shape[1]].transpose(1, 2)
    out, state = [], torch.zeros_like(h[:, 0])
    for t in range(h.shape[1]):
        state = decay * state + h[:, t]
        out.append(state)
    return torch.stack(out, 1)


def inputs(seq):
    g = torch.Generator().manual_seed(seq)
    x = torch.randn(2, seq, H, generator=g, dtype=torch.float64)
    w = torch.randn(H, 1, K, generator=g, dtype=torch.float64)
    dy = torch.randn(2, seq, H, generator=g, dtype=torch.float64)
    return x, w, dy


def cases(world):
    for u in (1, 2) if world == 4 else (1,):
        for layout in LAYOUTS:
            for seq, padded in ((4 * world, False), (4 * world + 3, True), (world, False)):
                yield u, layout, seq, padded


def run(rank, world):
    import distattn
    from distattn.mixers import gather_sequence, local_part

    meshes, errors, count = {}, [], 0
    for u, layout, seq, padded in cases(world):
        if u not in meshes:
            meshes[u] = distattn.SPMesh.build(ulysses_degree=u)
        mesh = meshes[u]
        cu = (0, seq) if padded else None
        if not padded and seq % distattn.layout.seq_multiple(layout, world // u, u):
            continue
        x, w, dy = inputs(seq)
        fx, fw = x.clone().requires_grad_(), w.clone().requires_grad_()
        ref = mixer(fx, fw, 0.9)
        ref.backward(dy)
        lx = distattn.shard(x, mesh, layout=layout, cu_seqlens=cu).requires_grad_()
        lw = w.clone().requires_grad_()
        out = local_part(mixer(gather_sequence(lx, mesh, layout, cu), lw, 0.9), mesh, layout,
                         cu)
        out.backward(distattn.shard(dy, mesh, layout=layout, cu_seqlens=cu))
        dw = lw.grad.clone()
        torch.distributed.all_reduce(dw)
        tag = f"world {world} u{u} {layout} S={seq}{' padded' if padded else ''}"
        real = distattn.layout.local_indices(seq, mesh, layout, cu) >= 0
        for name, got, want in (
                ("out", out, distattn.shard(ref.detach(), mesh, layout=layout, cu_seqlens=cu)),
                ("dx", lx.grad, distattn.shard(fx.grad, mesh, layout=layout, cu_seqlens=cu))):
            err = (got[:, real] - want[:, real]).abs().max().item() if real.any() else 0.0
            if not err <= 1e-12:
                errors.append(f"{tag}: {name} max error {err:.3g}")
            if not bool((got[:, ~real] == 0).all()):
                errors.append(f"{tag}: {name} is not zero in padding slots")
        err = (dw - fw.grad).abs().max().item()
        if not err <= 1e-12:
            errors.append(f"{tag}: dweight max error {err:.3g}")
        count += 1
    return errors, count


@pytest.mark.parametrize("world", [2, 3, 4])
def test_gathered_mixer_equals_one_process(world):
    results = run_world(world, run)
    for errors, count in results:
        assert not errors, "\n".join(errors)
        assert count >= len(LAYOUTS) * 2
