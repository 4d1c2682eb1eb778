"""This project's kernels (csrc/) as ``torch.library`` custom ops, namespace ``distattn``.

The ``cuda`` backend (and ``emulate``, its CPU twin) launches every kernel through these ops,
never through the pybind11 module directly, so that

- ``torch.compile`` sees each launch as one opaque graph node (no graph break, no tracing
  into pybind11), and
- the whole host-side launch path runs on fake tensors (``FakeTensorMode``, e.g. fake CUDA
  tensors on a machine without a GPU): the fake implementations below check the arguments'
  shapes and dtypes like the binding does and write nothing.

The ops mutate their output arguments in place and return nothing, exactly like the binding
(``csrc/binding.cpp``):

``distattn::fwd(q, k, v, out!, lse!, scale, pieces, softcap)``
    out [B, Sq, Hq, Dv] (q's dtype), lse [B, Hq, Sq] float32 <- attention of this block.
``distattn::fwd_acc(q, k, v, out_acc!, lse_acc!, scale, pieces, softcap)``
    (out_acc, lse_acc) float32 <- merge(acc, attention of this block): the fused ring step.
``distattn::bwd(dout, q, k, v, out, lse, dq!, dk!, dv!, scale, pieces, softcap, accumulate)``
    float32 gradients, written (accumulate=False) or added (True).
``distattn::merge(out_acc!, lse_acc!, out_blk, lse_blk)``
    the standalone merge kernel.

``pieces`` is a flat ``int[]``, six entries per piece: (q0, q1, k0, k1, lo, hi) with
``NO_BOUND`` for a side the band does not bound (``flat_pieces`` / ``piece_tuples`` convert).
The CUDA kernel of each op is ``distattn._C``, the CPU kernel ``distattn._emulate``; an op
called where its extension is absent raises RuntimeError naming it.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

NO_BOUND = -(2 ** 63)   # int64 min: "this side of the band is unbounded" (None in a piece)
_FIELDS = 6


def flat_pieces(pieces: Sequence[tuple]) -> list[int]:
    """[(q0, q1, k0, k1, lo, hi), ...] (lo/hi None when unbounded) -> the ops' flat int list."""
    return [NO_BOUND if x is None else int(x) for p in pieces for x in p]


def piece_tuples(flat: Sequence[int]) -> list[tuple]:
    """Inverse of ``flat_pieces``: the binding's list of 6-tuples."""
    if len(flat) % _FIELDS:
        raise ValueError(f"pieces must hold {_FIELDS} ints per piece, got {len(flat)}")
    vals = [None if x == NO_BOUND else int(x) for x in flat]
    return [tuple(vals[i:i + _FIELDS]) for i in range(0, len(vals), _FIELDS)]


def _extension(device_type: str):
    """The extension module that runs the kernels on ``device_type``, or raise saying why."""
    if device_type == "cuda":
        from . import cuda
        ext, why = cuda._C, cuda.extension_error()
    else:
        from . import emulate
        ext, why = emulate._emulate, emulate.extension_error()
    if ext is None or (device_type == "cuda" and why):
        raise RuntimeError(f"distattn's {device_type} kernels cannot run: {why}")
    return ext


# -- argument checks shared by the fake implementations -------------------------------------
def _expect(t: torch.Tensor, name: str, shape, dtype: Optional[torch.dtype] = None) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")


def _check_qkv(q, k, v) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D [B, S, H, D], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.dtype not in (torch.float16, torch.bfloat16) or k.dtype != q.dtype or \
            v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share float16 or bfloat16, got {q.dtype}, {k.dtype}, "
                        f"{v.dtype}")
    b, _, hq, d = q.shape
    if k.shape[0] != b or k.shape[3] != d or tuple(v.shape[:3]) != tuple(k.shape[:3]) or \
            k.shape[2] == 0 or hq % k.shape[2]:
        raise ValueError(f"k must be [B, Sk, Hkv, D] and v [B, Sk, Hkv, Dv] with q's B and D "
                         f"and Hq % Hkv == 0; got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")


def _check_pieces(pieces: Sequence[int], sq: int, sk: int) -> None:
    for q0, q1, k0, k1, _lo, _hi in piece_tuples(pieces):
        if not (0 <= q0 < q1 <= sq and 0 <= k0 < k1 <= sk):
            raise ValueError(f"piece rows [{q0}, {q1}) / keys [{k0}, {k1}) must be non-empty "
                             f"and inside the block ({sq} x {sk})")


def _check_result(q, v, out, lse, out_dtypes) -> None:
    b, sq, hq, _ = q.shape
    _expect(out, "out", (b, sq, hq, v.shape[-1]))
    if out.dtype not in out_dtypes:
        raise TypeError(f"out must be one of {out_dtypes}, got {out.dtype}")
    _expect(lse, "lse", (b, hq, sq), torch.float32)


# -- the ops --------------------------------------------------------------------------------
@torch.library.custom_op("distattn::fwd", mutates_args=("out", "lse"))
def fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
        lse: torch.Tensor, scale: float, pieces: list[int], softcap: float) -> None:
    """out, lse <- attention(q, k, v) under ``pieces`` (disjoint rows); rows outside every
    piece get out = 0, lse = -inf."""
    _extension(q.device.type).fwd(q, k, v, out, lse, scale, piece_tuples(pieces), softcap)


@fwd.register_fake
def _(q, k, v, out, lse, scale, pieces, softcap):
    _check_qkv(q, k, v)
    _check_pieces(pieces, q.shape[1], k.shape[1])
    _check_result(q, v, out, lse, (q.dtype,))


@torch.library.custom_op("distattn::fwd_acc", mutates_args=("out_acc", "lse_acc"))
def fwd_acc(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out_acc: torch.Tensor,
            lse_acc: torch.Tensor, scale: float, pieces: list[int], softcap: float) -> None:
    """(out_acc, lse_acc) <- merge(acc, attention(q, k, v) under ``pieces``), float32."""
    _extension(q.device.type).fwd_acc(q, k, v, out_acc, lse_acc, scale, piece_tuples(pieces),
                                      softcap)


@fwd_acc.register_fake
def _(q, k, v, out_acc, lse_acc, scale, pieces, softcap):
    _check_qkv(q, k, v)
    _check_pieces(pieces, q.shape[1], k.shape[1])
    _check_result(q, v, out_acc, lse_acc, (torch.float32,))


@torch.library.custom_op("distattn::bwd", mutates_args=("dq", "dk", "dv"))
def bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        out: torch.Tensor, lse: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor,
        dv: torch.Tensor, scale: float, pieces: list[int], softcap: float,
        accumulate: bool) -> None:
    """float32 dq, dk, dv <- (accumulate=False) or += (True) this block's gradients, from the
    final out/lse of its queries."""
    _extension(q.device.type).bwd(dout, q, k, v, out, lse, dq, dk, dv, scale,
                                  piece_tuples(pieces), softcap, accumulate)


@bwd.register_fake
def _(dout, q, k, v, out, lse, dq, dk, dv, scale, pieces, softcap, accumulate):
    _check_qkv(q, k, v)
    _check_pieces(pieces, q.shape[1], k.shape[1])
    _check_result(q, v, out, lse, (q.dtype, torch.float32))
    _expect(dout, "dout", out.shape, q.dtype)
    for name, g, like in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        _expect(g, name, like.shape, torch.float32)


@torch.library.custom_op("distattn::merge", mutates_args=("out_acc", "lse_acc"))
def merge(out_acc: torch.Tensor, lse_acc: torch.Tensor, out_blk: torch.Tensor,
          lse_blk: torch.Tensor) -> None:
    """(out_acc, lse_acc) <- merge(acc, (out_blk, lse_blk)), the guarded update, float32."""
    _extension(out_acc.device.type).merge(out_acc, lse_acc, out_blk, lse_blk)


@merge.register_fake
def _(out_acc, lse_acc, out_blk, lse_blk):
    _expect(out_blk, "out_blk", out_acc.shape)
    _expect(lse_acc, "lse_acc", out_acc.shape[:1] + out_acc.shape[2:3] + out_acc.shape[1:2],
            torch.float32)
    _expect(lse_blk, "lse_blk", lse_acc.shape, torch.float32)
    if out_acc.dtype != torch.float32:
        raise TypeError(f"out_acc must be float32, got {out_acc.dtype}")


OPS = {"fwd": fwd, "fwd_acc": fwd_acc, "bwd": bwd, "merge": merge}
