"""Profile mode: per-step compute and communication-wait times of the executors.

Pass a ``StepProfiler`` as ``dist_flash_attn(..., profiler=p)``. Every executor step then
records two spans: ``compute`` (the step's block kernels) and ``wait`` (time spent blocked on
that step's communication after the compute was issued). On CUDA the spans are CUDA events on
the current stream, read only in ``summary()`` (one synchronisation at the end, none per
step); on CPU they are host timestamps. A ``wait`` near zero means the step's communication
was hidden behind compute: overlap is measured, not assumed.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch


@dataclass
class _Span:
    pass_name: str
    step: int
    phase: str
    start: object
    end: object = None


@dataclass
class StepProfiler:
    spans: list = field(default_factory=list)
    pass_name: str = "forward"

    @contextlib.contextmanager
    def span(self, phase: str, step: int, device: torch.device):
        cuda = device.type == "cuda"
        start = torch.cuda.Event(enable_timing=True) if cuda else None
        if cuda:
            start.record()
        rec = _Span(self.pass_name, step, phase, start if cuda else time.perf_counter())
        try:
            yield
        finally:
            if cuda:
                rec.end = torch.cuda.Event(enable_timing=True)
                rec.end.record()
            else:
                rec.end = time.perf_counter()
            self.spans.append(rec)

    def summary(self) -> list[dict]:
        """[{pass, step, compute_ms, wait_ms}] summed over calls, in step order."""
        if any(isinstance(s.start, torch.cuda.Event) for s in self.spans):
            torch.cuda.synchronize()
        rows: dict = {}
        for s in self.spans:
            ms = (s.start.elapsed_time(s.end) if isinstance(s.start, torch.cuda.Event)
                  else (s.end - s.start) * 1e3)
            row = rows.setdefault((s.pass_name, s.step),
                                  {"pass": s.pass_name, "step": s.step, "compute_ms": 0.0,
                                   "wait_ms": 0.0})
            row[f"{s.phase}_ms"] += ms
        return [rows[k] for k in sorted(rows)]

    def reset(self) -> None:
        self.spans.clear()


def span(profiler, phase: str, step: int, device):
    """``profiler.span(...)`` or a no-op when profiling is off."""
    return profiler.span(phase, step, device) if profiler is not None else contextlib.nullcontext()
