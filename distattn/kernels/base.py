"""The block-attention backend contract (docs/DESIGN.md, "Backends").

Shapes (flash-attn layout): q [B, Sq, Hq, D]; k, v [B, Sk, Hkv, D] with Hq % Hkv == 0; query
head h reads key/value head h // (Hq // Hkv). K/V are never expanded to Hq heads.

- ``forward(q, k, v, scale=, mask=, softcap=0.0) -> (out, lse)``: out [B, Sq, Hq, D] in q's
  dtype; lse [B, Hq, Sq], natural log, float32 (float64 for float64 inputs). A row that sees no
  key has lse = -inf and out = 0.
- ``backward(dout, q, k, v, out, lse, scale=, mask=, softcap=0.0) -> (dq, dk, dv)``: ``out``
  and ``lse`` are the *final* attention output and lse of these queries over all keys they see
  (not only this block's); that makes the block's gradients exact pieces of the full gradient,
  so a ring only has to add them up. Gradients may come back in any floating dtype.
- ``forward_into`` / ``backward_into``: the ring step. They fold one block into running
  accumulators (out_acc, lse_acc in the accumulation dtype; dq/dk/dv accumulators likewise),
  which may be strided views.
- ``softcap`` c > 0 turns each score s = scale * q.k into c * tanh(s / c) before the softmax;
  0 means off.

A ``Mask`` is a tuple of band pieces (``kernels/mask.py``). This class runs the pieces one by
one on the piece's smallest rectangle, so a backend only implements the *single-piece* calls
``forward_piece`` / ``backward_piece`` (mask: ``none``, ``causal(offset)`` or ``band(lo, hi)``
over its whole block), and optionally fused ``forward_piece_into`` / ``backward_piece_into``.
Query rows and keys outside every piece are never read, so padding slots may hold anything.
"""
from __future__ import annotations

import torch

from ..merge import merge_, new_accumulators
from .mask import Mask, Piece, accumulation_dtype


def piece_blocks(mask: Mask, sq: int, sk: int):
    """Each piece of ``mask`` (an sq x sk block) as (rows, cols, sub_mask): the slices of its
    smallest rectangle and the single-piece mask over that rectangle."""
    for p in mask.simplify(sq, sk).pieces:
        q0, q1, k0, k1 = p.tight(sq, sk)
        band = p.shifted(q0, k0)
        sub = Mask((Piece(lo=band.lo, hi=band.hi),)).simplify(q1 - q0, k1 - k0)
        if sub.pieces:
            yield slice(q0, q1), slice(k0, k1), sub


def band_tiles(mask: Mask, sq: int, sk: int, min_rows: int = 64):
    """A single-piece ``band(lo, hi)`` mask cut into row tiles of about the band's width, each
    as (rows, cols, sub_mask) on its smallest rectangle: work and memory then grow with
    Sq x width, not Sq x Sk. Other masks come back whole."""
    p = mask.simplify(sq, sk).pieces[0] if mask.simplify(sq, sk).pieces else None
    if p is None or p.lo is None or p.hi is None:
        yield slice(0, sq), slice(0, sk), mask
        return
    step = max(min_rows, p.hi - p.lo + 1)
    for r0 in range(0, sq, step):
        rows = slice(r0, min(sq, r0 + step))
        yield from ((slice(rows.start + a.start, rows.start + a.stop), b, m)
                    for a, b, m in piece_blocks(mask.restrict(rows, slice(0, sk)),
                                                rows.stop - rows.start, sk))


class BlockAttention:
    name = "abstract"
    supports_bands = True     # pieces with a lower diagonal bound (sliding windows)
    supports_softcap = True

    def check(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Raise ValueError/TypeError naming the argument when this backend cannot run them."""

    # -- what a backend implements: one piece over its whole block ----------------------------
    def forward_piece(self, q, k, v, *, scale: float, mask: Mask, softcap: float = 0.0):
        raise NotImplementedError

    def backward_piece(self, dout, q, k, v, out, lse, *, scale: float, mask: Mask,
                       softcap: float = 0.0):
        raise NotImplementedError

    def forward_piece_into(self, q, k, v, out_acc, lse_acc, *, scale, mask, softcap=0.0):
        out, lse = self.forward_piece(q, k, v, scale=scale, mask=mask, softcap=softcap)
        merge_(out_acc, lse_acc, out, lse)

    def backward_piece_into(self, dout, q, k, v, out, lse, dq_acc, dk_acc, dv_acc, *,
                            scale, mask, softcap=0.0):
        dq, dk, dv = self.backward_piece(dout, q, k, v, out, lse, scale=scale, mask=mask,
                                         softcap=softcap)
        dq_acc.add_(dq)
        dk_acc.add_(dk)
        dv_acc.add_(dv)

    # -- the contract: any mask ---------------------------------------------------------------
    def forward(self, q, k, v, *, scale: float, mask: Mask, softcap: float = 0.0):
        sq, sk = q.shape[1], k.shape[1]
        blocks = list(piece_blocks(mask, sq, sk))
        if len(blocks) == 1 and blocks[0][0] == slice(0, sq) and blocks[0][1] == slice(0, sk):
            return self.forward_piece(q, k, v, scale=scale, mask=blocks[0][2], softcap=softcap)
        acc = accumulation_dtype(q.dtype)
        out, lse = new_accumulators(q, acc, v.shape[-1])
        self._pieces_into(blocks, q, k, v, out, lse, scale, softcap)
        return out.to(q.dtype), lse

    def forward_into(self, q, k, v, out_acc, lse_acc, *, scale: float, mask: Mask,
                     softcap: float = 0.0) -> None:
        blocks = piece_blocks(mask, q.shape[1], k.shape[1])
        self._pieces_into(blocks, q, k, v, out_acc, lse_acc, scale, softcap)

    def _pieces_into(self, blocks, q, k, v, out_acc, lse_acc, scale, softcap):
        for rows, cols, sub in blocks:
            self.forward_piece_into(q[:, rows], k[:, cols], v[:, cols], out_acc[:, rows],
                                    lse_acc[:, :, rows], scale=scale, mask=sub,
                                    softcap=softcap)

    def backward(self, dout, q, k, v, out, lse, *, scale: float, mask: Mask,
                 softcap: float = 0.0):
        acc = accumulation_dtype(q.dtype)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        dk = torch.zeros(k.shape, dtype=acc, device=q.device)
        dv = torch.zeros(v.shape, dtype=acc, device=q.device)
        self.backward_into(dout, q, k, v, out, lse, dq, dk, dv, scale=scale, mask=mask,
                           softcap=softcap)
        return dq, dk, dv

    def backward_into(self, dout, q, k, v, out, lse, dq_acc, dk_acc, dv_acc, *,
                      scale: float, mask: Mask, softcap: float = 0.0) -> None:
        for rows, cols, sub in piece_blocks(mask, q.shape[1], k.shape[1]):
            self.backward_piece_into(
                dout[:, rows], q[:, rows], k[:, cols], v[:, cols], out[:, rows],
                lse[:, :, rows], dq_acc[:, rows], dk_acc[:, cols], dv_acc[:, cols],
                scale=scale, mask=sub, softcap=softcap)


def empty_result(q: torch.Tensor, lse_dtype: torch.dtype, dv: int | None = None):
    """(out, lse) of a block in which no query sees any key; out has V's head dim ``dv``
    (default q's)."""
    b, sq, hq, d = q.shape
    out = q.new_zeros(b, sq, hq, d if dv is None else dv)
    lse = torch.full((b, hq, sq), float("-inf"), dtype=lse_dtype, device=q.device)
    return out, lse
