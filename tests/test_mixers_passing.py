"""distattn.mixers.passing alone: a causal mixer run on each rank's part with the halo and the
state handed down the sequence equals the same mixer on one process, forward and backward,
fp64 (1e-12), on gloo worlds 2, 3, 4 and 8 (ring; Ulysses 2 x ring 2 and 2 x 4), with 1, 2
and 5 tokens per rank (fewer than the conv's halo, too). The mixer: a causal depthwise
conv1d (Mamba's, LFM2's) then a decayed linear recurrence (the shape of an SSM scan), whose
parameters' gradients are summed over the group; both forms of the halo: exchanged at once
(``exchange_halo``, a rank's tokens cover the halo) and chained with the state
(``receive_from_previous`` / ``send_to_next``)."""
import pytest
import torch

from spawn import run_world

H, K = 6, 4          # channels, conv kernel


def conv(x, weight, halo):
    """[B, S, H] with the K - 1 inputs before it ([B, K-1, H]) -> [B, S, H]."""
    full = torch.cat([halo, x], 1)
    return torch.nn.functional.conv1d(full.transpose(1, 2), weight,
                                      groups=H).transpose(1, 2)


def scan(h, decay, state):
    """y_t = decay * y_{t-1} + h_t from y_{-1} = state: ([B, S, H], final [B, H])."""
    out = []
    for t in range(h.shape[1]):
        state = decay * state + h[:, t]
        out.append(state)
    return torch.stack(out, 1), state


def mixer(x, weight, decay):
    zeros = x.new_zeros(x.shape[0], K - 1, x.shape[2])
    return scan(conv(x, weight, zeros), decay, x.new_zeros(x.shape[0], x.shape[2]))[0]


def inputs(seq):
    g = torch.Generator().manual_seed(seq)
    x = torch.randn(2, seq, H, generator=g, dtype=torch.float64)
    w = torch.randn(H, 1, K, generator=g, dtype=torch.float64)
    d = torch.rand(H, generator=g, dtype=torch.float64)
    dy = torch.randn(2, seq, H, generator=g, dtype=torch.float64)
    return x, w, d, dy


def sp_mixer(x, weight, decay, mesh, exchange):
    """The mixer on this rank's part: the halo exchanged at once (``exchange``, needs
    S_local >= K - 1) or chained with the state."""
    from distattn.mixers.passing import exchange_halo, receive_from_previous, send_to_next
    if exchange:
        halo = exchange_halo(x[:, -(K - 1):], mesh)
        (state,) = receive_from_previous(x, 1, mesh)
    else:
        halo, state = receive_from_previous(x, 2, mesh)
        if halo is None:
            halo = x.new_zeros(x.shape[0], K - 1, x.shape[2])
    state = x.new_zeros(x.shape[0], x.shape[2]) if state is None else state
    y, final = scan(conv(x, weight, halo), decay, state)
    tail = None if exchange else torch.cat([halo, x], 1)[:, -(K - 1):]
    return send_to_next(y, [final] if exchange else [tail, final], mesh)


def cases(world):
    for u in (1, 2) if world in (4, 8) else (1,):
        for per_rank in (1, 2, 5):
            for exchange in (False, True) if per_rank >= K - 1 else (False,):
                yield u, per_rank, exchange


def run(rank, world):
    import distattn

    meshes, errors, count = {}, [], 0
    for u, per_rank, exchange in cases(world):
        if u not in meshes:
            meshes[u] = distattn.SPMesh.build(ulysses_degree=u)
        mesh = meshes[u]
        seq = per_rank * world
        x, w, d, dy = inputs(seq)
        fx, fw, fd = (t.clone().requires_grad_() for t in (x, w, d))
        ref = mixer(fx, fw, fd)
        ref.backward(dy)
        lx = distattn.shard(x, mesh).requires_grad_()
        lw, ld = w.clone().requires_grad_(), d.clone().requires_grad_()
        out = sp_mixer(lx, lw, ld, mesh, exchange)
        out.backward(distattn.shard(dy, mesh))
        for p in (lw, ld):
            torch.distributed.all_reduce(p.grad)
        want = {"out": distattn.shard(ref.detach(), mesh), "dx": distattn.shard(fx.grad, mesh),
                "dw": fw.grad, "dd": fd.grad}
        got = {"out": out.detach(), "dx": lx.grad, "dw": lw.grad, "dd": ld.grad}
        for name in want:
            err = (got[name] - want[name]).abs().max().item()
            if not err <= 1e-12:
                errors.append((u, per_rank, exchange, name, err))
        count += 1
    return count, errors


@pytest.mark.parametrize("world", (2, 3, 4, 8))
def test_state_passing_matches_one_process(world):
    results = run_world(world, run)
    expected = len(list(cases(world)))
    for rank, (count, errors) in enumerate(results):
        assert count == expected, (rank, count)
        assert not errors, (rank, errors)
