"""``cuda`` backend: this project's own kernels (csrc/, bound as ``distattn._C``).

Contract (base.py / docs/DESIGN.md, "Backends"), with these specifics:

- Inputs: CUDA tensors, float16 or bfloat16, head_dim with a compiled kernel (64, 128;
  ``distattn._C.head_dims()``), ``Hq % Hkv == 0`` (GQA/MQA by index mapping). q/k/v may be
  strided views; a view whose rows are not 16-byte aligned is copied to a contiguous tensor
  first (correct, but a copy).
- ``forward`` returns ``out`` in q's dtype and ``lse`` float32 ``[B, Hq, Sq]``.
- ``backward`` returns float32 ``dq, dk, dv``. It is deterministic (bitwise reproducible): no
  atomics, every gradient row is owned by one thread block (see docs/KERNELS.md).
- ``forward_into`` is the fused ring step: one launch that merges the block into the running
  float32 ``(out_acc, lse_acc)`` in its epilogue. ``backward_into`` adds into float32
  ``dq/dk/dv`` accumulators in the same launches that compute them. Accumulators may be strided
  views; ones that are not 8-byte aligned with even strides take the unfused path (forward,
  then the standalone merge kernel / an add).
- ``merge_`` is the standalone merge kernel (same semantics as ``distattn.merge.merge_``).

STATUS: the kernels compile for sm_90a and sm_80 and their host-side logic is unit-tested, but
they have not yet been run on a GPU; tests/test_cuda_kernels.py is the check to run there.
"""
from __future__ import annotations

import torch

from ..merge import merge_ as torch_merge_
from .base import BlockAttention, empty_result
from .mask import Mask

_IMPORT_ERROR: str | None = None
try:  # the compiled extension; absent on CPU-only builds
    from .. import _C  # type: ignore[attr-defined]
except ImportError as exc:  # pragma: no cover - depends on the build
    _C = None
    _IMPORT_ERROR = str(exc)

_DTYPES = (torch.float16, torch.bfloat16)
_MAX_GRID_YZ = 65535


def extension_error() -> str | None:
    """None when ``distattn._C`` is importable and a CUDA device is usable, else one line
    saying why the ``cuda`` backend is unavailable."""
    if _C is None:
        return (f"the distattn._C extension is not built ({_IMPORT_ERROR}); install with a "
                f"CUDA-enabled torch, nvcc and `pip install nvidia-cutlass`, then "
                f"`pip install --no-build-isolation -e .`")
    if not torch.cuda.is_available():
        return "distattn._C is built but no CUDA device is available"
    return None


def head_dims() -> tuple[int, ...]:
    """Head dims with compiled kernels (empty when the extension is absent)."""
    return tuple(_C.head_dims()) if _C is not None else ()


def _rows_aligned(t: torch.Tensor, elems: int, byte_align: int) -> bool:
    """Last dim contiguous, base address aligned, every other stride a multiple of `elems`
    (dimensions of size 1 are never stepped over and do not count)."""
    if t.dim() == 0 or (t.stride(-1) != 1 and t.shape[-1] != 1):
        return False
    if t.data_ptr() % byte_align != 0:
        return False
    return all(size == 1 or stride % elems == 0
               for size, stride in zip(t.shape[:-1], t.stride()[:-1]))


def _kernel_input(t: torch.Tensor) -> torch.Tensor:
    """q/k/v/dout as the kernels read them: 16-byte aligned rows (cp.async), else a copy."""
    return t if _rows_aligned(t, 16 // t.element_size(), 16) else t.contiguous()


def _accumulator_ok(t: torch.Tensor) -> bool:
    """float32 accumulators are updated two elements (8 bytes) at a time."""
    return t.dtype == torch.float32 and _rows_aligned(t, 2, 8)


def _refuse(mask: Mask, softcap: float) -> None:
    """The kernels run one causal or unmasked piece; windows and softcap are not in them yet."""
    if mask.kind not in ("none", "causal", "empty"):
        raise NotImplementedError(
            f"backend='cuda' does not run {mask!r} pieces (sliding windows) yet; use "
            f"backend='torch' or 'reference'")
    if softcap:
        raise NotImplementedError("backend='cuda' has no softcap yet; use backend='torch' "
                                  "(reference math for softcap) or 'reference'")


def _mask_args(mask: Mask) -> tuple[bool, int]:
    return (mask.kind == "causal", mask.offset if mask.kind == "causal" else 0)


class CudaBackend(BlockAttention):
    name = "cuda"
    supports_bands = False
    supports_softcap = False

    # -- applicability ----------------------------------------------------------------------
    def check(self, q, k, v):
        why = extension_error()
        if why is not None:
            raise RuntimeError(f"backend='cuda' is not available: {why}")
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.device.type != "cuda":
                raise ValueError(f"backend='cuda' needs CUDA tensors; {name} is on {t.device} "
                                 f"(move it with .cuda(), or use backend='torch')")
            if t.dim() != 4:
                raise ValueError(f"{name} must be 4-D [B, S, H, D], got shape {tuple(t.shape)}")
        if k.device != q.device or v.device != q.device:
            raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, "
                             f"{v.device}")
        if q.dtype not in _DTYPES:
            raise TypeError(f"backend='cuda' needs float16 or bfloat16 q, got {q.dtype}; cast "
                            f"q/k/v, or use backend='torch' or 'reference'")
        if k.dtype != q.dtype or v.dtype != q.dtype:
            raise TypeError(f"k and v must have q's dtype {q.dtype}, got {k.dtype}, {v.dtype}")
        if k.shape != v.shape:
            raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and "
                             f"{tuple(v.shape)}")
        b, _, hq, d = q.shape
        if k.shape[0] != b or k.shape[3] != d:
            raise ValueError(f"k/v must be [B, Sk, Hkv, D] with q's B={b} and D={d}, got "
                             f"{tuple(k.shape)}")
        hkv = k.shape[2]
        if hkv == 0 or hq % hkv != 0:
            raise ValueError(f"q's heads ({hq}) must be a multiple of k/v's heads ({hkv})")
        if d not in head_dims():
            raise ValueError(f"backend='cuda' has kernels for head_dim in {head_dims()}, got "
                             f"{d}; use backend='torch'")
        if hq > _MAX_GRID_YZ or b > _MAX_GRID_YZ:
            raise ValueError(f"backend='cuda' needs heads and batch <= {_MAX_GRID_YZ}, got "
                             f"Hq={hq}, B={b}")

    def applicable(self, q, k, v) -> bool:
        """True when ``check`` passes (used by backend='auto'); never raises."""
        try:
            self.check(q, k, v)
        except (TypeError, ValueError, RuntimeError):
            return False
        return True

    # -- forward ----------------------------------------------------------------------------
    def forward_piece(self, q, k, v, *, scale, mask, softcap=0.0):
        _refuse(mask, softcap)
        mask = mask.simplify(q.shape[1], k.shape[1])
        if mask.kind == "empty":
            return empty_result(q, torch.float32)
        q, k, v = _kernel_input(q), _kernel_input(k), _kernel_input(v)
        b, sq, hq, _ = q.shape
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty(b, hq, sq, dtype=torch.float32, device=q.device)
        causal, offset = _mask_args(mask)
        _C.fwd(q, k, v, out, lse, float(scale), causal, offset)
        return out, lse

    def forward_piece_into(self, q, k, v, out_acc, lse_acc, *, scale, mask,
                           softcap=0.0) -> None:
        _refuse(mask, softcap)
        """The fused ring step: fold this block into (out_acc, lse_acc) in one launch."""
        mask = mask.simplify(q.shape[1], k.shape[1])
        if mask.kind == "empty":
            return
        if out_acc.dtype != torch.float32 or lse_acc.dtype != torch.float32:
            raise TypeError(f"backend='cuda' accumulates in float32; out_acc is "
                            f"{out_acc.dtype}, lse_acc is {lse_acc.dtype}")
        if not _accumulator_ok(out_acc):
            out, lse = self.forward_piece(q, k, v, scale=scale, mask=mask)
            self.merge_(out_acc, lse_acc, out, lse)
            return
        q, k, v = _kernel_input(q), _kernel_input(k), _kernel_input(v)
        causal, offset = _mask_args(mask)
        _C.fwd_acc(q, k, v, out_acc, lse_acc, float(scale), causal, offset)

    @staticmethod
    def merge_(out_acc, lse_acc, out_blk, lse_blk) -> None:
        """Standalone merge kernel: (out_acc, lse_acc) <- merge(acc, block). Falls back to the
        torch merge for accumulators whose last dim is not contiguous."""
        if (out_acc.dtype == torch.float32 and out_acc.stride(-1) == 1
                and out_blk.stride(-1) == 1 and lse_acc.dtype == torch.float32):
            _C.merge(out_acc, lse_acc, out_blk, lse_blk.to(torch.float32))
        else:
            torch_merge_(out_acc, lse_acc, out_blk, lse_blk)

    # -- backward ---------------------------------------------------------------------------
    def _bwd_inputs(self, dout, q, k, v, out, lse):
        q, k, v = _kernel_input(q), _kernel_input(k), _kernel_input(v)
        dout = _kernel_input(dout.to(q.dtype))
        if out.dtype not in (q.dtype, torch.float32):
            out = out.to(q.dtype)
        if out.stride(-1) != 1:
            out = out.contiguous()
        return dout, q, k, v, out, lse.to(torch.float32)

    def backward_piece(self, dout, q, k, v, out, lse, *, scale, mask, softcap=0.0):
        _refuse(mask, softcap)
        """float32 (dq, dk, dv) of this block; ``out``/``lse`` are the final ones."""
        mask = mask.simplify(q.shape[1], k.shape[1])
        f32 = dict(dtype=torch.float32, device=q.device)
        if mask.kind == "empty":
            return (torch.zeros(q.shape, **f32), torch.zeros(k.shape, **f32),
                    torch.zeros(v.shape, **f32))
        dout, q, k, v, out, lse = self._bwd_inputs(dout, q, k, v, out, lse)
        dq = torch.empty(q.shape, **f32)
        dk = torch.empty(k.shape, **f32)
        dv = torch.empty(v.shape, **f32)
        causal, offset = _mask_args(mask)
        _C.bwd(dout, q, k, v, out, lse, dq, dk, dv, float(scale), causal, offset, False)
        return dq, dk, dv

    def backward_piece_into(self, dout, q, k, v, out, lse, dq_acc, dk_acc, dv_acc, *,
                            scale, mask, softcap=0.0) -> None:
        _refuse(mask, softcap)
        """Add this block's gradients into float32 accumulators (in the kernels themselves
        when the accumulators allow it)."""
        mask = mask.simplify(q.shape[1], k.shape[1])
        if mask.kind == "empty":
            return
        if not all(_accumulator_ok(t) for t in (dq_acc, dk_acc, dv_acc)):
            dq, dk, dv = self.backward_piece(dout, q, k, v, out, lse, scale=scale, mask=mask)
            dq_acc.add_(dq)
            dk_acc.add_(dk)
            dv_acc.add_(dv)
            return
        dout, q, k, v, out, lse = self._bwd_inputs(dout, q, k, v, out, lse)
        causal, offset = _mask_args(mask)
        _C.bwd(dout, q, k, v, out, lse, dq_acc, dk_acc, dv_acc, float(scale), causal, offset,
               True)
