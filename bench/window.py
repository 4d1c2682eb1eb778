"""Sliding windows across the ring: steps, bytes and work per rank against a plain ring.

For a causal row of S = P x tokens-per-rank tokens and a window of W tokens (transformers'
``sliding_window=W``, distattn's ``window=(W - 1, 0)``), the ring plan of each layout is built
(pure arithmetic, no process group, no GPU) and reported:

* ``steps``: ring steps executed (a plain ring runs P);
* ``bytes max/ring``: K/V slots the busiest rank sends per pass over a plain ring's
  (P - 1) x S / P -- only the keys some other rank's window reaches travel;
* ``max/mean work``: visible (query, key) pairs of the busiest rank over the mean;
* ``work/causal``: all visible pairs over those of full causal attention (the compute a
  window saves).

    python bench/window.py            # P = 8, W = S/64, S/8, S/2
    python bench/window.py --smoke    # the same, small (CI)
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from varlen import ring_metrics  # noqa: E402

from distattn.layout import ring_layout  # noqa: E402

LAYOUTS = ("contiguous", "zigzag", "stripe")
FRACTIONS = (64, 8, 2)            # W = S / fraction
COLUMNS = ["P", "layout", "W", "steps", "bytes max/ring", "max/mean work", "work/causal"]


def rows_for(P: int, tokens_per_rank: int) -> list[dict]:
    S = P * tokens_per_rank
    causal_pairs = S * (S + 1) // 2
    rows = []
    for layout in LAYOUTS:
        lay = ring_layout(layout, S, P, 1)
        for W in [None] + [S // f for f in FRACTIONS]:
            m = ring_metrics(lay, window=None if W is None else (W - 1, 0))
            rows.append({"P": P, "layout": layout, "W": "S (no window)" if W is None
                         else f"S/{S // W} = {W}", "steps": m["steps"],
                         "bytes max/ring": m["bytes max/ring"],
                         "max/mean work": m["max/mean work"],
                         "work/causal": m["pairs"] / causal_pairs})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worlds", type=common.ints, default=[8], help="ring sizes P")
    p.add_argument("--tokens-per-rank", type=int, default=1024)
    p.add_argument("--out", default=common.DEFAULT_OUT, help="output directory")
    p.add_argument("--smoke", action="store_true", help="P = 8, 128 tokens per rank")
    args = p.parse_args(argv)
    if args.smoke:
        args.worlds, args.tokens_per_rank = [8], 128
    start = time.perf_counter()
    rows = [r for P in args.worlds for r in rows_for(P, args.tokens_per_rank)]
    path = os.path.join(args.out, "window.csv")
    common.write_csv(path, COLUMNS, rows)
    print(f"## causal, {args.tokens_per_rank} tokens per rank\n")
    print(common.markdown_table(COLUMNS, rows))
    print(f"\ntable written to {path} ({time.perf_counter() - start:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
