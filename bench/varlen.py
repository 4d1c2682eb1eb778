"""Packed documents: balance, bytes and fragmentation of every layout, from the plans alone.

Pure plan arithmetic (no kernels, no GPU, no torch.distributed): for each document mix and ring
size P, causal attention, it builds each layout's ``RingLayout`` and ``RingPlan`` and reads off

* ``max/mean work``: visible (query, key) pairs of the busiest rank over the mean;
* ``bytes max/ring`` and ``bytes mean/ring``: K/V slots a rank sends in one pass, busiest and
  mean over ranks, relative to a plain ring, which sends its whole local K/V, S/P tokens, at
  each of P-1 hops (the ratio is the same for any head count, head size and dtype);
* ``pieces/rank``: mask pieces (kernel launches, or pieces of one varlen launch) over all steps,
  busiest rank; ``min piece``: the smallest piece anyone runs, in visible pairs;
* ``steps``: ring steps run (``plan.steps``); ``padding``: padding slots over all slots.

Layouts: ``contiguous``, ``zigzag``, ``stripe`` (documents only cut their masks) and ``packed``
(distattn's data-dependent layout), plus two comparators modelled here, not in the library:

* ``te-zigzag``: Transformer Engine's per-document zigzag. Every document is padded to a
  multiple of 2P and cut into 2P chunks; rank r holds chunks r and 2P-1-r of every document.
  It is built as a ``RingLayout`` and planned with ``ring_plan`` like the others.
* ``all-gather``: Llama 3's context parallelism. The row is laid out zigzag (2P chunks, rank r
  holding r and 2P-1-r); every rank all-gathers the K/V once ((P-1) x its local K/V sent, the
  same bytes as a plain ring) and runs its local queries against the keys of their documents.
  ``steps`` is 1 (one collective, nothing overlapped with compute).

Mixes: the cu_seqlens of ring-flash-attention's varlen benchmark, given for 8192 tokens, scaled
to ``--tokens-per-rank`` x P tokens (default 1024 x P: for P = 8 exactly the published ones),
and ``long-tail``: documents of S/4, S/8 and S/16 tokens plus short documents of log-normal
length (median 128 tokens, clipped to S/32), shuffled, from ``--seed``.

Output: a markdown table per P on stdout, ``varlen.csv`` under ``--out`` (default bench/out),
and ``varlen.png`` when matplotlib is installed (otherwise the script says it skipped it).

    python bench/varlen.py                 # P = 8 and 64
    python bench/varlen.py --smoke         # P = 8 only
"""
from __future__ import annotations

import argparse
import functools
import itertools
import math
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402  (puts the repository root on sys.path)

from distattn.documents import check_cu_seqlens, document_lengths  # noqa: E402
from distattn.kernels.mask import Piece  # noqa: E402
from distattn.layout import RingLayout, Segment, ring_layout  # noqa: E402
from distattn.plan import ring_plan  # noqa: E402
from distattn.segments import attention_bounds, block_mask  # noqa: E402

#: ring-flash-attention's varlen benchmark mixes, for a row of 8192 tokens.
RFA_MIXES = {
    "one doc": (0, 8192),
    "256+7392+544": (0, 256, 7648, 8192),
    "2 x 4096": (0, 4096, 8192),
    "5 docs": (0, 3104, 6304, 7904, 8064, 8192),
}
RING_LAYOUTS = ("contiguous", "zigzag", "stripe", "packed")
MODELLED = ("te-zigzag", "all-gather")
LAYOUTS = RING_LAYOUTS + MODELLED
COLUMNS = ["P", "mix", "docs", "layout", "max/mean work", "bytes max/ring", "bytes mean/ring",
           "pieces/rank", "min piece", "steps", "padding"]


# ---------------------------------------------------------------------------------------------
# document mixes
# ---------------------------------------------------------------------------------------------

def scaled(cu: tuple, tokens: int) -> tuple:
    """``cu`` (a row of ``cu[-1]`` tokens) with every boundary scaled to a row of ``tokens``
    tokens (rounded down). Raises ValueError when scaling empties a document."""
    return check_cu_seqlens([b * tokens // cu[-1] for b in cu], arg=f"{cu} scaled to {tokens}")


def long_tail(tokens: int, seed: int) -> tuple:
    """cu_seqlens of a row of ``tokens`` tokens: three long documents (S/4, S/8, S/16) and
    short ones of log-normal length (median 128, sigma 1, clipped to [1, S/32]) filling the
    rest, in a shuffled order; deterministic in ``seed``."""
    rng = random.Random(seed)
    lens = [n for n in (tokens // 4, tokens // 8, tokens // 16) if n > 0]
    rest = tokens - sum(lens)
    cap = max(1, tokens // 32)
    while rest > 0:
        n = min(rest, max(1, min(cap, int(rng.lognormvariate(math.log(128), 1.0)))))
        lens.append(n)
        rest -= n
    rng.shuffle(lens)
    return tuple(itertools.accumulate(lens, initial=0))


def mixes(tokens: int, seed: int) -> dict:
    """{name: cu_seqlens} of every mix for a row of ``tokens`` tokens."""
    out = {name: scaled(cu, tokens) for name, cu in RFA_MIXES.items()}
    out["long-tail"] = long_tail(tokens, seed)
    return out


# ---------------------------------------------------------------------------------------------
# the comparators' layouts
# ---------------------------------------------------------------------------------------------

def te_zigzag_layout(cu: tuple, P: int) -> RingLayout:
    """Transformer Engine's per-document zigzag as a RingLayout: document d is padded to
    2P * c_d tokens (c_d = ceil(len / 2P)) and rank r holds its chunks r and 2P-1-r, documents
    one after the other. Slots past a document's end are padding (in no segment)."""
    parts = [[] for _ in range(P)]
    pos = 0
    for d, length in enumerate(document_lengths(cu)):
        c = -(-length // (2 * P))
        for r in range(P):
            for j, chunk in enumerate((r, 2 * P - 1 - r)):
                g = cu[d] + chunk * c
                n = min(c, cu[d + 1] - g)
                if n > 0:
                    parts[r].append(Segment(pos + j * c, n, g, 1, d))
        pos += 2 * c
    return RingLayout("te-zigzag", cu[-1], P, 1, cu, pos, tuple(tuple(p) for p in parts))


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------

def _len(sl: slice) -> int:
    return sl.stop - sl.start


@functools.lru_cache(maxsize=None)
def _pairs_at_origin(piece: Piece) -> int:
    return piece.pairs(piece.q1, piece.k1)


def piece_pairs(piece: Piece, sq: int, sk: int) -> int:
    """``piece.pairs(sq, sk)``, cached by the piece's shape: the piece is moved to the origin
    of its own rectangle first, so the many pieces of equal shape (same chunk sizes, other
    ranks and steps) are counted once."""
    q0, q1, k0, k1 = piece.span(sq, sk)
    if q0 >= q1 or k0 >= k1:
        return 0
    moved = Piece(q0, q1, k0, k1, piece.lo, piece.hi).shifted(q0, k0)
    return _pairs_at_origin(moved)


def _summary(loads, sent, pieces, smallest, steps, lay: RingLayout) -> dict:
    """One table row's metrics from per-rank lists: visible pairs, K/V slots sent, pieces run
    and the smallest piece's pairs (None for a rank without pieces)."""
    P, S = lay.ring_degree, lay.seq_len
    ring = (P - 1) * S / P          # slots a plain ring rank sends per pass
    mean = sum(loads) / P
    return {"max/mean work": max(loads) / mean if mean else 1.0,
            "bytes max/ring": max(sent) / ring if ring else 0.0,
            "bytes mean/ring": sum(sent) / P / ring if ring else 0.0,
            "pieces/rank": max(pieces),
            "min piece": min((x for x in smallest if x is not None), default=0),
            "steps": steps, "padding": 1 - S / (P * lay.part_len)}


def ring_metrics(lay: RingLayout, window=None) -> dict:
    """Metrics of the causal ring plan over ``lay`` (see the module docstring), with an
    optional sliding ``window``."""
    plan = ring_plan(lay, causal=True, window=window)
    P, n = lay.ring_degree, lay.part_len
    loads, sent, pieces, smallest = [], [], [], []
    for r in range(P):
        per_piece = [piece_pairs(p, n, plan.key_len(r, t))
                     for t, mask in enumerate(plan.masks(r)) for p in mask.pieces]
        loads.append(sum(per_piece))
        pieces.append(len(per_piece))
        smallest.append(min(per_piece, default=None))
        # rank r forwards what it holds at step t to rank r + 1 for step t + 1
        sent.append(sum(plan.key_len((r + 1) % P, t + 1) for t in range(plan.steps - 1)))
    return {**_summary(loads, sent, pieces, smallest, plan.steps, lay), "pairs": sum(loads)}


def all_gather_metrics(cu: tuple, P: int) -> dict:
    """Metrics of Llama 3's all-gather context parallelism over the zigzag layout of the row:
    each rank sends its local K/V to the P-1 others once and runs its queries against the
    gathered keys of their documents (one block, global key coordinates)."""
    lay = ring_layout("zigzag", cu[-1], P, 1, cu)
    keys = [Segment(a, b - a, a, 1, d) for d, (a, b) in enumerate(zip(cu[:-1], cu[1:]))]
    bounds = attention_bounds(True, None)
    loads, pieces, smallest = [], [], []
    for r in range(P):
        mask = block_mask(lay.parts[r], keys, bounds).simplify(lay.part_len, cu[-1])
        per_piece = [piece_pairs(p, lay.part_len, cu[-1]) for p in mask.pieces]
        loads.append(sum(per_piece))
        pieces.append(len(per_piece))
        smallest.append(min(per_piece, default=None))
    sent = [(P - 1) * lay.part_len] * P
    return _summary(loads, sent, pieces, smallest, 1, lay)


def metrics(layout: str, cu: tuple, P: int) -> dict:
    """The row metrics of ``layout`` (one of LAYOUTS) for documents ``cu`` over P ranks."""
    if layout == "all-gather":
        return all_gather_metrics(cu, P)
    if layout == "te-zigzag":
        return ring_metrics(te_zigzag_layout(cu, P))
    return ring_metrics(ring_layout(layout, cu[-1], P, 1, cu))


# ---------------------------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------------------------

def rows_for(P: int, tokens_per_rank: int, seed: int, log=print) -> list[dict]:
    """Every (mix, layout) row for ring size P."""
    rows = []
    for name, cu in mixes(tokens_per_rank * P, seed).items():
        for layout in LAYOUTS:
            t0 = time.perf_counter()
            rows.append({"P": P, "mix": name, "docs": len(cu) - 1, "layout": layout,
                         **metrics(layout, cu, P)})
            log(f"  P={P:<3d} {name:<14s} {layout:<11s} {time.perf_counter() - t0:5.2f}s")
    return rows


def plot(plt, rows: list[dict]):
    """Per P: max/mean work against bytes max/ring, one marker per layout and mix: the figure
    (``common.save_plot`` draws with it)."""
    worlds = sorted({r["P"] for r in rows})
    fig, axes = plt.subplots(1, len(worlds), figsize=(6 * len(worlds), 4.5), squeeze=False)
    for ax, P in zip(axes[0], worlds):
        for layout in LAYOUTS:
            rs = [r for r in rows if r["P"] == P and r["layout"] == layout]
            ax.scatter([r["bytes max/ring"] for r in rs], [r["max/mean work"] for r in rs],
                       label=layout)
        ax.axhline(1.05, color="grey", linestyle=":")
        ax.axvline(1.0, color="grey", linestyle=":")
        ax.set_xlabel("bytes sent, busiest rank / plain ring")
        ax.set_ylabel("max/mean visible-pair work")
        ax.set_title(f"P = {P}, causal, every mix")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    return fig


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worlds", type=common.ints, default=[8, 64], help="ring sizes P")
    p.add_argument("--tokens-per-rank", type=int, default=1024,
                   help="the mixes are scaled to this many tokens per rank (1024: for P = 8 "
                        "the published 8192-token mixes)")
    p.add_argument("--seed", type=int, default=0, help="seed of the long-tail mix")
    p.add_argument("--out", default=common.DEFAULT_OUT, help="output directory")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--smoke", action="store_true", help="P = 8 only")
    args = p.parse_args(argv)
    if args.smoke:
        args.worlds = [8]
    for P in args.worlds:
        try:
            mixes(args.tokens_per_rank * P, args.seed)
        except ValueError as e:
            p.error(f"--tokens-per-rank {args.tokens_per_rank} is too small for P = {P}: {e}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    rows = []
    for P in args.worlds:
        rows += rows_for(P, args.tokens_per_rank, args.seed)
    os.makedirs(args.out, exist_ok=True)
    csv_path = os.path.join(args.out, "varlen.csv")
    common.write_csv(csv_path, COLUMNS, rows)
    print()
    for P in args.worlds:
        print(f"## P = {P}, {args.tokens_per_rank} tokens per rank, causal\n")
        print(common.markdown_table(COLUMNS[1:], [r for r in rows if r["P"] == P]) + "\n")
    print(common.save_plot(os.path.join(args.out, "varlen.png"), lambda plt: plot(plt, rows),
                           args.no_plot))
    print(f"table written to {csv_path} ({time.perf_counter() - t_start:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
