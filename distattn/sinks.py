"""Attention sinks: one extra logit per head in the softmax denominator, attached to no value
(gpt-oss). With sink logit s_h, a row's attention over its visible keys becomes

    lse' = log(exp(lse) + exp(s_h)),     out' = out * exp(lse - lse')

where (out, lse) is the ordinary result over the keys. The sink is folded in once, after all
blocks are merged (``fold_sinks_``, in the accumulation dtype). A row that sees no key keeps
lse = -inf and out = 0 (padding stays inert).

Backward: with the final (out', lse'), the usual block backward is exact for q, k and v (the
sink is one more softmax entry whose value is 0). The sink's own gradient is
``dL/ds_h = -sum_i exp(s_h - lse'_i) * (dout_i . out'_i)`` over the rows i of head h
(``sinks_grad``); each rank returns the part of its own rows, so summing it over the SP group
gives the single-device gradient, as for every replicated parameter.
"""
from __future__ import annotations

import torch


def fold_sinks_(out_acc: torch.Tensor, lse_acc: torch.Tensor, sinks: torch.Tensor) -> None:
    """out_acc [B, S, H, D], lse_acc [B, H, S] (accumulators, in place); sinks [H]."""
    s = sinks.detach().to(lse_acc.dtype).view(1, -1, 1)
    seen = torch.isfinite(lse_acc)
    new_lse = torch.where(seen, torch.logaddexp(lse_acc, s), lse_acc)
    weight = torch.where(seen, torch.exp(lse_acc - new_lse), torch.zeros_like(lse_acc))
    out_acc.mul_(weight.transpose(1, 2).unsqueeze(-1))
    lse_acc.copy_(new_lse)


def sinks_grad(dout: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
               sinks: torch.Tensor) -> torch.Tensor:
    """This rank's part of dL/dsinks [H] in sinks' dtype: dout, out [B, S, H, D] (final, sink
    folded in), lse [B, H, S] (final)."""
    acc = lse.dtype
    s = sinks.detach().to(acc).view(1, -1, 1)
    p_sink = torch.where(torch.isfinite(lse), torch.exp(s - lse), torch.zeros_like(lse))
    dot = (dout.to(acc) * out.to(acc)).sum(-1).transpose(1, 2)       # [B, H, S]
    return (-(p_sink * dot).sum(dim=(0, 2))).to(sinks.dtype)
