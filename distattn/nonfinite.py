"""Non-finite inputs: NaN and +-inf propagate as in one-process attention (docs/DESIGN.md,
"Non-finite inputs").

The block kernels cannot be trusted with non-finite values: PyTorch's CPU flash kernel returns
out 0, lse 0 for a NaN row over one or two keys, and every tiled kernel spreads a NaN or inf of
V to rows of its tile that do not see it (0 * NaN in the P.V product). So the executors hand
the backends *sanitized* tensors (every non-finite element replaced by 0) and apply the effect
of the non-finite elements themselves, structurally, from flags of the raw values:

Forward, for a query row i that sees at least one key of the block (padding rows never do):

- q_i has a non-finite element, or a key j that row i sees has a non-finite element in k_j:
  out_i and lse_i are NaN (a one-process softmax over such scores is undefined);
- else a non-finite v_j[d] of a key j that row i sees makes out_i[d] the sum of those values
  (NaN, +inf or -inf; +inf with -inf is NaN), as p_ij * v_j[d] with p_ij > 0; lse_i stays
  finite.

One process gives the same except where an infinite k_j scores -inf for row i and row i sees
other keys: one process then gives key j weight 0 (finite), distattn gives NaN. (Telling the
two apart needs the score's sign, i.e. a second Q.K^T product.) One process's dense
``softmax(S) @ V`` also spreads a NaN of v_j to rows that do not see j (0 * NaN); rows here see
only their own keys.

Backward, from the final (out, lse) and dout of each row: a row is *dead* when its lse is NaN
or +inf, or its q or dout has a non-finite element; *bad* when dead or its out has one. Dead
rows are zeroed before the kernel (lse 0 too: every contribution is then exactly 0). Then dq_i
is NaN for bad rows; dK_j for keys some bad row sees; dV_j for keys some dead row sees -- the
gradients that are non-finite in one process (a non-finite element of dout counts for its
whole row, where one process would spoil only that element's column of dV).

Everything here is tensor ops (no host synchronisation). The ring executor skips all of it
for a call whose inputs are finite, read once per call on the host (CPU; CUDA too unless
``DISTATTN_FINITE_CHECK=device``, never while compiling or capturing) (``host_readable``,
``finite_total``; docs/DESIGN.md, "Non-finite inputs"). K/V travel raw, so every rank that
computes on them derives the same flags; query rows a helper computes on travel sanitized,
with their flags (``RowFlags.codes``). Window sums use prefix sums over the block's keys
(forward) or rows (backward), so the cost per block is linear in its rows and keys.
"""
from __future__ import annotations

import os

import torch

from .kernels.device_cache import device_cache
from .kernels.mask import Mask


def _sync_check_devices() -> tuple:
    mode = os.environ.get("DISTATTN_FINITE_CHECK", "sync")
    if mode not in ("device", "sync"):
        raise ValueError(f"DISTATTN_FINITE_CHECK must be 'sync' or 'device', got {mode!r}")
    return ("cuda",) if mode == "sync" else ()


# UNVERIFIED ON A GPU. DISTATTN_FINITE_CHECK (read at import): "sync" (default) reads the
# call's finite flag on the host for CUDA tensors too -- one device synchronisation per ring
# call (forward and backward each), before the first hop -- so that a call with finite inputs
# runs the plain path as on CPU (tests/test_launches.py: the cuda backend launches nothing per
# forward step besides its kernel, the torch backend 8; the tensor-op path launches 28).
# Never under torch.compile or CUDA graph capture, which take the tensor-op path (no host
# read). "device": CUDA never synchronises and every CUDA call takes the tensor-op path.
SYNC_CHECK_DEVICES = _sync_check_devices()


def _capturing(t: torch.Tensor) -> bool:
    return t.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def host_readable(t: torch.Tensor) -> bool:
    """True where the executors read one flag of ``t``'s device on the host: a plain tensor
    outside torch.compile, on the CPU (no device synchronisation) or, with
    ``DISTATTN_FINITE_CHECK=sync`` (the default), on CUDA outside CUDA graph capture (one
    synchronisation per call). Fake and traced tensors never are."""
    return type(t) is torch.Tensor and not torch.compiler.is_compiling() and \
        (t.device.type == "cpu" or t.device.type in SYNC_CHECK_DEVICES) and not _capturing(t)


def finite_total(*tensors: torch.Tensor) -> torch.Tensor:
    """float64 scalar that is finite when every element of ``tensors`` is finite (NaN and
    +-inf survive a sum; lse's -inf of an empty row counts as finite). A false alarm -- a
    float64 sum of finite values that overflows -- only sends a call down the exact
    non-finite path."""
    total = None
    for t in tensors:
        s = t.sum(dtype=torch.float64)
        total = s if total is None else total.add_(s)
    return total


def finite_lse(lse: torch.Tensor) -> torch.Tensor:
    """``lse`` with -inf (a row that sees no key) as 0, for ``finite_total``."""
    return torch.where(lse == float("-inf"), 0.0, lse)


def sanitized(t: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``t`` with NaN and +-inf replaced by 0 (a new tensor, or written into ``out``)."""
    return torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0, out=out)


class Scratch:
    """One buffer, allocated once per call, that receives ``sanitized`` copies of tensors of
    at most ``numel`` elements (the K/V a ring step computes on, while the raw ones travel
    on)."""

    def __init__(self, numel: int, dtype: torch.dtype, device):
        self.buf = torch.empty(numel, dtype=dtype, device=device)

    def clean(self, t: torch.Tensor) -> torch.Tensor:
        return sanitized(t, out=self.buf[:t.numel()].view(t.shape))


def bad_rows(t: torch.Tensor) -> torch.Tensor:
    """[..., X] -> [...] bool: True where some element of the last dim is not finite (x * 0
    is 0 for finite x and NaN otherwise; cheaper than a boolean reduction)."""
    return torch.isnan((t * 0).sum(-1))


def _prefix(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Inclusive prefix sums along ``dim`` with a leading 0: window [a, b) sums to p[b] - p[a]."""
    shape = list(x.shape)
    shape[dim] = 1
    return torch.cat([x.new_zeros(shape), x.cumsum(dim)], dim)


def _window(prefix: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    return prefix.index_select(1, end) - prefix.index_select(1, start)


def _bound(first: int, n: int, lo: int, hi: int, default: int):
    """Per-row window bound ``clamp(first + a, lo, hi)`` for a in range(n) (``first`` None:
    ``default`` everywhere) as ("const", x), ("range", x) (x + a, no clamp needed) or
    ("index", x) -- so most windows read a slice, not a gather."""
    if first is None:
        return "const", default
    if lo <= first and first + n - 1 <= hi:
        return "range", first
    return "index", torch.arange(first, first + n).clamp(lo, hi)


@device_cache(maxsize=4096)   # not while tracing: no fake tensor stays cached
def _pieces(mask: Mask, sq: int, sk: int, device: torch.device) -> tuple:
    """Per piece of ``mask`` (block coordinates): (q0, q1, k0, k1, key_start, key_end, sees,
    row_start, row_end): row q0 + a sees keys [key_start, key_end) (``_bound`` forms), ``sees``
    [q1 - q0] bool: it sees one at all; key k0 + b is seen by rows [row_start[b], row_end[b])
    (index tensors). Tensors on ``device``."""
    out = []
    for p in mask.simplify(sq, sk).pieces:
        q0, q1, k0, k1 = p.span(sq, sk)
        n = q1 - q0
        ks = _bound(None if p.lo is None else q0 + p.lo, n, k0, k1, k0)
        ke = _bound(None if p.hi is None else q0 + p.hi + 1, n, k0, k1, k1)
        i = torch.arange(q0, q1)
        lo_ = (i + p.lo).clamp(k0, k1) if p.lo is not None else torch.full_like(i, k0)
        hi_ = (i + p.hi + 1).clamp(k0, k1) if p.hi is not None else torch.full_like(i, k1)
        j = torch.arange(k0, k1)
        rs = (j - p.hi).clamp(q0, q1) if p.hi is not None else torch.full_like(j, q0)
        re = (j - p.lo + 1).clamp(q0, q1) if p.lo is not None else torch.full_like(j, q1)
        move = lambda b: (b[0], b[1].to(device)) if b[0] == "index" else b
        out.append((q0, q1, k0, k1, move(ks), move(ke), (hi_ > lo_).to(device),
                    rs.to(device), torch.maximum(re, rs).to(device)))
    return tuple(out)


class KeyFlags:
    """Flags of a block's raw keys, for ``poison_forward_``: k [B, Sk, Hkv, D], v [B, Sk, Hkv,
    Dv] and optionally ``v_clean`` (``sanitized(v)``, when the caller has it). Per key and K/V head
    whether k has a non-finite element; per element of v a code, 0 when finite, 1 for +inf,
    F for -inf and F + 1 for NaN (NaN counts as both signs), F above any count of a window,
    in a float dtype whose sums over the keys are exact."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, v_clean: torch.Tensor | None = None):
        self.sk = sk = k.shape[1]
        self.k_bad = _prefix(bad_rows(k).to(torch.float64))             # [B, Sk+1, Hkv]
        if sk <= 4094 and v.dtype != torch.float64:
            dtype, self.f = torch.float32, 4096       # sums below 2**24: exact in float32
        else:
            dtype, self.f = torch.float64, 1 << 26
        f = float(self.f)
        v_clean = sanitized(v) if v_clean is None else v_clean
        self.v_code = (torch.nan_to_num(v.to(dtype), nan=f + 1, posinf=1.0, neginf=f)
                       - v_clean.to(dtype))                              # [B, Sk, Hkv, Dv]
        self._prefix = None

    def _take(self, prefix, bound, n):
        kind, x = bound
        if kind == "const":
            return prefix[:, x:x + 1]
        if kind == "range":
            return prefix[:, x:x + n]
        return prefix.index_select(1, x)

    def v_sums(self, ks, ke, n) -> torch.Tensor:
        """Sum of the codes over each row's window: [B, n or 1, Hkv, Dv]."""
        if ks[0] == ke[0] == "const":          # every row sees the same keys
            return self.v_code[:, ks[1]:ke[1]].sum(1, keepdim=True)
        if self._prefix is None:
            self._prefix = _prefix(self.v_code)
        return self._take(self._prefix, ke, n) - self._take(self._prefix, ks, n)

    def k_dead(self, ks, ke, n) -> torch.Tensor:
        """[B, n or 1, Hkv] bool: the row sees a key whose k is not finite."""
        return (self._take(self.k_bad, ke, n) - self._take(self.k_bad, ks, n)) > 0


def poison_forward_(out: torch.Tensor, lse: torch.Tensor, mask: Mask, keys: KeyFlags,
                    q_bad: torch.Tensor | None = None) -> None:
    """Apply the non-finite keys (and, with ``q_bad`` [B, Sq, Hq] bool, the non-finite query
    rows) of one block to its result, in place, *after* the block was merged into ``out`` [B,
    Sq, Hq, Dv] / ``lse`` [B, Hq, Sq] (accumulators or a block result; strided views are
    fine). Poisoned entries only ever become NaN or +-inf, which later merges keep."""
    b, sq, hq, dv = out.shape
    hkv = keys.k_bad.shape[2]
    g = hq // hkv
    inf, f = float("inf"), keys.f
    for q0, q1, k0, k1, ks, ke, sees, _, _ in _pieces(mask, sq, keys.sk, out.device):
        n = q1 - q0
        dead = keys.k_dead(ks, ke, n).unsqueeze(-1)                     # [B, n|1, Hkv, 1]
        if q_bad is not None:
            dead = dead | (q_bad[:, q0:q1].unflatten(2, (hkv, g)) & sees.view(1, -1, 1, 1))
        dead = dead.expand(b, n, hkv, g)
        c = keys.v_sums(ks, ke, n)                                       # [B, n|1, Hkv, Dv]
        # the sum of the window's non-finite values: +inf, -inf, both (NaN) or none (0)
        val = torch.where(torch.remainder(c, f) > 0, inf, 0.0).to(out.dtype)
        val = torch.where(c >= f, val - inf, val)
        rows = out[:, q0:q1].unflatten(2, (hkv, g))                      # [B, n, Hkv, G, Dv]
        rows.add_(val.unsqueeze(3))
        rows.masked_fill_(dead.unsqueeze(-1), float("nan"))
        lse[:, :, q0:q1].unflatten(1, (hkv, g)).masked_fill_(dead.permute(0, 2, 3, 1),
                                                              float("nan"))


class RowFlags:
    """Flags of a block's query rows for the backward: ``dead`` and ``bad`` [B, Sq, Hq] bool
    (see the module docstring). ``of`` derives them from the raw q [B, Sq, Hq, D], final out
    [B, Sq, Hq, Dv], lse [B, Hq, Sq] and dout; ``codes`` / ``from_codes`` carry them as one
    uint8 tensor (bit 0 dead, bit 1 bad) to a rank that computes on those rows."""

    def __init__(self, dead: torch.Tensor, bad: torch.Tensor):
        self.dead, self.bad, self.sq = dead, bad, dead.shape[1]
        code = dead.to(torch.int64) + (bad.to(torch.int64) << 32)
        self.code = _prefix(code)                                        # [B, Sq+1, Hq]

    @classmethod
    def of(cls, q, out, lse, dout) -> "RowFlags":
        lse = lse.transpose(1, 2)
        dead = bad_rows(q) | bad_rows(dout) | torch.isnan(lse) | (lse == float("inf"))
        return cls(dead, dead | bad_rows(out))

    def codes(self) -> torch.Tensor:
        return self.dead.to(torch.uint8) + 2 * self.bad.to(torch.uint8)

    @classmethod
    def from_codes(cls, codes: torch.Tensor) -> "RowFlags":
        return cls((codes & 1) > 0, (codes & 2) > 0)

    def rows(self, sl: slice) -> "RowFlags":
        return RowFlags(self.dead[:, sl], self.bad[:, sl])

    def sanitize(self, q, out, lse, dout):
        """(q, out, lse, dout) for the kernels: finite, and dead rows all zero (lse 0)."""
        keep = ~self.dead.unsqueeze(-1)
        zero = lambda t: torch.where(keep, sanitized(t), 0.0)
        return (zero(q), zero(out), torch.where(self.dead.transpose(1, 2), 0.0, lse),
                zero(dout))


def poison_backward_(dq, dk, dv, mask: Mask, rows: RowFlags) -> None:
    """Apply a block's bad and dead rows to its gradients, in place, after the block's
    backward added into ``dq`` [B, Sq, Hq, D], ``dk`` [B, Sk, Hkv, D], ``dv`` [B, Sk, Hkv,
    Dv] (accumulators, strided views fine)."""
    sk, hq, hkv = dk.shape[1], dq.shape[2], dk.shape[2]
    g = hq // hkv
    nan = float("nan")
    for q0, q1, k0, k1, _, _, sees, rs, re in _pieces(mask, rows.sq, sk, dq.device):
        dq[:, q0:q1].masked_fill_(rows.bad[:, q0:q1].unsqueeze(-1) & sees.view(1, -1, 1, 1),
                                  nan)
        c = _window(rows.code, rs, re).unflatten(2, (hkv, g)).sum(3)    # [B, nk, Hkv]
        dk[:, k0:k1].masked_fill_(((c >> 32) > 0).unsqueeze(-1), nan)
        dv[:, k0:k1].masked_fill_(((c & 0xFFFFFFFF) > 0).unsqueeze(-1), nan)
