"""The block-attention backend contract (DESIGN.md section 2).

Shapes (flash-attn layout): q [B, Sq, Hq, D]; k, v [B, Sk, Hkv, D] with Hq % Hkv == 0; query
head h reads key/value head h // (Hq // Hkv). K/V are never expanded to Hq heads.

- ``forward(q, k, v, scale=, mask=) -> (out, lse)``: out [B, Sq, Hq, D] in q's dtype; lse
  [B, Hq, Sq], natural log, float32 (float64 for float64 inputs). A row that sees no key has
  lse = -inf and out = 0.
- ``backward(dout, q, k, v, out, lse, scale=, mask=) -> (dq, dk, dv)``: ``out`` and ``lse``
  are the *final* attention output and lse of these queries over all keys they see (not only
  this block's); that makes the block's gradients exact pieces of the full gradient, so a ring
  only has to add them up. Gradients may come back in any floating dtype.
- ``forward_into`` / ``backward_into``: the ring step. They fold one block into running
  accumulators (out_acc, lse_acc in the accumulation dtype; dq/dk/dv accumulators likewise),
  which may be strided views. The defaults call forward/backward and merge or add; a backend
  with fused kernels overrides them to do it in one launch.
"""
from __future__ import annotations

import torch

from ..merge import merge_
from .mask import Mask


class BlockAttention:
    name = "abstract"

    def check(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Raise ValueError/TypeError naming the argument when this backend cannot run them."""

    def forward(self, q, k, v, *, scale: float, mask: Mask):
        raise NotImplementedError

    def backward(self, dout, q, k, v, out, lse, *, scale: float, mask: Mask):
        raise NotImplementedError

    def forward_into(self, q, k, v, out_acc, lse_acc, *, scale: float, mask: Mask) -> None:
        mask = mask.simplify(q.shape[1], k.shape[1])
        if mask.kind == "empty":
            return
        out, lse = self.forward(q, k, v, scale=scale, mask=mask)
        merge_(out_acc, lse_acc, out, lse)

    def backward_into(self, dout, q, k, v, out, lse, dq_acc, dk_acc, dv_acc, *,
                      scale: float, mask: Mask) -> None:
        mask = mask.simplify(q.shape[1], k.shape[1])
        if mask.kind == "empty":
            return
        dq, dk, dv = self.backward(dout, q, k, v, out, lse, scale=scale, mask=mask)
        dq_acc.add_(dq)
        dk_acc.add_(dk)
        dv_acc.add_(dv)


def empty_result(q: torch.Tensor, lse_dtype: torch.dtype):
    """(out, lse) of a block in which no query sees any key."""
    b, sq, hq, _ = q.shape
    out = torch.zeros_like(q)
    lse = torch.full((b, hq, sq), float("-inf"), dtype=lse_dtype, device=q.device)
    return out, lse
