"""distattn's working set per rank, forward + backward, counted in bytes (issue 20, item 4).

``bench/host.py``'s ``LiveBytes`` (a TorchDispatchMode) tracks the storages of every tensor
an op returns while the call runs: exact byte counts, no timers, the same on every run. The
bounds below are what this revision reaches on zigzag causal attention, fp32, torch backend
(docs/BENCHMARKS.md, "Host cost and memory"), over the local q/k/v/out bytes (4 units u):

- ring 4, busiest rank: two K/V travel buffers (4u: double-buffered overlap), three dK/dV
  partial sums (6u: the one computed into, the one in flight, the one arriving) and the CPU
  flash kernel's gradients of one block (2.5u) = 12.5u, i.e. 3.125x;
- ring 2 x Ulysses 2: the forward's head-sharded q/K/V/out kept for the backward (4u), dout
  head-sharded (u), the ring's dq/dK/dV accumulators (3u, they become dq/dK/dV after the
  all-to-all), one travel buffer, two partial sums and the kernel's gradients = 3.625x;
- one process: the kernel's gradients of the whole block (0.75x).

A change that adds a block-sized copy fails here.
"""
import os
import sys

from spawn import run_world

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))

S = 1024           # 8 heads, head_dim 64, fp32; the ratios do not depend on S
SLACK = 0.01
# (distattn working set / local q,k,v,out, peak incl. the caller's tensors / local q,k,v,out)
BOUNDS = {1: (0.754, 2.754), (4, 1): (3.126, 5.126), (4, 2): (3.626, 4.876)}


def _measure(rank, world, seq):
    import host
    return {u: host._mem_one(seq, rank, world, u) for u in (1, 2)}


def _check(row, bound):
    work, peak = bound
    assert row["distattn / local qkvo"] <= work + SLACK, row
    assert row["peak / local qkvo"] <= peak + SLACK, row


def test_one_process_working_set():
    import host
    _check(host._mem_one(S, 0, 1, 1), BOUNDS[1])


def test_ring_and_usp_working_set():
    per_rank = run_world(4, _measure, S)
    for u in (1, 2):
        worst = max((r[u] for r in per_rank), key=lambda r: r["distattn / local qkvo"])
        _check(worst, BOUNDS[(4, u)])
