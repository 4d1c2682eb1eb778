"""The opt-in fused merge (``merge.fused_merge_``, torch.compile / inductor) against the eager
merge on CPU: same values to rounding, the same -inf and NaN pattern, float32 and float64,
strided accumulator views. (On CUDA it is unverified: no GPU here; it is off by default.)"""
from __future__ import annotations

import pytest
import torch

from distattn import merge


def _case(acc, blk, g):
    b, s, h, d = 2, 37, 3, 8
    out_acc = torch.randn(b, s + 5, h, d, generator=g, dtype=acc)[:, 5:]   # strided views
    lse_acc = (torch.randn(b, h, s + 5, generator=g, dtype=acc) * 4)[:, :, 5:]
    out_blk = torch.randn(b, s, h, d, generator=g).to(blk)
    lse_blk = (torch.randn(b, h, s, generator=g) * 4).to(blk)
    inf, nan = float("inf"), float("nan")
    lse_acc[0, 0, :6] = -inf          # accumulator empty
    lse_blk[0, 0, 4:10] = -inf        # block empty (both empty at 4, 5)
    lse_acc[1, 1, 3] = nan
    lse_blk[1, 2, 5] = nan
    out_blk[1, 7, 0, 2] = nan
    return out_acc, lse_acc, out_blk, lse_blk


@pytest.mark.parametrize("acc,blk", [(torch.float32, torch.float32),
                                     (torch.float32, torch.bfloat16),
                                     (torch.float64, torch.float64)])
def test_fused_merge_matches_eager(acc, blk):
    from torch._inductor import metrics
    torch._dynamo.reset()
    merge._compiled = None
    g = torch.Generator().manual_seed(0)
    for i in range(2):                # a second call reuses the compiled kernel
        out_acc, lse_acc, out_blk, lse_blk = _case(acc, blk, g)
        want = out_acc.clone(), lse_acc.clone()
        merge._merge_math(*want, out_blk, lse_blk)
        metrics.reset()
        merge.fused_merge_(out_acc, lse_acc, out_blk, lse_blk)
        if i == 0:      # fewer than the eager 8 (2-3 on CPU with torch 2.13, by strides)
            assert 0 < metrics.generated_kernel_count < 8
        for got, ref in zip((out_acc, lse_acc), want):
            assert torch.equal(got.isnan(), ref.isnan())
            assert torch.equal(got.isneginf(), ref.isneginf())
            assert torch.equal(got.isposinf(), ref.isposinf())
            ok = ref.isfinite()
            eps = torch.finfo(acc).eps
            torch.testing.assert_close(got[ok], ref[ok], rtol=8 * eps, atol=8 * eps)


def test_fused_merge_switch(monkeypatch):
    """Off unless DISTATTN_FUSED_MERGE=1; on, an eager merge_ runs the fused one, a traced
    one (here: under a dispatch mode) the eager formula."""
    import os
    from torch.utils._python_dispatch import TorchDispatchMode
    assert merge.FUSED == (os.environ.get("DISTATTN_FUSED_MERGE", "0") == "1")
    calls = []
    monkeypatch.setattr(merge, "fused_merge_", lambda *a: calls.append(a))
    args = _case(torch.float32, torch.float32, torch.Generator().manual_seed(1))
    monkeypatch.setattr(merge, "FUSED", False)
    merge.merge_(*args)
    assert not calls
    monkeypatch.setattr(merge, "FUSED", True)
    merge.merge_(*args)
    assert len(calls) == 1

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))
    with Mode():
        merge.merge_(*args)
    assert len(calls) == 1
