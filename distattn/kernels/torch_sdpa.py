"""``torch`` backend: PyTorch's own fused attention kernels that return the LSE.

- CPU: ``aten._scaled_dot_product_flash_attention_for_cpu`` (+ ``_backward``), any float dtype.
- CUDA: ``aten._scaled_dot_product_flash_attention`` (+ ``_backward``), fp16 and bf16, head_dim
  a multiple of 8 up to 256. Other CUDA dtypes have no fused ATen kernel that returns the LSE:
  ``check`` refuses them, and ``backend="auto"`` uses the reference backend there.

The base class runs a mask's pieces one by one (documents, padding and layouts become pieces).
The ATen kernels know one mask beyond ``none``: causal on a square block. Every
``causal(offset)`` piece is therefore cut into at most three parts (``causal_pieces``): rows
that see nothing, a rectangle every remaining row sees entirely, and a square causal diagonal.
Square causal blocks are the same under top-left and bottom-right alignment, so the result does
not depend on which convention a kernel version uses. GQA runs one call per query-head group
(``Hq // Hkv`` calls on ``Hkv`` heads each): K/V are never expanded.

What the ATen kernels cannot express -- a band with a lower bound (sliding windows) and
softcap -- runs on the reference math for that piece only (``ReferenceBackend``).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..merge import merge_, new_accumulators
from .base import BlockAttention, empty_result
from .mask import Mask, accumulation_dtype
from .reference import ReferenceBackend

aten = torch.ops.aten


class Piece(NamedTuple):
    q0: int
    q1: int
    k0: int
    k1: int
    causal: bool  # True: square causal diagonal (q1 - q0 == k1 - k0)


def causal_pieces(mask: Mask, sq: int, sk: int) -> list[Piece]:
    """Cut an (sq x sk) block under ``mask`` into rectangles and square causal diagonals that
    together cover exactly the visible (query, key) pairs, each once."""
    mask = mask.simplify(sq, sk)
    if mask.kind == "empty":
        return []
    if mask.kind == "none":
        return [Piece(0, sq, 0, sk, False)]
    o = mask.offset
    first = max(0, -o)              # rows before this see nothing
    diag_k0 = first + o             # key on the diagonal of row `first`
    n_diag = min(sq - first, sk - diag_k0)
    pieces = []
    if diag_k0 > 0:                 # keys left of the diagonal: seen by every remaining row
        pieces.append(Piece(first, sq, 0, diag_k0, False))
    pieces.append(Piece(first, first + n_diag, diag_k0, diag_k0 + n_diag, True))
    if first + n_diag < sq:         # rows below the diagonal's end see all remaining keys
        pieces.append(Piece(first + n_diag, sq, diag_k0, sk, False))
    return pieces


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """[B, S, H, D] -> contiguous [B, H, S, D], the layout the ATen kernels take."""
    return x.transpose(1, 2).contiguous()


class TorchBackend(BlockAttention):
    name = "torch"

    def check(self, q, k, v):
        if q.device.type == "cuda":
            if q.dtype not in (torch.float16, torch.bfloat16):
                raise TypeError(
                    f"backend='torch' on CUDA needs float16 or bfloat16 q/k/v (PyTorch's flash "
                    f"kernel), got {q.dtype}; use backend='reference' for {q.dtype}")
            if q.shape[-1] % 8 != 0 or q.shape[-1] > 256:
                raise ValueError(
                    f"backend='torch' on CUDA needs head_dim a multiple of 8 and <= 256, got "
                    f"{q.shape[-1]}; use backend='reference'")
        elif q.device.type != "cpu":
            raise ValueError(f"backend='torch' runs on CPU and CUDA, not {q.device.type}")

    # -- one ATen call on [B, H, S, D] tensors with equal head counts --------------------------
    @staticmethod
    def _kernel_fwd(q, k, v, causal, scale):
        if q.device.type == "cpu":
            return aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, 0.0, causal, scale=scale)
        out, lse = aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, causal, False, scale=scale)[:2]
        return out, lse

    @staticmethod
    def _kernel_bwd(dout, q, k, v, out, lse, causal, scale):
        if q.device.type == "cpu":
            return aten._scaled_dot_product_flash_attention_for_cpu_backward(
                dout, q, k, v, out, lse, 0.0, causal, scale=scale)
        seed = torch.zeros(2, dtype=torch.uint64, device=q.device)
        offset = torch.zeros((), dtype=torch.uint64, device=q.device)
        return aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse, None, None, q.shape[2], k.shape[2], 0.0, causal,
            seed, offset, scale=scale)

    # -- one query-head group of one piece ----------------------------------------------------
    def _group_views(self, t: torch.Tensor, hkv: int):
        """[B, S, Hkv*G, X] -> list of G views [B, S, Hkv, X], one per group member."""
        b, s, h, x = t.shape
        g = h // hkv
        grouped = t.reshape(b, s, hkv, g, x)
        return [grouped[:, :, :, i] for i in range(g)]

    @staticmethod
    def _needs_reference(mask: Mask, softcap: float) -> bool:
        return bool(softcap) or mask.kind not in ("none", "causal", "empty")

    def forward_piece(self, q, k, v, *, scale, mask, softcap=0.0):
        if self._needs_reference(mask, softcap):
            return ReferenceBackend().forward_piece(q, k, v, scale=scale, mask=mask,
                                                    softcap=softcap)
        acc = accumulation_dtype(q.dtype)
        b, sq, hq, _ = q.shape
        sk, hkv = k.shape[1], k.shape[2]
        pieces = causal_pieces(mask, sq, sk)
        if not pieces:
            return empty_result(q, acc)
        single = len(pieces) == 1 and pieces[0][:4] == (0, sq, 0, sk)
        if single:
            out = torch.empty_like(q)
            lse = torch.empty(b, hq, sq, dtype=acc, device=q.device)
        else:
            out, lse = new_accumulators(q, acc)
        lse_groups = lse.view(b, hkv, hq // hkv, sq)
        q_groups, out_groups = self._group_views(q, hkv), self._group_views(out, hkv)
        for p in pieces:
            kp, vp = _heads_first(k[:, p.k0:p.k1]), _heads_first(v[:, p.k0:p.k1])
            for gi, (qg, og) in enumerate(zip(q_groups, out_groups)):
                o, l = self._kernel_fwd(_heads_first(qg[:, p.q0:p.q1]), kp, vp, p.causal, scale)
                if single:
                    og.copy_(o.transpose(1, 2))
                    lse_groups[:, :, gi].copy_(l)
                else:
                    merge_(og[:, p.q0:p.q1], lse_groups[:, :, gi, p.q0:p.q1],
                           o.transpose(1, 2), l)
        return out.to(q.dtype), lse

    def backward_piece(self, dout, q, k, v, out, lse, *, scale, mask, softcap=0.0):
        if self._needs_reference(mask, softcap):
            return ReferenceBackend().backward_piece(dout, q, k, v, out, lse, scale=scale,
                                                     mask=mask, softcap=softcap)
        acc = accumulation_dtype(q.dtype)
        b, sq, hq, _ = q.shape
        sk, hkv = k.shape[1], k.shape[2]
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        dk = torch.zeros(k.shape, dtype=acc, device=q.device)
        dv = torch.zeros(v.shape, dtype=acc, device=q.device)
        # The kernels read lse in the accumulation dtype and q's layout of heads.
        lse_groups = lse.to(acc).reshape(b, hkv, hq // hkv, sq)
        views = [self._group_views(t, hkv) for t in (q, dout, out, dq)]
        for p in causal_pieces(mask, sq, sk):
            kp, vp = _heads_first(k[:, p.k0:p.k1]), _heads_first(v[:, p.k0:p.k1])
            for gi, (qg, dog, og, dqg) in enumerate(zip(*views)):
                rows = slice(p.q0, p.q1)
                gq, gk, gv = self._kernel_bwd(
                    _heads_first(dog[:, rows]), _heads_first(qg[:, rows]), kp, vp,
                    _heads_first(og[:, rows]), lse_groups[:, :, gi, rows].contiguous(),
                    p.causal, scale)
                dqg[:, rows].add_(gq.transpose(1, 2))
                dk[:, p.k0:p.k1].add_(gk.transpose(1, 2))
                dv[:, p.k0:p.k1].add_(gv.transpose(1, 2))
        return dq, dk, dv
