"""The mask of one block-attention call (DESIGN.md section 2).

A block is a query slice of length Sq meeting a key slice of length Sk. Positions are local to
the block (query row i, key column j, both from 0):

- ``Mask.none()``          every key is visible to every query;
- ``Mask.causal(offset)``  key j is visible to query i iff ``j <= i + offset`` (top-left aligned:
                           offset 0 is the usual diagonal block, -1 the strictly-lower block of
                           the stripe layout);
- ``Mask.empty()``         nothing is visible; the call is skipped.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Mask:
    kind: str  # "none" | "causal" | "empty"
    offset: int = 0

    def __post_init__(self):
        if self.kind not in ("none", "causal", "empty"):
            raise ValueError(f"Mask.kind must be 'none', 'causal' or 'empty', got {self.kind!r}")
        if self.kind != "causal" and self.offset != 0:
            raise ValueError("Mask.offset is only meaningful for causal masks")

    @staticmethod
    def none() -> "Mask":
        return Mask("none")

    @staticmethod
    def causal(offset: int = 0) -> "Mask":
        return Mask("causal", int(offset))

    @staticmethod
    def empty() -> "Mask":
        return Mask("empty")

    def simplify(self, sq: int, sk: int) -> "Mask":
        """The equivalent mask for a (sq x sk) block: a causal mask that hides nothing becomes
        ``none``, one that shows nothing becomes ``empty``."""
        if self.kind != "causal":
            return self
        if sq == 0 or sk == 0 or self.offset <= -sq:
            return Mask.empty()
        if self.offset >= sk - 1:
            return Mask.none()
        return self

    def dense(self, sq: int, sk: int, device=None) -> torch.Tensor:
        """Boolean [sq, sk] tensor, True where the key is visible."""
        if self.kind == "none":
            return torch.ones(sq, sk, dtype=torch.bool, device=device)
        if self.kind == "empty":
            return torch.zeros(sq, sk, dtype=torch.bool, device=device)
        i = torch.arange(sq, device=device).unsqueeze(1)
        j = torch.arange(sk, device=device).unsqueeze(0)
        return j <= i + self.offset

    def __repr__(self) -> str:
        return f"causal({self.offset})" if self.kind == "causal" else self.kind


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax statistics and partial sums are kept in float32, or float64 for float64 inputs
    (so exactness tests can reach 1e-10)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
