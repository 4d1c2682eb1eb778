"""Shared helpers of the benchmarks in bench/: timing, shapes, the schedules compared, the
Ulysses x ring splits of a GPU count, FLOP counts and table output.

The benchmarks are scripts (``python bench/schedule.py``), not part of the package; importing
this module puts the repository root on ``sys.path`` so that ``import distattn`` works from a
plain checkout without an install.
"""
from __future__ import annotations

import csv
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402

from distattn.layout import ring_layout  # noqa: E402
from distattn.plan import helper_plan, ring_plan  # noqa: E402

#: (layout, schedule) pairs compared for causal attention, in table order.
CAUSAL_SCHEDULES = (("contiguous", "ring"), ("zigzag", "ring"), ("stripe", "ring"),
                    ("contiguous", "helper"))

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32,
          "fp64": torch.float64}

DEFAULT_OUT = os.path.join(_ROOT, "bench", "out")


#: what the fork server behind ``process_context`` imports once for every local rank
_PRELOAD = ["torch", "torch.distributed"]


def process_context():
    """The multiprocessing context for a benchmark's local ranks (no torchrun): each rank is
    forked from a fork server that imported torch once, so a rank starts in a fraction of a
    second instead of spending seconds of CPU importing torch; it is still a fresh process
    with none of the launching process's state."""
    ctx = torch.multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def start_ranks(fn, args: tuple, nprocs: int) -> None:
    """``torch.multiprocessing.spawn(fn, args, nprocs)`` through ``process_context``'s fork
    server: ``fn(rank, *args)`` on ``nprocs`` processes, joined; raises as ``spawn`` does."""
    process_context()
    torch.multiprocessing.start_processes(fn, args=args, nprocs=nprocs, join=True,
                                          start_method="forkserver")


def label(layout: str, schedule: str) -> str:
    """Name of a layout/schedule pair in tables: ``"zigzag/ring"``, ``"contiguous/helper"``."""
    return f"{layout}/{schedule}"


def make_plan(world: int, layout: str, schedule: str, tokens: int):
    """The causal plan of ``world`` ring ranks holding ``tokens`` tokens each (one document of
    ``tokens * world`` tokens, so the length must split evenly): a RingPlan for schedule
    "ring", the DistFlashAttn HelperPlan for schedule "helper" (contiguous layout only)."""
    if schedule not in ("ring", "helper"):
        raise ValueError(f"unknown schedule {schedule!r}")
    if schedule == "helper" and layout != "contiguous":
        raise ValueError("the helper schedule is defined for the contiguous layout")
    lay = ring_layout(layout, tokens * world, world, 1)
    return helper_plan(lay) if schedule == "helper" else ring_plan(lay, causal=True)


def ulysses_degrees(world: int, hq: int, hkv: int) -> list[int]:
    """Ulysses degrees U that divide ``world`` and can split the heads: U divides Hq, and
    either divides Hkv or is a multiple of it (K/V heads are then repeated, as
    ``distattn`` does). The ring degree of each split is ``world // U``."""
    return [u for u in range(1, world + 1)
            if world % u == 0 and hq % u == 0 and (hkv % u == 0 or u % hkv == 0)]


def ring_rank_heads(hq: int, hkv: int, ulysses: int) -> tuple[int, int]:
    """(q heads, K/V heads) each rank computes with after the Ulysses all-to-all."""
    return hq // ulysses, max(hkv // ulysses, 1)


def attention_flops(batch: int, seq: int, hq: int, head_dim: int, causal: bool,
                    backward: bool = False) -> float:
    """FLOPs of attention over ``seq`` tokens (docs/BENCHMARKS.md): 4*B*H*S*S*D forward,
    halved for causal; backward is 2.5x the forward."""
    f = 4.0 * batch * hq * seq * seq * head_dim * (0.5 if causal else 1.0)
    return f * 2.5 if backward else f


def device_name(device: torch.device) -> str:
    """Human-readable name of the device the benchmark runs on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def rank_device(kind: str, rank: int) -> torch.device:
    """The device of this rank: for "cuda", GPU ``LOCAL_RANK`` (or ``rank``) modulo the GPUs
    there are, made current; else the CPU."""
    if kind != "cuda":
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) %
                          torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, warmup: int = 2, iters: int = 5,
            budget_s: float | None = None) -> float:
    """Median time of one ``fn()`` call in milliseconds.

    ``warmup`` untimed calls first, then up to ``iters`` timed calls: CUDA events around each
    call on a GPU (one synchronisation at the end), ``time.perf_counter`` with a
    synchronisation per call elsewhere. With ``budget_s``, fewer timed calls (at least one)
    are made when a warmup call shows that ``iters`` of them would take longer than that.
    """
    t0 = time.perf_counter()
    for _ in range(max(warmup, 0)):
        fn()
    synchronize(device)
    if budget_s is not None and warmup > 0:
        per_call = (time.perf_counter() - t0) / warmup
        iters = max(1, min(iters, int(budget_s / max(per_call, 1e-9))))
    iters = max(iters, 1)
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(iters)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in events]
    else:
        times = []
        for _ in range(iters):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


@dataclass(frozen=True)
class Shape:
    """What one rank computes with: ``batch`` sequences of ``tokens`` local tokens, ``hq``
    query heads and ``hkv`` K/V heads of ``head_dim``, in ``dtype``."""
    batch: int
    tokens: int
    hq: int
    hkv: int
    head_dim: int
    dtype: torch.dtype

    @property
    def elt(self) -> int:
        """Bytes per element of q/k/v/out."""
        return torch.empty((), dtype=self.dtype).element_size()


def fmt(x, digits: int = 3) -> str:
    """Table cell: floats to ``digits`` significant figures, None as "-"."""
    if x is None:
        return "-"
    if isinstance(x, float):
        if math.isnan(x) or math.isinf(x):
            return str(x)
        if x == 0:
            return "0"
        mag = math.floor(math.log10(abs(x)))
        return f"{x:.{max(digits - 1 - mag, 0)}f}"
    return str(x)


def markdown_table(columns: list[str], rows: list[dict]) -> str:
    """A GitHub markdown table of ``rows`` (dicts) over ``columns``."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def write_csv(path: str, columns: list[str], rows: list[dict]) -> None:
    """Write ``rows`` (dicts) to ``path`` as CSV with a header; full precision."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({c: ("" if row.get(c) is None else row.get(c)) for c in columns})


def ints(text: str) -> list[int]:
    """argparse type of comma-separated integers: ``"8,64"`` -> ``[8, 64]``."""
    return [int(x) for x in text.split(",") if x.strip()]


def save_plot(path: str, draw, skip: bool = False) -> str:
    """Draw and save a figure, and say what happened (the line the benchmarks print).

    ``draw(plt)`` gets ``matplotlib.pyplot`` (Agg backend) and returns the figure; it is laid
    out, saved to ``path`` and closed. Nothing is drawn when ``skip`` (``--no-plot``) or when
    matplotlib is not installed."""
    if skip:
        return "plot skipped (--no-plot)"
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed"
    fig = draw(plt)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot written to {path}"
