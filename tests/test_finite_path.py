"""The ring executor's finite path (docs/DESIGN.md, "Non-finite inputs"): a CPU call whose
inputs are finite on every ring rank skips the sanitized copies and the poisoning, and gives
what the non-finite path gives; one non-finite element on one rank sends every rank of the
ring down the non-finite path (gloo, 2 processes)."""
import pytest
import torch

import distattn.ring as ring
from spawn import run_world


def _inputs(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 24, 4, 8, generator=g, dtype=dtype) for _ in range(4)]


def _call(rank, world, poison_rank, exact):
    """Forward + backward of rank ``rank`` (zigzag causal, ring of ``world``); with
    ``exact`` the non-finite path is forced. Returns the results and the number of
    ``poison_forward_`` calls."""
    import distattn
    from distattn.attention import dist_flash_attn

    calls = []
    real_poison = ring.poison_forward_
    ring.poison_forward_ = lambda *a: (calls.append(1), real_poison(*a))
    if exact:
        ring.host_readable = lambda t: False
    mesh = distattn.SPMesh.build()
    q, k, v, dout = _inputs()
    if poison_rank is not None:
        k[0, 8, 1, 2] = float("nan")        # tokens of rank 1 (zigzag: 6..17), seen
        v[0, 14, 0, 5] = float("inf")       # by rank 0's rows 18..23
    local = [distattn.shard(t, mesh, dim=1, layout="zigzag").clone() for t in (q, k, v, dout)]
    if poison_rank is not None and rank != poison_rank:
        for t in local[:3]:                 # the poison lives on one rank only
            t.nan_to_num_(nan=0.0, posinf=0.0)
    ql, kl, vl = (t.requires_grad_() for t in local[:3])
    out, lse = dist_flash_attn(ql, kl, vl, mesh=mesh, causal=True, layout="zigzag",
                               schedule="ring", backend="torch", return_lse=True)
    out.backward(local[3])
    return {"out": out.detach(), "lse": lse.detach(), "dq": ql.grad, "dk": kl.grad,
            "dv": vl.grad, "poison_calls": len(calls)}


def _both(rank, world, poison_rank):
    return _call(rank, world, poison_rank, False), _call(rank, world, poison_rank, True)


def _same(a, b):
    for name in ("out", "lse", "dq", "dk", "dv"):
        x, y = a[name], b[name]
        assert torch.equal(torch.isnan(x), torch.isnan(y)), name
        assert torch.equal(torch.isinf(x), torch.isinf(y)), name
        fin = torch.isfinite(x)
        torch.testing.assert_close(x[fin], y[fin], rtol=1e-12, atol=1e-12)


@pytest.fixture(scope="module")
def worlds():
    return {p: run_world(2, _both, p) for p in (None, 1)}


def test_finite_inputs_skip_the_poisoning_and_agree(worlds):
    for fast, exact in worlds[None]:
        assert fast["poison_calls"] == 0 and exact["poison_calls"] > 0
        assert all(torch.isfinite(fast[n]).all() for n in ("out", "dq", "dk", "dv"))
        _same(fast, exact)


def test_one_rank_poisoned_sends_the_whole_ring_down_the_exact_path(worlds):
    seen_nan = False
    for fast, exact in worlds[1]:
        assert fast["poison_calls"] > 0      # rank 0's own inputs are finite
        _same(fast, exact)
        seen_nan |= bool(torch.isnan(fast["out"]).any())
    assert seen_nan


def test_one_process_finite_check():
    from distattn.nonfinite import finite_lse, finite_total, host_readable
    q, k, v, _ = _inputs(dtype=torch.float16)
    assert host_readable(q)
    big = torch.full((4096,), 60000.0, dtype=torch.float16)   # fp16 sum would overflow
    assert torch.isfinite(finite_total(q, k, big))
    lse = torch.tensor([[[0.5, float("-inf")]]])
    assert torch.isfinite(finite_total(finite_lse(lse)))
    for bad in (float("nan"), float("inf"), float("-inf")):
        k2 = k.clone()
        k2[0, 1, 2, 3] = bad
        assert not torch.isfinite(finite_total(q, k2))
    assert not torch.isfinite(finite_total(finite_lse(torch.tensor([float("inf")]))))


def _mixed_modes(rank, world):
    """Rank 1 would not read the finite flag on the host (as with DISTATTN_FINITE_CHECK=device
    there): both ranks must raise the same ValueError before any collective, and the next
    call, with the modes agreeing again, must run."""
    import distattn
    import distattn.attention as attention
    from distattn.attention import dist_flash_attn
    mesh = distattn.SPMesh.build()
    q, k, v, _ = (distattn.shard(t, mesh, dim=1, layout="zigzag") for t in _inputs())
    real = attention.host_readable
    if rank == 1:
        attention.host_readable = lambda t: False
    try:
        dist_flash_attn(q, k, v, mesh=mesh, causal=True, layout="zigzag", schedule="ring",
                        backend="torch")
        error = None
    except ValueError as exc:
        error = str(exc)
    attention.host_readable = real
    out = dist_flash_attn(q, k, v, mesh=mesh, causal=True, layout="zigzag", schedule="ring",
                          backend="torch")
    return error, bool(torch.isfinite(out).all())


def test_ranks_that_read_the_finite_flag_differently_all_raise():
    for error, finite in run_world(2, _mixed_modes):
        assert error is not None and "finite_check_on_host" in error
        assert finite
