"""``plan_for``: choose Ulysses / ring degrees, placement, layout and schedule from the cost
model (``distattn.costmodel``), and say why.

The planner enumerates every configuration distattn can run on the topology (Ulysses degree a
divisor of the GPU count and at most the query heads -- uneven head splits are priced at the
busiest rank's ceil(heads / U) --, both placements, the layouts that balance causal work, and
the schedules ``ring``, ``helper`` and, once distattn has it, ``allgather``), prices each with
``costmodel.predict`` and returns the fastest. Candidates distattn cannot run (a double ring;
``allgather`` while ``distattn.attention.SCHEDULES`` lacks it) are priced and listed as
"modelled only", never chosen. Pure: no torch.distributed, deterministic (ties break on the
label).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from . import costmodel as cm


@dataclass(frozen=True)
class Candidate:
    """One configuration weighed: its ``config``, ``prediction``, whether distattn can run it
    (``runnable``) and why not (``note``)."""
    config: cm.Config
    prediction: cm.Prediction
    runnable: bool
    note: str = ""


@dataclass(frozen=True)
class Plan:
    """The chosen configuration (``ulysses_degree``, ``ring_degree``, ``placement``,
    ``layout``, ``schedule``: pass them to ``SPMesh.build(plan=...)`` and ``dist_flash_attn``)
    with its ``prediction`` and every ``candidates`` weighed, fastest first."""
    ulysses_degree: int
    ring_degree: int
    placement: str
    layout: str
    schedule: str
    prediction: cm.Prediction
    candidates: tuple
    topology: cm.Topology
    workload: cm.Workload
    notes: tuple = ()

    @property
    def chosen(self) -> Candidate:
        return next(c for c in self.candidates if c.config == self.prediction.config)

    def explain(self, top: int = 12) -> str:
        """A table of the ``top`` fastest candidates (predicted ms of one forward + backward,
        parts, % of the ideal), the chosen one marked, modelled-only ones labelled."""
        w, t = self.workload, self.topology
        head = (f"plan for {w.seq_len} tokens, {w.heads} heads ({w.hkv} kv) x {w.head_dim}, "
                f"batch {w.batch}, causal={w.causal}"
                + (f", {len(w.documents)} documents" if w.documents else "")
                + f" on {t.gpus} GPUs ({t.gpus_per_node}/node, {t.intra.name} | "
                f"{t.inter.name}; kernels: {t.kernel.name})\n"
                "predictions of distattn.costmodel, not measurements\n")
        rows = ["| | configuration | placement | ms | compute | ring comm | a2a | overhead "
                "| % ideal | note |", "|---|---|---|---|---|---|---|---|---|---|"]
        for c in self.candidates[:top]:
            p = c.prediction
            mark = "->" if c.config == self.prediction.config else ""
            note = c.note if not c.runnable else ""
            rows.append(f"| {mark} | {c.config.label} | {c.config.placement} | "
                        f"{p.seconds * 1e3:.2f} | {p.compute * 1e3:.2f} | "
                        f"{p.ring_comm_exposed * 1e3:.2f} | {p.a2a * 1e3:.2f} | "
                        f"{p.overhead * 1e3:.2f} | {100 * p.efficiency:.0f}% | {note} |")
        more = len(self.candidates) - top
        tail = [f"({more} more candidates)"] if more > 0 else []
        return head + "\n".join(rows + tail + list(self.notes))


def _divisors(n: int) -> list:
    return [d for d in range(1, n + 1) if n % d == 0]


def _allgather_runnable() -> bool:
    from .attention import SCHEDULES
    return "allgather" in SCHEDULES


def _check_positive(name, v):
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")


def plan_for(topology: cm.Topology, seq_len: int, heads: int, head_dim: int,
             kv_heads: Optional[int] = None, documents: Optional[Sequence[int]] = None,
             window=None, causal: bool = True, batch: int = 1,
             ulysses_degrees: Optional[Sequence[int]] = None) -> Plan:
    """The fastest configuration distattn can run for this attention on ``topology``
    (``costmodel.Topology``, e.g. ``costmodel.cluster(64)``).

    ``seq_len``: tokens of the whole sequence; ``heads`` / ``kv_heads`` (None: MHA) /
    ``head_dim`` per layer; ``documents``: global document lengths (packed sequences; laid
    out ``doc_zigzag``); ``window``: a sliding window (``(left, right)``): the ring stops
    early and the contiguous layout sends least, so only contiguous rings are weighed and the
    model prices them as full causal (an upper bound; said in ``explain``); ``ulysses_degrees``
    restricts the Ulysses degrees weighed. Raises ValueError naming the argument."""
    if not isinstance(topology, cm.Topology):
        raise ValueError(f"topology must be a distattn.costmodel.Topology, got "
                         f"{type(topology).__name__}")
    for name, v in (("seq_len", seq_len), ("heads", heads), ("head_dim", head_dim),
                    ("batch", batch)):
        _check_positive(name, v)
    if kv_heads is not None:
        _check_positive("kv_heads", kv_heads)
        if heads % kv_heads:
            raise ValueError(f"kv_heads={kv_heads} must divide heads={heads}")
    if window is not None and (not isinstance(window, (tuple, list)) or len(window) != 2):
        raise ValueError(f"window must be a (left, right) pair, got {window!r}")
    P = topology.gpus
    if documents is None and seq_len % P:
        raise ValueError(f"seq_len={seq_len} must be a multiple of the topology's gpus={P} "
                         f"(or pass documents=, which distattn pads)")
    workload = cm.Workload(seq_len, heads, head_dim, kv_heads, batch, causal,
                           tuple(documents) if documents is not None else None)
    degrees = [u for u in _divisors(P) if u <= heads]
    if ulysses_degrees is not None:
        bad = [u for u in ulysses_degrees if u not in degrees]
        if bad:
            raise ValueError(f"ulysses_degrees {bad} are not divisors of gpus={P} that are "
                             f"<= heads={heads}")
        degrees = sorted(set(ulysses_degrees))
    allgather = _allgather_runnable()
    notes = []
    if window is not None:
        notes.append(f"window={tuple(window)}: contiguous rings only, priced as full causal "
                     "(the ring stops early, so these are upper bounds)")

    cands = []
    for U in degrees:
        R = P // U
        for placement in ("ulysses_inner", "ring_inner"):
            if (U == 1 or R == 1) and placement == "ring_inner":
                continue                      # the same groups as ulysses_inner
            for layout, schedule, why in _options(workload, U, R, window, causal, allgather,
                                                  topology, placement):
                cfg = cm.Config(U, R, layout, schedule, placement)
                cands.append(Candidate(cfg, cm.predict(topology, workload, cfg), why == "",
                                       why))
    cands.sort(key=lambda c: (c.prediction.seconds, c.config.label, c.config.placement))
    runnable = [c for c in cands if c.runnable]
    if not runnable:
        raise ValueError(f"no configuration distattn can run for seq_len={seq_len} on "
                         f"{P} GPUs (the sequence must split evenly over the ranks)")
    best = runnable[0]
    c = best.config
    return Plan(c.ulysses, c.ring, c.placement, c.layout, c.schedule, best.prediction,
                tuple(cands), topology, workload, tuple(notes))


def _options(w: cm.Workload, U: int, R: int, window, causal: bool, allgather: bool,
             top: cm.Topology, placement: str):
    """(layout, schedule, reason it cannot run or "") of the configurations weighed at U x R."""
    S, P = w.seq_len, U * R
    if R == 1:
        yield ("contiguous", "ring", "")
        return
    if w.documents is not None:
        yield ("doc_zigzag", "ring", "")
        yield ("contiguous", "ring", "")
        yield ("contiguous", "allgather", "" if allgather else "modelled only (allgather "
               "not in distattn yet)")
        return
    if window is not None:
        yield ("contiguous", "ring", "")
        return
    even = S % (2 * P) == 0
    if causal:
        yield ("zigzag", "ring", "" if even else "seq_len not a multiple of 2 x gpus")
        yield ("stripe", "ring", "")
        yield ("contiguous", "ring", "")
        yield ("contiguous", "helper", "" if (R % 2 == 1 or even) else
               "odd ring part (helper halves it)")
        yield ("zigzag", "allgather", ("" if even else "seq_len not a multiple of 2 x gpus")
               if allgather else "modelled only (allgather not in distattn yet)")
    else:
        yield ("contiguous", "ring", "")
        yield ("contiguous", "allgather", "" if allgather else
               "modelled only (allgather not in distattn yet)")
    # a ring of node-rings: only where the ring has several members in a node and spans nodes
    _, r_in, _ = cm._group_links(top, cm.Config(U, R, placement=placement))
    if 1 < r_in < R:
        yield ("zigzag" if causal else "contiguous", "double_ring",
               "modelled only (distattn has no double ring)")
