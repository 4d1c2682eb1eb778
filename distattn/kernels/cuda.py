"""``cuda`` backend: this project's own kernels (csrc/, bound as ``distattn._C``).

Contract (base.py / docs/DESIGN.md, "Backends"), with these specifics:

- Inputs: CUDA tensors, float16 or bfloat16, head dims (D of q/k, Dv of v) with a compiled
  kernel: D = Dv = 64 or 128, and MLA's (D, Dv) = (192, 128) (``head_dim_pairs()``;
  ``head_dims()`` lists the D = Dv ones), ``Hq % Hkv == 0`` (GQA/MQA by index mapping).
  ``out``/``dout`` have V's head dim. q/k/v may be strided views; a view whose rows are not
  16-byte aligned is copied to a contiguous tensor first (correct, but a copy).
- Masks: every mask of the algebra (kernels/mask.py). Its pieces run on their smallest
  rectangles, a band (lo, hi) each; pieces with disjoint query rows (and keys, backward) share
  one "varlen" launch, others take further launches merged by the fused epilogue. softcap in
  the kernels (forward and backward).
- ``forward`` returns ``out`` in q's dtype and ``lse`` float32 ``[B, Hq, Sq]``.
- ``backward`` returns float32 ``dq, dk, dv``. It is deterministic (bitwise reproducible): no
  atomics, every gradient row is owned by one thread block (see docs/KERNELS.md).
- ``forward_into`` is the fused ring step: one launch that merges the block into the running
  float32 ``(out_acc, lse_acc)`` in its epilogue. ``backward_into`` adds into float32
  ``dq/dk/dv`` accumulators in the same launches that compute them. Accumulators may be strided
  views; ones that are not 8-byte aligned with even strides take the unfused path (forward,
  then the standalone merge kernel / an add).
- ``merge_`` is the standalone merge kernel (same semantics as ``distattn.merge.merge_``).

STATUS: the kernels compile for sm_90a and sm_80 and run, unchanged, on the host CTA emulator
(backend ``"emulate"``, distattn/kernels/emulate.py, which subclasses this one), but they have
not yet been run on a GPU; tests/test_cuda_kernels.py is the check to run there. On an sm_90
device with sm_90a code the forward at head_dim 64/128 launches the Hopper kernel
(csrc/kernels/fwd_sm90_kernel.cuh, wgmma + TMA; DISTATTN_DISABLE_SM90=1 keeps mma.sync), an
equally unverified path (docs/KERNELS.md, "Hopper (sm_90a) forward kernel").

Every launch goes through the ``distattn::`` custom ops of ``kernels/ops.py`` (CUDA kernel:
``distattn._C``; CPU kernel: ``distattn._emulate``), whose fake implementations let
``torch.compile`` and ``FakeTensorMode`` run this host code without the extension.
"""
from __future__ import annotations

import functools

import torch

from ..merge import merge_ as torch_merge_
from ..merge import new_accumulators
from . import ops
from .base import BlockAttention, empty_result
from .device_cache import address_aligned
from .mask import Mask
from .varlen import merge_bands, tight_bands

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
    """Head dims D with compiled kernels for q, k and v alike (empty when the extension is
    absent)."""
    return tuple(_C.head_dims()) if _C is not None else ()


def head_dim_pairs(ext=None) -> tuple[tuple[int, int], ...]:
    """Every (D, Dv) with compiled kernels (q/k head dim, v/out head dim): the D = Dv ones and
    MLA's pairs; empty when the extension is absent. ``ext``: the extension (default _C)."""
    ext = _C if ext is None else ext
    if ext is None:
        return ()
    if not hasattr(ext, "head_dim_pairs"):  # an extension built before MLA
        return tuple((d, d) for d in ext.head_dims())
    return tuple((int(d), int(dv)) for d, dv in ext.head_dim_pairs())


def arch_error(archs, capability) -> str | None:
    """None when code compiled for one of ``archs`` (e.g. ``("90a", "80")``) runs on a GPU of
    compute ``capability`` (major, minor), else why not. The build embeds SASS only (no PTX to
    JIT): sm_XY code runs on X.Y up to X.9, sm_XYa (arch-specific) on X.Y only."""
    major, minor = capability
    for arch in archs:
        specific = arch[-1:].isalpha()
        digits = arch.rstrip("abcdefghijklmnopqrstuvwxyz")
        if not digits.isdigit():
            continue
        a_major, a_minor = divmod(int(digits), 10)
        if a_major == major and (a_minor == minor if specific else a_minor <= minor):
            return None
    built = ", ".join(f"sm_{a}" for a in archs)
    return (f"the kernels were built for {built}, none of which runs on this GPU (compute "
            f"capability {major}.{minor}); rebuild with DISTATTN_CUDA_ARCHS=\"{major}{minor}\" "
            f"(pip install --no-build-isolation -e .), or use backend='torch'")


def _rows_aligned(t: torch.Tensor, elems: int, byte_align: int) -> bool:
    """Last dim contiguous, base address aligned, every other stride a multiple of `elems`
    (dimensions of size 1 are never stepped over and do not count). The base address check
    works on traced tensors too (``device_cache.address_aligned``)."""
    if t.dim() == 0 or (t.stride(-1) != 1 and t.shape[-1] != 1):
        return False
    if not address_aligned(t, byte_align):
        return False
    return all(size == 1 or stride % elems == 0
               for size, stride in zip(t.shape[:-1], t.stride()[:-1]))


def _kernel_input(t: torch.Tensor) -> torch.Tensor:
    """q/k/v/dout as the kernels read them: 16-byte aligned rows (cp.async), else a copy."""
    return t if _rows_aligned(t, 16 // t.element_size(), 16) else t.contiguous()


def _accumulator_ok(t: torch.Tensor) -> bool:
    """float32 accumulators are updated two elements (8 bytes) at a time."""
    return t.dtype == torch.float32 and _rows_aligned(t, 2, 8)


@functools.lru_cache(maxsize=4096)
def _launch_groups(mask: Mask, sq: int, sk: int, keys_too: bool) -> tuple:
    """A mask's pieces as the kernels' launches: each launch a tuple of pieces
    (q0, q1, k0, k1, lo, hi), a band on its smallest rectangle (``varlen.tight_bands``, pieces
    a layout cut from one document merged back where their union is one band). One launch runs
    pieces with disjoint query rows (and disjoint keys for the backward), so every output row
    has one owner; a piece that shares rows with earlier ones goes to a later launch, whose
    fused epilogue merges (forward) or adds (backward)."""
    def apart(a0, a1, b0, b1) -> bool:
        return a1 <= b0 or b1 <= a0

    groups: list[list] = []
    for b in merge_bands(tight_bands(mask, sq, sk)):
        for group in groups:
            if all(apart(b.q0, b.q1, o.q0, o.q1) and
                   (not keys_too or apart(b.k0, b.k1, o.k0, o.k1)) for o in group):
                group.append(b)
                break
        else:
            groups.append([b])
    return tuple(tuple((b.q0, b.q1, b.k0, b.k1, b.lo, b.hi) for b in g) for g in groups)


class CudaBackend(BlockAttention):
    """The csrc kernels through an extension module: ``distattn._C`` on CUDA tensors here,
    ``distattn._emulate`` on CPU tensors in the ``emulate`` subclass."""
    name = "cuda"
    device_type = "cuda"
    supports_bands = True
    supports_softcap = True

    @property
    def _ext(self):
        return _C

    def unavailable(self) -> str | None:
        """None when the extension can run here, else why not (one line)."""
        return extension_error()

    def head_dims(self) -> tuple[int, ...]:
        return head_dims()

    def head_dim_pairs(self) -> tuple[tuple[int, int], ...]:
        return head_dim_pairs(self._ext)

    # -- applicability ----------------------------------------------------------------------
    def check(self, q, k, v):
        me = f"backend={self.name!r}"
        why = self.unavailable()
        if why is not None:
            raise RuntimeError(f"{me} is not available: {why}")
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.device.type != self.device_type:
                raise ValueError(f"{me} needs {self.device_type.upper()} tensors; {name} is on "
                                 f"{t.device} (move it with .to({self.device_type!r}), or use "
                                 f"backend='torch')")
            if t.dim() != 4:
                raise ValueError(f"{name} must be 4-D [B, S, H, D], got shape {tuple(t.shape)}")
        if k.device != q.device or v.device != q.device:
            raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, "
                             f"{v.device}")
        self._check_device_code(q.device)
        if q.dtype not in _DTYPES:
            raise TypeError(f"{me} needs float16 or bfloat16 q, got {q.dtype}; cast "
                            f"q/k/v, or use backend='torch' or 'reference'")
        if k.dtype != q.dtype or v.dtype != q.dtype:
            raise TypeError(f"k and v must have q's dtype {q.dtype}, got {k.dtype}, {v.dtype}")
        if k.shape[:-1] != v.shape[:-1]:
            raise ValueError(f"k and v must have the same [B, Sk, Hkv], got {tuple(k.shape)} "
                             f"and {tuple(v.shape)}")
        b, _, hq, d = q.shape
        dv = v.shape[-1]
        if k.shape[0] != b or k.shape[3] != d:
            raise ValueError(f"k must be [B, Sk, Hkv, D] with q's B={b} and D={d}, got "
                             f"{tuple(k.shape)}")
        hkv = k.shape[2]
        if hkv == 0 or hq % hkv != 0:
            raise ValueError(f"q's heads ({hq}) must be a multiple of k/v's heads ({hkv})")
        pairs = self.head_dim_pairs()
        if dv != d and (d, dv) not in pairs:
            mla = [p for p in pairs if p[0] != p[1]]
            raise ValueError(f"{me} has no kernels for q/k head_dim {d} with V's head dim {dv} "
                             f"(MLA); compiled (D, Dv) pairs with Dv != D: {mla}; use "
                             f"backend='torch' or 'reference' (docs/KERNELS.md)")
        if (d, dv) not in pairs:
            raise ValueError(f"{me} has kernels for head_dim in {self.head_dims()} (and the "
                             f"MLA pairs of head_dim_pairs()), got {d}; use backend='torch'")
        if hq > _MAX_GRID_YZ or b > _MAX_GRID_YZ:
            raise ValueError(f"{me} needs heads and batch <= {_MAX_GRID_YZ}, got "
                             f"Hq={hq}, B={b}")

    def _check_device_code(self, device) -> None:
        """Refuse a GPU the build has no kernel code for (launching would fail with 'no
        kernel image'); ``auto`` then falls back to another backend."""
        archs = tuple(self._ext.archs()) if hasattr(self._ext, "archs") else ()
        if archs:
            why = arch_error(archs, torch.cuda.get_device_capability(device))
            if why is not None:
                raise ValueError(f"backend={self.name!r} cannot run on {device}: {why}")

    def applicable(self, q, k, v) -> bool:
        """True when ``check`` passes (used by backend='auto'); never raises."""
        try:
            self.check(q, k, v)
        except (TypeError, ValueError, RuntimeError):
            return False
        return True

    # -- forward ----------------------------------------------------------------------------
    # Any mask: its pieces (each on its smallest rectangle) run as one varlen launch per group
    # of pieces with disjoint rows (_launch_groups); softcap in the kernels.
    def forward(self, q, k, v, *, scale, mask, softcap=0.0):
        groups = _launch_groups(mask, q.shape[1], k.shape[1], False)
        if not groups:
            return empty_result(q, torch.float32, v.shape[-1])
        if len(groups) > 1:  # rows met by several pieces: merge them in the fused epilogue
            out, lse = new_accumulators(q, torch.float32, v.shape[-1])
            self._forward_groups_into(groups, q, k, v, out, lse, scale, softcap)
            return out.to(q.dtype), lse
        q, k, v = _kernel_input(q), _kernel_input(k), _kernel_input(v)
        b, sq, hq, _ = q.shape
        out = torch.empty(b, sq, hq, v.shape[-1], dtype=q.dtype, device=q.device)
        lse = torch.empty(b, hq, sq, dtype=torch.float32, device=q.device)
        # rows outside every piece: out = 0, lse = -inf (the binding fills them)
        ops.fwd(q, k, v, out, lse, float(scale), ops.flat_pieces(groups[0]), float(softcap))
        return out, lse

    def forward_into(self, q, k, v, out_acc, lse_acc, *, scale, mask, softcap=0.0) -> None:
        """The fused ring step: fold this block into (out_acc, lse_acc), one launch per group
        of pieces with disjoint rows."""
        groups = _launch_groups(mask, q.shape[1], k.shape[1], False)
        if not groups:
            return
        if out_acc.dtype != torch.float32 or lse_acc.dtype != torch.float32:
            raise TypeError(f"backend={self.name!r} accumulates in float32; out_acc is "
                            f"{out_acc.dtype}, lse_acc is {lse_acc.dtype}")
        if not _accumulator_ok(out_acc):
            out, lse = self.forward(q, k, v, scale=scale, mask=mask, softcap=softcap)
            self.merge_(out_acc, lse_acc, out, lse)
            return
        self._forward_groups_into(groups, q, k, v, out_acc, lse_acc, scale, softcap)

    def _forward_groups_into(self, groups, q, k, v, out_acc, lse_acc, scale, softcap):
        q, k, v = _kernel_input(q), _kernel_input(k), _kernel_input(v)
        for group in groups:
            ops.fwd_acc(q, k, v, out_acc, lse_acc, float(scale), ops.flat_pieces(group),
                        float(softcap))

    # The base contract's single-piece calls are the general ones here.
    def forward_piece(self, q, k, v, *, scale, mask, softcap=0.0):
        return self.forward(q, k, v, scale=scale, mask=mask, softcap=softcap)

    def forward_piece_into(self, q, k, v, out_acc, lse_acc, *, scale, mask, softcap=0.0):
        self.forward_into(q, k, v, out_acc, lse_acc, scale=scale, mask=mask, softcap=softcap)

    def merge_(self, out_acc, lse_acc, out_blk, lse_blk) -> None:
        """Standalone merge kernel: (out_acc, lse_acc) <- merge(acc, block). Falls back to the
        torch merge for accumulators whose last dim is not contiguous."""
        if (out_acc.dtype == torch.float32 and out_acc.stride(-1) == 1
                and out_blk.stride(-1) == 1 and lse_acc.dtype == torch.float32):
            ops.merge(out_acc, lse_acc, out_blk, lse_blk.to(torch.float32))
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

    def backward(self, dout, q, k, v, out, lse, *, scale, mask, softcap=0.0):
        """float32 (dq, dk, dv) of this block; ``out``/``lse`` are the final ones. One launch
        per group of pieces with disjoint rows and keys."""
        groups = _launch_groups(mask, q.shape[1], k.shape[1], True)
        f32 = dict(dtype=torch.float32, device=q.device)
        if len(groups) > 1:
            dq, dk, dv = (torch.zeros(t.shape, **f32) for t in (q, k, v))
            self._backward_groups_into(groups, dout, q, k, v, out, lse, dq, dk, dv, scale,
                                       softcap)
            return dq, dk, dv
        dout, q, k, v, out, lse = self._bwd_inputs(dout, q, k, v, out, lse)
        dq, dk, dv = (torch.empty(t.shape, **f32) for t in (q, k, v))
        # rows and keys outside every piece get zero gradients (the binding fills them)
        ops.bwd(dout, q, k, v, out, lse, dq, dk, dv, float(scale),
                ops.flat_pieces(groups[0]) if groups else [], float(softcap), False)
        return dq, dk, dv

    def backward_into(self, dout, q, k, v, out, lse, dq_acc, dk_acc, dv_acc, *,
                      scale, mask, softcap=0.0) -> None:
        """Add this block's gradients into float32 accumulators (in the kernels themselves
        when the accumulators allow it)."""
        groups = _launch_groups(mask, q.shape[1], k.shape[1], True)
        if not groups:
            return
        if not all(_accumulator_ok(t) for t in (dq_acc, dk_acc, dv_acc)):
            dq, dk, dv = self.backward(dout, q, k, v, out, lse, scale=scale, mask=mask,
                                       softcap=softcap)
            dq_acc.add_(dq)
            dk_acc.add_(dk)
            dv_acc.add_(dv)
            return
        self._backward_groups_into(groups, dout, q, k, v, out, lse, dq_acc, dk_acc, dv_acc,
                                   scale, softcap)

    def _backward_groups_into(self, groups, dout, q, k, v, out, lse, dq_acc, dk_acc, dv_acc,
                              scale, softcap):
        dout, q, k, v, out, lse = self._bwd_inputs(dout, q, k, v, out, lse)
        for group in groups:
            ops.bwd(dout, q, k, v, out, lse, dq_acc, dk_acc, dv_acc, float(scale),
                    ops.flat_pieces(group), float(softcap), True)

    def backward_piece(self, dout, q, k, v, out, lse, *, scale, mask, softcap=0.0):
        return self.backward(dout, q, k, v, out, lse, scale=scale, mask=mask, softcap=softcap)

    def backward_piece_into(self, dout, q, k, v, out, lse, dq_acc, dk_acc, dv_acc, *,
                            scale, mask, softcap=0.0) -> None:
        self.backward_into(dout, q, k, v, out, lse, dq_acc, dk_acc, dv_acc, scale=scale,
                           mask=mask, softcap=softcap)
