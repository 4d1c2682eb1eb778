"""Online-softmax merge of partial attention results (docs/DESIGN.md, "Merge and sinks").

Two partial results over disjoint key sets, (out_a, lse_a) and (out_b, lse_b), combine into
the result over the union:

    m   = max(lse_a, lse_b)
    lse = m + log(exp(lse_a - m) + exp(lse_b - m))
    out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse)

computed in the accumulators' dtype (float32, or float64 for float64 inputs). A side with
lse = -inf (it saw no key) contributes weight exactly 0; when both are -inf the result stays
lse = -inf, out unchanged (zero). No NaN can come out of an empty row.

Shapes: out [B, S, H, D], lse [B, H, S]. The CUDA backend has the same operation as a kernel.
"""
from __future__ import annotations

import os

import torch

from .kernels.device_cache import tracing


def merge_(out_acc: torch.Tensor, lse_acc: torch.Tensor, out_blk: torch.Tensor,
           lse_blk: torch.Tensor) -> None:
    """Fold (out_blk, lse_blk) into the accumulators in place. The accumulators may be strided
    views; ``out_blk`` and ``lse_blk`` may have a lower precision than the accumulators.

    Seven elementwise kernels: the two lse side by side ([2, B, H, S], converting the block's
    to the accumulators' dtype on the way), ``logaddexp`` -- the guarded update itself (max +
    log1p(exp(-|d|)), exact for -inf on either side and -inf when both are), written straight
    into ``lse_acc`` --, the shift (lse clamped to the dtype's lowest finite value, so that
    where both sides are -inf both weights are exp(-inf) = 0), both weights exp(lse_side -
    shift) in one kernel (normalised by construction) and the two updates of out. NaN
    propagates (a NaN lse makes the row's out and lse NaN), and an infinite out keeps its
    sign (positive weights: ``nonfinite.py`` relies on it; a lerp would not).

    With ``DISTATTN_FUSED_MERGE=1`` (read at import) an eager call runs ``fused_merge_``
    instead: the same formula compiled by torch.compile (opt-in, see its docstring)."""
    if FUSED and not tracing():
        return fused_merge_(out_acc, lse_acc, out_blk, lse_blk)
    _merge_math(out_acc, lse_acc, out_blk, lse_blk)


def _merge_math(out_acc, lse_acc, out_blk, lse_blk) -> None:
    if torch.promote_types(lse_acc.dtype, lse_blk.dtype) != lse_acc.dtype:
        lse_blk = lse_blk.to(lse_acc.dtype)           # a wider block lse: as before, cast down
    both = torch.stack((lse_acc, lse_blk))            # [2, B, H, S], the accumulators' dtype
    if torch.compiler.is_compiling():                 # dynamo refuses a strided out=
        lse_acc.copy_(torch.logaddexp(both[0], both[1]))
    else:
        torch.logaddexp(both[0], both[1], out=lse_acc)
    shift = lse_acc.clamp_min(torch.finfo(lse_acc.dtype).min)
    w = torch.exp(both - shift).transpose(2, 3).unsqueeze(-1)          # [2, B, S, H, 1]
    out_acc.mul_(w[0]).addcmul_(out_blk, w[1])


def _merge_per_side(out_acc, lse_acc, out_blk, lse_blk) -> None:
    """``_merge_math`` with each side's weight computed on its own (the same elementwise ops
    on the same values, so the same results eagerly): the form inductor fuses into 2 kernels
    (one over the lse rows, one over out), where the stacked one gives 5. Compiled only."""
    lse_blk = lse_blk.to(lse_acc.dtype)
    new_lse = torch.logaddexp(lse_acc, lse_blk)
    shift = new_lse.clamp_min(torch.finfo(new_lse.dtype).min)
    w_acc = torch.exp(lse_acc - shift).transpose(1, 2).unsqueeze(-1)   # [B, S, H, 1]
    w_blk = torch.exp(lse_blk - shift).transpose(1, 2).unsqueeze(-1)
    out_acc.mul_(w_acc).addcmul_(out_blk, w_blk)
    lse_acc.copy_(new_lse)


FUSED = os.environ.get("DISTATTN_FUSED_MERGE", "0") == "1"
_compiled = None


def fused_merge_(out_acc: torch.Tensor, lse_acc: torch.Tensor, out_blk: torch.Tensor,
                 lse_blk: torch.Tensor) -> None:
    """``merge_``'s formula (``_merge_per_side``: the same ops in the accumulators' dtype, the
    same -inf/NaN guards) compiled with ``torch.compile`` (inductor, dynamic shapes): on CPU
    inductor generates 2 C++ kernels for it (one over the lse rows, one over out; 3 for
    some strided views; ``torch._inductor.metrics``, torch 2.13), on CUDA it would generate Triton kernels the same way.
    Compiled on first use (seconds), recompiled for new stride patterns. Results agree with the eager merge to
    rounding (inductor's exp and its fused multiply-adds may differ by an ulp), with the same
    -inf and NaN pattern (tests/test_merge_fused.py, CPU float32/float64).

    OPT-IN and UNVERIFIED ON CUDA: it has only run on CPU here (no GPU), so it is off by
    default everywhere (``DISTATTN_FUSED_MERGE=1`` turns it on for every torch-side merge,
    torch backend included; the cuda backend has its own merge kernel)."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(_merge_per_side, dynamic=True, fullgraph=True)
    _compiled(out_acc, lse_acc, out_blk, lse_blk)


def new_accumulators(q: torch.Tensor, acc_dtype: torch.dtype, dv: int | None = None):
    """Empty running result for queries q [B, S, H, D]: out [B, S, H, Dv] = 0 (Dv: V's head
    dim, default D), lse = -inf."""
    b, s, h, d = q.shape
    d = d if dv is None else dv
    out = torch.zeros(b, s, h, d, dtype=acc_dtype, device=q.device)
    lse = torch.full((b, h, s), float("-inf"), dtype=acc_dtype, device=q.device)
    return out, lse
