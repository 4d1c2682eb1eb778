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
not depend on which convention a kernel version uses. GQA: on CPU one call for all heads (the
CPU flash kernels take Hq = G * Hkv natively; ``native_gqa_cpu`` checks that once against the
per-group calls), elsewhere one call per query-head group (``Hq // Hkv`` calls on ``Hkv``
heads each): K/V are never expanded. In a ring step (``forward_piece_into`` /
``backward_piece_into``) each call's result is merged, or its gradients added, straight into
the accumulators' views: no block-sized temporaries, no copies.

What the ATen kernels cannot express -- a band with a lower bound (sliding windows) and
softcap -- runs on the reference math for that piece only (``ReferenceBackend``).

**Varlen launches (CUDA fp16/bf16, no softcap).** There the backend does not run pieces one by
one: ``kernels/varlen.py`` packs a block's pieces into a few calls of PyTorch's varlen flash
op (``aten._flash_attention_forward`` / ``_backward`` with ``cum_seq_q`` / ``cum_seq_k``),
usually one per block, on row views of the [B, S, H, D] tensors (no copy of q/k/v, GQA
native, windows in the kernel). ``TorchBackend.varlen_ops`` names the ops and where they are
used; tests inject a CPU stand-in there. A failing op raises; nothing falls back silently.
Unverified on hardware until ``pytest -m cuda tests/test_varlen_launch.py`` has run on a GPU
(docs/KERNELS.md).
"""
from __future__ import annotations

import os
import statistics
from typing import Callable, NamedTuple, Optional

import torch

from ..merge import merge_, new_accumulators
from . import varlen
from .device_cache import address_aligned, device_cache, tracing
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
    """[B, S, H, D] -> [B, H, S, D], the layout the ATen kernels take: a view on CPU, whose
    flash kernels read any strides with a unit last stride (bitwise the same results as on a
    contiguous copy), else a contiguous copy."""
    x = x.transpose(1, 2)
    return x if x.device.type == "cpu" and x.stride(-1) == 1 else x.contiguous()


class FlashVarlenOps(NamedTuple):
    """The varlen flash kernels the torch backend runs a block's launches with, and where.

    ``forward`` / ``backward`` take the arguments of ``aten._flash_attention_forward`` /
    ``aten._flash_attention_backward`` in their varlen form ([total, H, D] tensors, int32
    cumulative arrays, lse [Hq, total_q]); ``devices`` / ``dtypes`` are the device types and
    q dtypes the varlen path is used for."""
    forward: Callable
    backward: Callable
    devices: tuple
    dtypes: tuple


def _aten_varlen_ops() -> Optional[FlashVarlenOps]:
    """PyTorch's varlen flash ops for CUDA fp16/bf16, or None when this PyTorch lacks them or
    their window arguments (the torch backend then runs pieces one by one, as before)."""
    try:
        fwd, bwd = aten._flash_attention_forward, aten._flash_attention_backward
    except AttributeError:
        return None
    if not all("window_size_left" in str(op.default._schema) for op in (fwd, bwd)):
        return None
    return FlashVarlenOps(fwd, bwd, ("cuda",), (torch.float16, torch.bfloat16))


# -- varlen launches: a block's pieces in few kernel calls -----------------------------------
def _stacked(t: torch.Tensor) -> Optional[torch.Tensor]:
    """[B, S, ...] as rows [B*S, ...] without a copy, or None when the strides do not allow
    it."""
    if t.shape[0] == 1:
        return t[0]
    if t.stride(0) != t.shape[1] * t.stride(1):
        return None
    return t.flatten(0, 1)


def _kernel_ready(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a contiguous copy when a row or head of it is not 16-byte aligned (the flash
    kernels load 16 bytes at a time; views of contiguous tensors with head_dim % 8 == 0 always
    are aligned, so this copies only unusual views). The address check also works on traced
    tensors (``device_cache.address_aligned``)."""
    size = t.element_size()
    if t.stride(-1) == 1 and address_aligned(t, 16) and \
            all(s * size % 16 == 0 for s in t.stride()[:-1]):
        return t
    return t.contiguous()


def _units(mask: Mask, sq: int, sk: int, *tensors):
    """How to run a batch: [(batch slice, blocks, row views of ``tensors``)]. One unit stacks
    all B blocks (one launch covers every batch element) when every tensor stacks without a
    copy and the launches stay within the kernel's sequence limit, else one unit per batch
    element."""
    b = tensors[0].shape[0]
    stacked = [_stacked(t) for t in tensors]
    if all(s is not None for s in stacked) and \
            (b == 1 or varlen.max_sequences(mask, sq, sk, b) <= varlen.MAX_SEQUENCES):
        return [(slice(None), b, [_kernel_ready(s) for s in stacked])]
    return [(slice(i, i + 1), 1, [_kernel_ready(t[i]) for t in tensors]) for i in range(b)]


def _per_block(t: torch.Tensor, blocks: int, period: int, n: int, dim: int) -> torch.Tensor:
    """A launch result with rows along ``dim`` seen as [blocks, ..., n, ...]: block b's rows
    start at row b * period (a view)."""
    sizes, strides = list(t.shape), list(t.stride())
    sizes[dim] = n
    return t.as_strided([blocks] + sizes, [period * t.stride(dim)] + strides,
                        t.storage_offset())


def _add_rows(acc: torch.Tensor, blk: torch.Tensor, keep: Optional[torch.Tensor]) -> None:
    """acc += blk, along dim 1 only at the positions ``keep`` (everywhere when None)."""
    if keep is None:
        acc.add_(blk)
    else:
        acc.index_add_(1, keep, blk.index_select(1, keep).to(acc.dtype))


def _launch_forward(ops: FlashVarlenOps, lt, qr, kr, vr, scale):
    """One launch on row views qr [rows, Hq, D], kr/vr [keys, Hkv, D] -> (out [total_q, Hq, D],
    lse [Hq, total_q]) with lse = -inf where a row sees no key (the fillers)."""
    L, a = lt.launch, lt.arrays
    q = qr[L.q0:L.q0 + a.total_q]
    keys = slice(L.k0, L.k0 + a.total_k)
    out, lse = ops.forward(q, kr[keys], vr[keys], lt.cu_q, lt.cu_k, a.max_q, a.max_k, 0.0,
                           L.is_causal, False, scale=scale, window_size_left=L.left,
                           window_size_right=L.right)[:2]
    if tuple(out.shape) != tuple(q.shape) or tuple(lse.shape) != (q.shape[1], a.total_q):
        raise RuntimeError(
            f"the varlen flash forward returned out {tuple(out.shape)} and lse "
            f"{tuple(lse.shape)}; expected {tuple(q.shape)} and {(q.shape[1], a.total_q)} "
            f"(the unpadded varlen lse of FlashAttention >= 2.5)")
    # FlashAttention-2 writes out = 0 and lse = +inf for a row that sees no key; the
    # contract's empty row has lse = -inf (weight 0 in a merge).
    # (one kernel; NaN stays NaN, -inf stays -inf)
    inf = float("inf")
    return out, torch.nan_to_num(lse, nan=float("nan"), posinf=-inf, neginf=-inf)


def _varlen_forward_into(ops, units, q, k, out_acc, lse_acc, scale, mask) -> None:
    sq, sk = q.shape[1], k.shape[1]
    for sel, blocks, (qr, kr, vr) in units:
        for lt in varlen.launch_tensors(mask, sq, sk, blocks, q.device):
            L = lt.launch
            out, lse = _launch_forward(ops, lt, qr, kr, vr, scale)
            n = L.q1 - L.q0
            merge_(out_acc[sel, L.q0:L.q1], lse_acc[sel, :, L.q0:L.q1],
                   _per_block(out, blocks, sq, n, 0), _per_block(lse, blocks, sq, n, 1))


def varlen_forward(ops: FlashVarlenOps, q, k, v, scale: float, mask: Mask):
    """``BlockAttention.forward`` with varlen launches."""
    acc = accumulation_dtype(q.dtype)
    b, sq, sk = q.shape[0], q.shape[1], k.shape[1]
    units = _units(mask, sq, sk, q, k, v)
    if len(units) == 1:    # one launch over every row once: its result is the block's
        lts = varlen.launch_tensors(mask, sq, sk, b, q.device)
        if len(lts) == 1 and (lts[0].launch.q0, lts[0].launch.q1) == (0, sq) and \
                lts[0].keep_q is None:
            out, lse = _launch_forward(ops, lts[0], *units[0][2], scale)
            return (_per_block(out, b, sq, sq, 0).contiguous(),
                    _per_block(lse, b, sq, sq, 1).to(acc).contiguous())
    out, lse = new_accumulators(q, acc)
    _varlen_forward_into(ops, units, q, k, out, lse, scale, mask)
    return out.to(q.dtype), lse


def varlen_forward_into(ops: FlashVarlenOps, q, k, v, out_acc, lse_acc, scale: float,
                        mask: Mask) -> None:
    """``BlockAttention.forward_into`` with varlen launches."""
    units = _units(mask, q.shape[1], k.shape[1], q, k, v)
    _varlen_forward_into(ops, units, q, k, out_acc, lse_acc, scale, mask)


@device_cache(maxsize=64)
def _no_rng_state(device: torch.device) -> torch.Tensor:
    """The varlen backward's (seed, offset) argument, which it never reads without dropout:
    one zeros tensor per device, not a fill launch per step."""
    return torch.zeros(2, dtype=torch.uint64, device=device)


def varlen_backward_into(ops: FlashVarlenOps, dout, q, k, v, out, lse, dq_acc, dk_acc, dv_acc,
                         scale: float, mask: Mask) -> None:
    """``BlockAttention.backward_into`` with varlen launches. Only band rows and keys of a
    launch's gradients are read: the fillers' are left unspecified by the kernel."""
    sq, sk, hq = q.shape[1], k.shape[1], q.shape[2]
    acc = accumulation_dtype(q.dtype)
    out, dout = out.to(q.dtype), dout.to(q.dtype)     # the kernel takes them in q's dtype
    rng_state = _no_rng_state(q.device)      # no dropout: never read (nor written)
    unused = torch.empty(0, device=q.device)
    for sel, blocks, (qr, kr, vr, dor, outr) in _units(mask, sq, sk, q, k, v, dout, out):
        lse_rows = lse[sel].to(acc).transpose(0, 1).reshape(hq, blocks * sq)
        for lt in varlen.launch_tensors(mask, sq, sk, blocks, q.device):
            L, a = lt.launch, lt.arrays
            rows, keys = slice(L.q0, L.q0 + a.total_q), slice(L.k0, L.k0 + a.total_k)
            args = (dor[rows], qr[rows], kr[keys], vr[keys], outr[rows],
                    lse_rows[:, rows].contiguous())
            grads = ops.backward(*args, lt.cu_q, lt.cu_k, a.max_q, a.max_k, 0.0, L.is_causal,
                                 rng_state, unused, scale=scale, window_size_left=L.left,
                                 window_size_right=L.right)
            if [tuple(g.shape) for g in grads] != [tuple(t.shape) for t in args[1:4]]:
                raise RuntimeError(f"the varlen flash backward returned gradients of shapes "
                                   f"{[tuple(g.shape) for g in grads]}")
            dq, dk, dv = grads
            nq, nk = L.q1 - L.q0, L.k1 - L.k0
            _add_rows(dq_acc[sel, L.q0:L.q1], _per_block(dq, blocks, sq, nq, 0), lt.keep_q)
            _add_rows(dk_acc[sel, L.k0:L.k1], _per_block(dk, blocks, sk, nk, 0), lt.keep_k)
            _add_rows(dv_acc[sel, L.k0:L.k1], _per_block(dv, blocks, sk, nk, 0), lt.keep_k)


# -- opt-in: pick the fastest CUDA kernel by measurement (unverified: no GPU run yet) --------
# Every candidate keeps the contract of ``_kernel_fwd`` / ``_kernel_bwd``: out [B, H, Sq, D] in
# q's dtype and lse [B, H, Sq] float32, natural log, so merges across candidates stay exact.
def _flash_fwd(q, k, v, causal, scale):
    return aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False,
                                                    scale=scale)[:2]


def _flash_bwd(dout, q, k, v, out, lse, causal, scale):
    seed = torch.zeros(2, dtype=torch.uint64, device=q.device)
    offset = torch.zeros((), dtype=torch.uint64, device=q.device)
    return aten._scaled_dot_product_flash_attention_backward(
        dout, q, k, v, out, lse, None, None, q.shape[2], k.shape[2], 0.0, causal,
        seed, offset, scale=scale)


def _cudnn_fwd(q, k, v, causal, scale):
    """cuDNN attention; its lse is [B, H, Sq, 1]: returned as [B, H, Sq]."""
    out, lse = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal,
                                                        False, scale=scale)[:2]
    return out, lse.reshape(lse.shape[:3])


def _cudnn_bwd(dout, q, k, v, out, lse, causal, scale):
    """The cuDNN backward, given the contract's lse [B, H, Sq] (viewed as [B, H, Sq, 1])."""
    seed = torch.zeros((), dtype=torch.long, device=q.device)   # no dropout: never read
    none = torch.empty(0, device=q.device)
    return aten._scaled_dot_product_cudnn_attention_backward(
        dout, q, k, v, out, lse.unsqueeze(-1).contiguous(), seed, seed.clone(), none, none,
        none, q.shape[2], k.shape[2], 0.0, causal, scale=scale)


class PieceKernel(NamedTuple):
    """One ATen kernel for ``TorchBackend``'s per-piece calls on [B, H, S, D] tensors."""
    forward: Callable
    backward: Callable


CUDA_PIECE_KERNELS = {"flash": PieceKernel(_flash_fwd, _flash_bwd),
                      "cudnn": PieceKernel(_cudnn_fwd, _cudnn_bwd)}


def cuda_event_timer(fn: Callable, repeats: int) -> float:
    """Median milliseconds of ``fn()`` on the current CUDA stream (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


class MeasuredPick:
    """The fastest of some candidates per key, measured on the first call with that key and
    cached here (one per backend object, no global). A candidate that raises while measured
    (e.g. cuDNN refusing a shape) is left out of that key's choice; if all raise, the error
    of the last propagates. Nothing is measured or cached while tracing (the first candidate
    is used). ``timer(fn, repeats) -> seconds or ms`` is injectable for tests."""

    def __init__(self, timer: Callable = cuda_event_timer, repeats: int = 3):
        self.timer, self.repeats = timer, repeats
        self.choice: dict = {}

    def pick(self, key, candidates: dict) -> str:
        """``candidates``: name -> a thunk running that candidate on this call's inputs."""
        if key in self.choice:
            return self.choice[key]
        if tracing():
            return next(iter(candidates))
        times, error = {}, None
        for name, run in candidates.items():
            try:
                times[name] = self.timer(run, self.repeats)
            except RuntimeError as exc:
                error = exc
        if not times:
            raise error
        self.choice[key] = best = min(times, key=times.get)
        return best


def _pick_mode(pick: Optional[str]) -> str:
    mode = os.environ.get("DISTATTN_SDPA_PICK", "default") if pick is None else pick
    if mode not in ("default", "measure"):
        raise ValueError(f"TorchBackend pick must be 'default' or 'measure', got {mode!r} "
                         f"(DISTATTN_SDPA_PICK)")
    return mode


def native_gqa_cpu() -> bool:
    """Whether the CPU flash kernels take GQA natively (``_probe_native_gqa_cpu``, run once at
    import, outside any trace: run under torch.compile or a fake mode its tensors would be
    traced ones)."""
    return _NATIVE_GQA_CPU


def _probe_native_gqa_cpu() -> bool:
    """Whether this PyTorch's CPU flash kernels take GQA natively (q with Hq = G * Hkv heads,
    query head h reading K/V head h // G), checked once on tiny float64 tensors against one
    call per query-head group (forward and backward, causal). False (one call per group
    then) when the kernels refuse it or disagree."""
    g = torch.Generator().manual_seed(0)
    q, dout = (torch.randn(1, 4, 6, 8, generator=g, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(1, 2, 6, 8, generator=g, dtype=torch.float64) for _ in range(2))
    fwd = aten._scaled_dot_product_flash_attention_for_cpu
    bwd = aten._scaled_dot_product_flash_attention_for_cpu_backward
    group = lambda t, i: t.unflatten(1, (2, 2))[:, :, i]
    try:
        out, lse = fwd(q, k, v, 0.0, True, scale=0.3)
        grads = bwd(dout, q, k, v, out, lse, 0.0, True, scale=0.3)
    except RuntimeError:
        return False
    if tuple(out.shape) != tuple(q.shape) or [tuple(t.shape) for t in grads] != \
            [tuple(t.shape) for t in (q, k, v)]:
        return False
    want_dk, want_dv = torch.zeros_like(k), torch.zeros_like(v)
    for i in range(2):
        o, l = fwd(group(q, i), k, v, 0.0, True, scale=0.3)
        gq, gk, gv = bwd(group(dout, i), group(q, i), k, v, o, l, 0.0, True, scale=0.3)
        if not (torch.allclose(o, group(out, i), rtol=1e-12, atol=1e-12) and
                torch.allclose(l, lse.unflatten(1, (2, 2))[:, :, i], rtol=1e-12, atol=1e-12)
                and torch.allclose(gq, group(grads[0], i), rtol=1e-12, atol=1e-12)):
            return False
        want_dk += gk
        want_dv += gv
    return torch.allclose(want_dk, grads[1], rtol=1e-10, atol=1e-12) and \
        torch.allclose(want_dv, grads[2], rtol=1e-10, atol=1e-12)


_NATIVE_GQA_CPU = _probe_native_gqa_cpu()


class TorchBackend(BlockAttention):
    name = "torch"
    # The varlen kernels and where they run (None: never); tests inject a CPU stand-in.
    varlen_ops: Optional[FlashVarlenOps] = _aten_varlen_ops()
    piece_kernels: dict = CUDA_PIECE_KERNELS

    def __init__(self, pick: Optional[str] = None, timer: Callable = cuda_event_timer):
        """``pick="measure"`` (or env DISTATTN_SDPA_PICK=measure, read here): on CUDA, per
        (shapes, dtype, mask kind), time varlen launches against per-piece calls and, for
        the pieces, FlashAttention against cuDNN, once, and use the fastest (``MeasuredPick``;
        unverified: no GPU run yet). Default: varlen launches with FlashAttention."""
        self.pick = _pick_mode(pick)
        self.picker = MeasuredPick(timer) if self.pick == "measure" else None

    def _varlen(self, q: torch.Tensor, softcap: float, v: torch.Tensor, k=None, mask=None,
                scale=None) -> Optional[FlashVarlenOps]:
        """The varlen ops when these inputs run as varlen launches, else None. With
        ``pick="measure"`` and the block known (k, mask, scale), the measured choice between
        varlen launches and per-piece calls of this block's forward (the backward follows it)."""
        ops = self.varlen_ops
        if ops is None or softcap or q.shape[-1] != v.shape[-1] or q.device.type not in ops.devices or \
                q.dtype not in ops.dtypes:
            return None
        if self.picker is not None and mask is not None:
            key = ("block", tuple(q.shape), tuple(k.shape), q.dtype, mask)
            pieces = lambda: BlockAttention.forward(self, q, k, v, scale=scale, mask=mask)
            choice = self.picker.pick(key, {
                "varlen": lambda: varlen_forward(ops, q, k, v, scale, mask), "pieces": pieces})
            return ops if choice == "varlen" else None
        return ops

    def prepare_launches(self, mask: Mask, q: torch.Tensor, sq: int, sk: int) -> None:
        """Build the varlen launch tensors of ``mask`` (an sq x sk block) on q's device now,
        before a ring starts, when these inputs may take the varlen path: the steps then
        find them in ``varlen.launch_tensors``' cache (no host-to-device copy inside a step,
        none at all on later calls with the same plan)."""
        ops = self.varlen_ops
        if ops is None or q.device.type not in ops.devices or q.dtype not in ops.dtypes:
            return
        b = q.shape[0]
        if b > 1 and varlen.max_sequences(mask, sq, sk, b) <= varlen.MAX_SEQUENCES:
            varlen.launch_tensors(mask, sq, sk, b, q.device)   # one unit stacks the batch
        varlen.launch_tensors(mask, sq, sk, 1, q.device)

    def forward(self, q, k, v, *, scale, mask, softcap=0.0):
        ops = self._varlen(q, softcap, v, k, mask, scale)
        if ops is None:
            return super().forward(q, k, v, scale=scale, mask=mask, softcap=softcap)
        return varlen_forward(ops, q, k, v, scale, mask)

    def forward_into(self, q, k, v, out_acc, lse_acc, *, scale, mask, softcap=0.0):
        ops = self._varlen(q, softcap, v, k, mask, scale)
        if ops is None:
            return super().forward_into(q, k, v, out_acc, lse_acc, scale=scale, mask=mask,
                                        softcap=softcap)
        return varlen_forward_into(ops, q, k, v, out_acc, lse_acc, scale, mask)

    def backward_into(self, dout, q, k, v, out, lse, dq_acc, dk_acc, dv_acc, *, scale, mask,
                      softcap=0.0):
        ops = self._varlen(q, softcap, v, k, mask, scale)
        if ops is None:
            return super().backward_into(dout, q, k, v, out, lse, dq_acc, dk_acc, dv_acc,
                                         scale=scale, mask=mask, softcap=softcap)
        return varlen_backward_into(ops, dout, q, k, v, out, lse, dq_acc, dk_acc, dv_acc,
                                    scale, mask)

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
    def _piece_kernel(self, q, k, v, causal, scale) -> PieceKernel:
        """FlashAttention, or with ``pick="measure"`` the measured fastest for these shapes."""
        if self.picker is None:
            return self.piece_kernels["flash"]
        key = ("piece", tuple(q.shape), tuple(k.shape), q.dtype, causal)
        name = self.picker.pick(key, {n: (lambda c=c: c.forward(q, k, v, causal, scale))
                                      for n, c in self.piece_kernels.items()})
        return self.piece_kernels[name]

    def _kernel_fwd(self, q, k, v, causal, scale):
        if q.device.type == "cpu":
            return aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, 0.0, causal, scale=scale)
        return self._piece_kernel(q, k, v, causal, scale).forward(q, k, v, causal, scale)

    def _kernel_bwd(self, dout, q, k, v, out, lse, causal, scale):
        if q.device.type == "cpu":
            return aten._scaled_dot_product_flash_attention_for_cpu_backward(
                dout, q, k, v, out, lse, 0.0, causal, scale=scale)
        kernel = self._piece_kernel(q, k, v, causal, scale)   # the forward's pick
        return kernel.backward(dout, q, k, v, out, lse, causal, scale)

    # -- one query-head group of one piece ----------------------------------------------------
    def _group_views(self, t: torch.Tensor, hkv: int):
        """[B, S, Hkv*G, X] -> list of G views [B, S, Hkv, X], one per group member (views
        of any strides: splitting one dim never copies, and ``view`` would raise if it had
        to -- accumulators are updated through these)."""
        b, s, h, x = t.shape
        g = h // hkv
        grouped = t.view(b, s, hkv, g, x)
        return [grouped[:, :, :, i] for i in range(g)]

    # PyTorch's flash kernels (CPU, CUDA, varlen) need one head dim for q, k and v: with
    # V's head dim different (MLA) the pieces run on the reference math, at the true dims
    # (padding V to q's would compute on the padding).
    @staticmethod
    def _needs_reference(mask: Mask, softcap: float, q, v) -> bool:
        return (q.shape[-1] != v.shape[-1] or bool(softcap)
                or mask.kind not in ("none", "causal", "empty"))

    def forward_piece(self, q, k, v, *, scale, mask, softcap=0.0):
        if self._needs_reference(mask, softcap, q, v):
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
        if self._needs_reference(mask, softcap, q, v):
            return ReferenceBackend().backward_piece(dout, q, k, v, out, lse, scale=scale,
                                                     mask=mask, softcap=softcap)
        acc = accumulation_dtype(q.dtype)
        b, sq, hq, _ = q.shape
        sk, hkv = k.shape[1], k.shape[2]
        dq, dk, dv = (torch.zeros(t.shape, dtype=acc, device=q.device) for t in (q, k, v))
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

    # -- the ring step: each call merged / added straight into the accumulators --------------
    @staticmethod
    def _one_call_gqa(q, k) -> bool:
        """One kernel call for all query heads: equal head counts, or GQA on CPU where the
        kernels take it natively (``native_gqa_cpu``)."""
        return q.shape[2] == k.shape[2] or (q.device.type == "cpu" and native_gqa_cpu())

    def forward_piece_into(self, q, k, v, out_acc, lse_acc, *, scale, mask, softcap=0.0):
        """Per causal piece, one kernel call (one per query-head group where GQA is not
        native) whose (out, lse) merges into views of (out_acc, lse_acc): no block result
        is assembled first."""
        if self._needs_reference(mask, softcap, q, v):
            return super().forward_piece_into(q, k, v, out_acc, lse_acc, scale=scale,
                                              mask=mask, softcap=softcap)
        sq, sk, hkv = q.shape[1], k.shape[1], k.shape[2]
        if self._one_call_gqa(q, k):
            groups = [(q, out_acc, lse_acc)]
        else:
            g = q.shape[2] // hkv
            lse_g = lse_acc.unflatten(1, (hkv, g))
            groups = list(zip(self._group_views(q, hkv), self._group_views(out_acc, hkv),
                              [lse_g[:, :, i] for i in range(g)]))
        for p in causal_pieces(mask, sq, sk):
            kp, vp = _heads_first(k[:, p.k0:p.k1]), _heads_first(v[:, p.k0:p.k1])
            for qg, og, lg in groups:
                o, l = self._kernel_fwd(_heads_first(qg[:, p.q0:p.q1]), kp, vp, p.causal, scale)
                merge_(og[:, p.q0:p.q1], lg[:, :, p.q0:p.q1], o.transpose(1, 2), l)

    def backward_piece_into(self, dout, q, k, v, out, lse, dq_acc, dk_acc, dv_acc, *,
                            scale, mask, softcap=0.0):
        """Per causal piece, one kernel call (one per query-head group where GQA is not
        native) whose gradients are added straight into views of the accumulators."""
        if self._needs_reference(mask, softcap, q, v):
            return super().backward_piece_into(dout, q, k, v, out, lse, dq_acc, dk_acc,
                                               dv_acc, scale=scale, mask=mask,
                                               softcap=softcap)
        sq, sk, hkv = q.shape[1], k.shape[1], k.shape[2]
        lse = lse.to(accumulation_dtype(q.dtype))      # the kernels read it in this dtype
        if self._one_call_gqa(q, k):
            groups = [(dout, q, out, lse, dq_acc)]
        else:
            g = q.shape[2] // hkv
            lse_g = lse.unflatten(1, (hkv, g))
            groups = list(zip(*(self._group_views(t, hkv) for t in (dout, q, out)),
                              [lse_g[:, :, i] for i in range(g)],
                              self._group_views(dq_acc, hkv)))
        for p in causal_pieces(mask, sq, sk):
            rows, keys = slice(p.q0, p.q1), slice(p.k0, p.k1)
            kp, vp = _heads_first(k[:, keys]), _heads_first(v[:, keys])
            for dog, qg, og, lg, dqg in groups:
                lg = lg[:, :, rows]
                if q.device.type != "cpu":      # CPU kernels read strided lse (as q/k/v)
                    lg = lg.contiguous()
                gq, gk, gv = self._kernel_bwd(_heads_first(dog[:, rows]),
                                              _heads_first(qg[:, rows]), kp, vp,
                                              _heads_first(og[:, rows]), lg, p.causal, scale)
                dqg[:, rows].add_(gq.transpose(1, 2))
                dk_acc[:, keys].add_(gk.transpose(1, 2))
                dv_acc[:, keys].add_(gv.transpose(1, 2))
