"""A closed-form cost model of exact distributed attention (pure Python: no torch).

It predicts the time of one attention forward + backward on a ``Topology`` for a
``Workload`` under a ``Config`` (Ulysses degree U, ring degree R, placement, layout,
schedule). Every ring step is priced in closed form from the busiest rank's work at that step,
so one prediction costs O(R + documents x R) arithmetic, and P = 1024 takes microseconds.

Units: seconds, bytes, FLOP/s (``KernelTable`` rows in TFLOP/s), tokens.

Terms (each measurable, none simulated):

- **kernel efficiency**: TFLOP/s of one fused attention call (forward + backward) as a
  function of its sequence length, head dim and causality, read off published kernel tables
  (``FA2_A100``, ``FA2_H100``; the source is on each table). A block of ``lq x lk`` keys with
  a fraction ``f`` of visible pairs is priced between the causal row (f = 1/2) and the
  non-causal row (f = 1) at length ``sqrt(lq * lk)``. Too few thread blocks to fill the GPU
  (few heads x short blocks) lower it by wave quantisation.
- **per-step accumulator traffic** (``STEP_BYTES_PER_ELEM``, the one fitted constant of the
  kernel side): each ring step merges a partial output into fp32 accumulators (forward) and
  adds dq / dK / dV partials (backward); that memory traffic is priced at HBM bandwidth.
- **links** (``LinkClass``): bandwidth per GPU per direction and latency per message, per class
  (NVLink in a node, InfiniBand / PCIe across). A P2P ring step moves at its slowest hop; an
  all-to-all splits its bytes between the in-node and cross-node parts.
- **overlap**: a ring step lasts ``max(compute, comm) + (1 - overlap) * min(compute, comm)``;
  Ulysses all-to-alls and the all-gather are not overlapped (as distattn runs them).

Schedules priced: ``ring`` (layouts contiguous / zigzag / stripe, documents by ``doc_zigzag``
or ``contiguous``), ``helper`` (DistFlashAttn), ``allgather`` (llama3-style: gather K/V, one
call), ``double_ring`` (a ring of node-rings; modelled only: distattn cannot run it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

# ---------------------------------------------------------------------------------------------
# Kernel tables
# ---------------------------------------------------------------------------------------------

SEQ_POINTS = (512, 1024, 2048, 4096, 8192, 16384)


@dataclass(frozen=True)
class KernelTable:
    """Forward + backward TFLOP/s of one attention kernel at ``SEQ_POINTS`` sequence lengths,
    per (causal, head_dim); measured at batch x seqlen = 16k tokens, 16 heads of 128 (hidden
    2048), so every point fills the GPU. ``sms``: streaming multiprocessors (wave
    quantisation); ``hbm``: achievable memory bandwidth, bytes/s; ``source``: where the numbers
    were published. FLOPs are counted as the source does: forward ``4 * pairs * head_dim`` per
    head (causal: half the pairs), backward 2.5 x forward."""
    name: str
    rows: dict
    sms: int
    hbm: float
    source: str

    def tflops(self, seq: float, causal: bool, head_dim: int) -> float:
        """TFLOP/s at length ``seq`` (log-linear between points, clamped at the ends)."""
        dims = sorted({d for (_, d) in self.rows})
        d = min(dims, key=lambda x: abs(x - head_dim))
        row = self.rows[(causal, d)]
        x = math.log2(max(seq, 1.0))
        xs = [math.log2(s) for s in SEQ_POINTS]
        if x <= xs[0]:
            return row[0] * max(seq, 1.0) / SEQ_POINTS[0] if seq < SEQ_POINTS[0] / 4 else row[0]
        if x >= xs[-1]:
            return row[-1]
        i = max(j for j in range(len(xs)) if xs[j] <= x)
        w = (x - xs[i]) / (xs[i + 1] - xs[i])
        return row[i] * (1 - w) + row[i + 1] * w


# FlashAttention-2, forward + backward, bf16/fp16: Dao, "FlashAttention-2" (arXiv 2307.08691),
# Figure 4 (A100 80GB SXM4); the same plots are assets/flash2_a100_fwd_bwd_benchmark.png and
# assets/flash2_h100_fwd_bwd_benchmark.png of github.com/Dao-AILab/flash-attention. The A100
# non-causal hd128 points at 512 and 1k are hidden by the legend in that figure; they are
# taken equal to the hd64 ones (132) and interpolated (173 is printed half-hidden).
FA2_A100 = KernelTable(
    "FlashAttention-2 A100-SXM4-80GB",
    {(False, 64): (132, 153, 162, 171, 175, 176),
     (False, 128): (132, 173, 187, 196, 201, 203),
     (True, 64): (88, 119, 140, 156, 165, 171),
     (True, 128): (99, 133, 155, 173, 182, 189)},
    sms=108, hbm=1.6e12,
    source="FlashAttention-2 paper fig. 4 / flash-attention assets/flash2_a100_fwd_bwd_benchmark.png")
FA2_H100 = KernelTable(
    "FlashAttention-2 H100-SXM5-80GB",
    {(False, 64): (215, 254, 274, 288, 294, 296),
     (False, 128): (248, 294, 320, 326, 335, 338),
     (True, 64): (141, 192, 232, 257, 273, 284),
     (True, 128): (163, 221, 265, 294, 308, 328)},
    sms=132, hbm=2.6e12,
    source="flash-attention assets/flash2_h100_fwd_bwd_benchmark.png")

# ---------------------------------------------------------------------------------------------
# Links and topologies
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinkClass:
    """One class of link: ``bandwidth`` bytes/s per GPU in each direction of P2P transfers
    (achievable, not nominal), ``latency`` seconds per message, ``a2a_bandwidth`` bytes/s per
    GPU of the all-to-all collective on this class (None: the P2P bandwidth)."""
    name: str
    bandwidth: float
    latency: float
    a2a_bandwidth: Optional[float] = None

    @property
    def a2a(self) -> float:
        return self.a2a_bandwidth if self.a2a_bandwidth is not None else self.bandwidth

    def seconds(self, nbytes: float, messages: int = 1) -> float:
        return 0.0 if nbytes <= 0 else messages * self.latency + nbytes / self.bandwidth


# Achievable per-GPU, per-direction bandwidths: ~80% of nominal (NCCL bus bandwidth).
NVLINK_A100 = LinkClass("NVLink3 (A100)", 240e9, 10e-6)      # 300 GB/s nominal per direction
NVLINK_H100 = LinkClass("NVLink4 (H100)", 360e9, 10e-6)      # 450 GB/s
NVLINK_H800 = LinkClass("NVLink (H800)", 160e9, 10e-6)       # 200 GB/s
PCIE4 = LinkClass("PCIe 4.0 x16", 22e9, 15e-6)               # 32 GB/s
IB_NDR = LinkClass("InfiniBand NDR 400Gb/s, one NIC per GPU", 40e9, 20e-6)   # 50 GB/s
IB_HDR = LinkClass("InfiniBand HDR 200Gb/s, one NIC per GPU", 20e9, 20e-6)   # 25 GB/s


@dataclass(frozen=True)
class Topology:
    """``gpus`` GPUs, ``gpus_per_node`` to a node, ``intra`` links inside a node, ``inter``
    across nodes (per GPU: rail-optimised, one NIC each), ``kernel`` the attention kernel's
    table, ``overlap`` the fraction of the shorter of compute and P2P communication hidden
    under the longer in a ring step (1: perfect)."""
    gpus: int
    gpus_per_node: int = 8
    intra: LinkClass = NVLINK_H100
    inter: LinkClass = IB_NDR
    kernel: KernelTable = FA2_H100
    overlap: float = 1.0
    name: str = ""

    def __post_init__(self):
        for arg in ("gpus", "gpus_per_node"):
            v = getattr(self, arg)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"Topology {arg} must be a positive int, got {v!r}")
        if self.gpus > self.gpus_per_node and self.gpus % self.gpus_per_node:
            raise ValueError(f"Topology gpus={self.gpus} must be a multiple of "
                             f"gpus_per_node={self.gpus_per_node} when it spans nodes")
        if not 0.0 <= self.overlap <= 1.0:
            raise ValueError(f"Topology overlap must be in [0, 1], got {self.overlap!r}")
        for arg in ("intra", "inter"):
            link = getattr(self, arg)
            if not isinstance(link, LinkClass) or link.bandwidth <= 0 or link.latency < 0:
                raise ValueError(f"Topology {arg} must be a LinkClass with bandwidth > 0 and "
                                 f"latency >= 0, got {link!r}")

    @property
    def nodes(self) -> int:
        return max(1, self.gpus // self.gpus_per_node)


def cluster(gpus: int, gpu: str = "H100", gpus_per_node: int = 8) -> Topology:
    """The usual cluster: ``gpu`` ("H100" or "A100") nodes of ``gpus_per_node`` on NVLink,
    InfiniBand NDR across (one NIC per GPU)."""
    if gpu not in ("H100", "A100"):
        raise ValueError(f"gpu must be 'H100' or 'A100', got {gpu!r}")
    h = gpu == "H100"
    return Topology(gpus, gpus_per_node, NVLINK_H100 if h else NVLINK_A100,
                    IB_NDR if h else IB_HDR, FA2_H100 if h else FA2_A100,
                    name=f"{gpus}x{gpu}")

# ---------------------------------------------------------------------------------------------
# Workload and configuration
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """One attention call: ``seq_len`` tokens in all, ``heads`` query heads of ``head_dim``,
    ``kv_heads`` K/V heads (None: MHA), ``batch``, ``causal``, ``documents`` (global document
    lengths summing to seq_len, or None for one), ``elt`` bytes per element (bf16: 2),
    ``grad_elt`` bytes per element of the dK/dV partial sums that travel (distattn: fp32)."""
    seq_len: int
    heads: int
    head_dim: int
    kv_heads: Optional[int] = None
    batch: int = 1
    causal: bool = True
    documents: Optional[tuple] = None
    elt: int = 2
    grad_elt: int = 4

    def __post_init__(self):
        for arg in ("seq_len", "heads", "head_dim", "batch"):
            v = getattr(self, arg)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{arg} must be a positive int, got {v!r}")
        kv = self.kv_heads if self.kv_heads is not None else self.heads
        if not isinstance(kv, int) or kv < 1 or self.heads % kv:
            raise ValueError(f"kv_heads must be a positive int dividing heads={self.heads}, "
                             f"got {self.kv_heads!r}")
        if self.documents is not None:
            docs = tuple(int(d) for d in self.documents)
            if not docs or min(docs) < 1 or sum(docs) != self.seq_len:
                raise ValueError(f"documents must be positive lengths summing to seq_len="
                                 f"{self.seq_len}, got {self.documents!r}")
            object.__setattr__(self, "documents", docs)

    @property
    def hkv(self) -> int:
        return self.kv_heads if self.kv_heads is not None else self.heads

    def flops(self, pairs: float, heads: int) -> float:
        """Forward + backward FLOPs of ``pairs`` visible (query, key) pairs on ``heads`` heads
        (the kernel tables' convention: 4 * head_dim per pair forward, x 3.5 with backward)."""
        return 3.5 * 4.0 * pairs * self.head_dim * heads * self.batch


@dataclass(frozen=True)
class Config:
    """A way to run it: ``ulysses`` x ``ring`` ranks, ``placement`` ("ulysses_inner": Ulysses
    groups are consecutive ranks; "ring_inner"), ``layout``, ``schedule`` ("ring", "helper",
    "allgather", "double_ring")."""
    ulysses: int
    ring: int
    layout: str = "zigzag"
    schedule: str = "ring"
    placement: str = "ulysses_inner"

    @property
    def label(self) -> str:
        return f"U{self.ulysses}xR{self.ring} {self.layout}/{self.schedule}"


@dataclass(frozen=True)
class Prediction:
    """Predicted seconds of one forward + backward (``seconds``) and its parts: ``compute``
    (kernel time of the busiest rank, summed over steps), ``ring_comm_exposed`` (P2P / gather
    time not hidden under compute), ``a2a`` (Ulysses all-to-alls), ``overhead`` (per-step
    accumulator traffic), ``ideal`` (the whole attention as one call per GPU share:
    single-GPU kernel time at the full length / P), ``steps``."""
    config: Config
    seconds: float
    compute: float
    ring_comm_exposed: float
    a2a: float
    overhead: float
    ideal: float
    steps: int
    ring_link: str
    a2a_link: str

    @property
    def efficiency(self) -> float:
        return self.ideal / self.seconds


# ---------------------------------------------------------------------------------------------
# Fitted constant (one) and the pieces of a step
# ---------------------------------------------------------------------------------------------

#: Bytes of accumulator memory traffic per ring step per (query token x query head x head_dim
#: element), forward + backward together. The physical floor is ~30 (fp32 read + write of the
#: output accumulator and of dq, the block's bf16 outputs, the dK/dV partial sums); the fitted
#: value also absorbs the copies around each block call and the SMs NCCL occupies. Fitted once
#: (to the nearest 5) to minimise the largest error over the three batch-API fwd+bwd rows of
#: ring-flash-attention's 8xH800 table (contiguous, zigzag, stripe); bench/model_check.py
#: prints every row it was not fitted on too.
STEP_BYTES_PER_ELEM = 45.0


def _kernel_seconds(top: Topology, w: Workload, lq: float, lk: float, pairs: float,
                    heads: int) -> float:
    """One fused call: ``lq`` queries x ``lk`` keys with ``pairs`` visible, on ``heads`` heads."""
    if pairs <= 0:
        return 0.0
    frac = min(1.0, max(0.5, pairs / (lq * lk)))
    L = math.sqrt(lq * lk)
    kt = top.kernel
    causal_t, full_t = kt.tflops(L, True, w.head_dim), kt.tflops(L, False, w.head_dim)
    tflops = causal_t + (full_t - causal_t) * (2 * frac - 1)
    # wave quantisation: thread blocks of 128 query rows per (batch, head)
    ctas = w.batch * heads * math.ceil(lq / 128)
    waves = ctas / top.kernel.sms
    fill = waves / math.ceil(waves) if waves < 4 else 1.0
    return w.flops(pairs, heads) / (tflops * 1e12 * fill)


def _step_overhead(top: Topology, w: Workload, rows: float, heads: int) -> float:
    return STEP_BYTES_PER_ELEM * rows * heads * w.head_dim * w.batch / top.kernel.hbm


def _group_links(top: Topology, cfg: Config) -> tuple:
    """(ring link, ring members per node, a2a in-node members) for the placement."""
    g = top.gpus_per_node
    U, R = cfg.ulysses, cfg.ring
    if cfg.placement == "ulysses_inner":
        u_in = min(U, g)
        r_in = max(1, min(R, g // U)) if U <= g else 1
    else:
        r_in = min(R, g)
        u_in = max(1, min(U, g // R)) if R <= g else 1
    ring_link = top.intra if r_in >= R else top.inter
    return ring_link, r_in, u_in


def _a2a_seconds(top: Topology, nbytes: float, U: int, u_in: int) -> float:
    """All-to-all among U ranks, ``nbytes`` per rank, ``u_in`` of them in this rank's node."""
    if U <= 1 or nbytes <= 0:
        return 0.0
    intra = nbytes * (u_in - 1) / U / top.intra.a2a
    inter = nbytes * (U - u_in) / U / top.inter.a2a
    lat = top.intra.latency if u_in == U else top.inter.latency
    return lat + max(intra, inter)

# ---------------------------------------------------------------------------------------------
# Work of the busiest rank, per step, in closed form
# ---------------------------------------------------------------------------------------------


def _ring_blocks(layout: str, R: int, L: float, t: int, causal: bool) -> tuple:
    """(lq, lk, pairs) of the busiest rank's block at ring step t, one document of R*L tokens
    (L tokens per ring rank)."""
    if not causal:
        return L, L, L * L
    if t == 0:
        return L, L, L * (L + 1) / 2
    if layout in ("zigzag", "doc_zigzag"):
        return L, L / 2, L * L / 2
    if layout == "stripe":
        return L, L, L * (L + 1) / 2
    return L, L, L * L       # contiguous: the last rank sees every earlier block whole


def _doc_ring_steps(w: Workload, cfg: Config, heads: int, top: Topology) -> list:
    """Per-step kernel seconds of the busiest rank with documents: ``doc_zigzag`` cuts every
    document in 2R chunks (balanced: every rank the same), ``contiguous`` cuts the token range
    in R parts. One varlen call per step covering all documents."""
    R, U = cfg.ring, cfg.ulysses
    docs = w.documents
    if cfg.layout == "doc_zigzag":
        steps = []
        for t in range(R):
            s = 0.0
            for d in docs:
                L = d / R
                lq, lk, p = _ring_blocks("zigzag", R, L, t, w.causal)
                s += _kernel_seconds(top, w, lq, lk, p, heads)
            steps.append(s)
        return steps
    # contiguous over the whole token range: rank r owns [r*n, (r+1)*n)
    n = w.seq_len / R
    starts = [0]
    for d in docs:
        starts.append(starts[-1] + d)
    per_rank_step = [[0.0] * R for _ in range(R)]
    for r in range(R):
        a, b = r * n, (r + 1) * n
        for i, d in enumerate(docs):
            s, e = starts[i], starts[i + 1]
            qa, qb = max(a, s), min(b, e)
            if qa >= qb:
                continue
            for t in range(R):
                o = r - t
                if o < 0 or o * n >= e or (o + 1) * n <= s:
                    continue
                ka, kb = max(o * n, s), min((o + 1) * n, e)
                if t == 0:
                    m = qb - qa
                    p = m * (m + 1) / 2
                else:
                    p = (qb - qa) * (kb - ka)
                per_rank_step[r][t] += _kernel_seconds(top, w, qb - qa, kb - ka, p, heads)
    return [max(per_rank_step[r][t] for r in range(R)) for t in range(R)]


def predict(top: Topology, w: Workload, cfg: Config) -> Prediction:
    """Predicted forward + backward time of ``w`` on ``top`` under ``cfg``. Raises ValueError
    for a configuration the topology or workload cannot hold."""
    U, R = cfg.ulysses, cfg.ring
    if U < 1 or R < 1 or U * R != top.gpus:
        raise ValueError(f"config ulysses x ring must equal topology gpus={top.gpus}, got "
                         f"{U} x {R}")
    if U > w.heads:
        raise ValueError(f"ulysses={U} exceeds heads={w.heads}")
    heads = math.ceil(w.heads / U)                 # uneven heads: the busiest rank
    kv_heads = max(1, math.ceil(w.hkv / U))
    kv_sent = max(w.hkv, U)                        # K/V heads repeated up to U
    ring_link, r_in, u_in = _group_links(top, cfg)
    n_local = w.seq_len / top.gpus                 # tokens per GPU before the all-to-all
    L = w.seq_len / R                              # tokens per ring rank after it

    # Ulysses: forward q, k, v in and out back; backward dout in and dq, dk, dv back.
    row = n_local * w.head_dim * w.batch * w.elt
    a2a_bytes = 2 * (2 * w.heads * row + 2 * kv_sent * row)
    a2a = _a2a_seconds(top, a2a_bytes, U, u_in)   # 8 collectives: bytes summed, 8 latencies
    if U > 1:
        a2a += 7 * (top.intra.latency if u_in == U else top.inter.latency)

    kv_bytes = 2 * L * kv_heads * w.head_dim * w.batch * w.elt
    dkv_bytes = kv_bytes * w.grad_elt / w.elt

    # ideal: the whole attention on one GPU as one call, divided by P
    if w.documents:
        ideal_one = sum(_kernel_seconds(top, w, d, d, d * (d + 1) / 2 if w.causal else d * d,
                                        w.heads) for d in w.documents)
    else:
        S = w.seq_len
        ideal_one = _kernel_seconds(top, w, S, S, S * (S + 1) / 2 if w.causal else S * S,
                                    w.heads)
    ideal = ideal_one / top.gpus

    compute = exposed = overhead = 0.0
    steps = 1
    link_name = ring_link.name if R > 1 else "-"
    if R == 1:
        p = L * (L + 1) / 2 if w.causal else L * L
        if w.documents:
            compute = sum(_kernel_seconds(top, w, d, d, d * (d + 1) / 2 if w.causal else d * d,
                                          heads) for d in w.documents)
        else:
            compute = _kernel_seconds(top, w, L, L, p, heads)
    elif cfg.schedule == "allgather":
        # gather every K/V (ring all-gather, R-1 hops), one call, reduce-scatter dK/dV back
        gather = ring_link.seconds((R - 1) * kv_bytes, R - 1)
        scatter = ring_link.seconds((R - 1) * dkv_bytes, R - 1)
        exposed = 2 * gather + scatter          # forward gather, backward re-gather + scatter
        if w.documents:
            per = _doc_ring_steps(w, replace(cfg, schedule="ring"), heads, top)
            compute = sum(per)
        elif cfg.layout in ("zigzag", "doc_zigzag", "stripe") or not w.causal:
            pairs = (R * L * L / 2 + L / 2) if w.causal else R * L * L
            compute = _kernel_seconds(top, w, L, R * L, pairs, heads)
        else:                                   # contiguous: the last rank sees everything
            pairs = (R - 1) * L * L + L * (L + 1) / 2 if w.causal else R * L * L
            compute = _kernel_seconds(top, w, L, R * L, pairs, heads)
        steps = 1
        overhead = _step_overhead(top, w, L, heads)
    else:
        if cfg.schedule == "helper":
            steps = R // 2 + 1
            per = [_kernel_seconds(top, w, L, L, L * (L + 1) / 2, heads)]
            per += [_kernel_seconds(top, w, L, L, L * L, heads)] * (steps - 2 if R % 2 == 0
                                                                     else steps - 1)
            if R % 2 == 0:
                per.append(_kernel_seconds(top, w, L / 2, L, L * L / 2, heads))
            q_bytes = L * heads * w.head_dim * w.batch * w.elt
            # a helper step moves the larger of a K/V block and query rows + partial back
            step_f = max(kv_bytes, 2 * q_bytes)
            step_b = max(kv_bytes + dkv_bytes, 4 * q_bytes + 2 * q_bytes * w.grad_elt / w.elt)
        elif w.documents:
            per = _doc_ring_steps(w, cfg, heads, top)
            steps = R
            step_f, step_b = kv_bytes, kv_bytes + dkv_bytes
        else:
            per = [_kernel_seconds(top, w, *_ring_blocks(cfg.layout, R, L, t, w.causal), heads)
                   for t in range(R)]
            steps = R
            step_f, step_b = kv_bytes, kv_bytes + dkv_bytes
        if cfg.schedule == "double_ring" and r_in > 1 and r_in < R:
            # inner rings on NVLink; the cross-node hop of a whole node's K/V is spread over
            # the r_in inner steps that use it (every GPU's NIC sends its own share at once)
            def link_s(nbytes):
                return max(top.intra.seconds(nbytes), top.inter.seconds(nbytes) / r_in)
            link_name = f"{top.intra.name} + {top.inter.name}/{r_in}"
        else:
            def link_s(nbytes):
                return ring_link.seconds(nbytes)
        xf, xb = link_s(step_f), link_s(step_b)
        for t, c in enumerate(per):
            cf, cb = c / 3.5, c * 2.5 / 3.5
            if t + 1 < len(per):               # the next step's inputs travel under this one
                sf = max(cf, xf) + (1 - top.overlap) * min(cf, xf)
                sb = max(cb, xb) + (1 - top.overlap) * min(cb, xb)
            else:                              # last step: dK/dV go home, exposed
                sf, sb = cf, cb + link_s(dkv_bytes)
            compute += c
            exposed += sf + sb - c
            overhead += _step_overhead(top, w, L, heads)
    seconds = compute + exposed + a2a + overhead
    return Prediction(cfg, seconds, compute, exposed, a2a, overhead, ideal, steps, link_name,
                      top.intra.name if u_in == U else f"{top.intra.name} + {top.inter.name}")
