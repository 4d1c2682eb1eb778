"""Cost of an uneven Ulysses head split ("Ulysses anything"), measured in one run.

Pure Ulysses over ``--nproc`` ranks (CPU gloo processes, or torchrun with NCCL on GPUs),
causal, one document of ``--seq-local`` tokens per rank. For each head configuration: the
split (q heads per rank, K/V heads received per rank), all-to-all bytes of the busiest rank
(forward + backward, from ``distattn.ulysses.head_split``) and the measured forward+backward
time of ``dist_flash_attn`` (median of ``--repeats``). Even and uneven splits of the same Hq
sit side by side: the slowest rank holds ceil(units / U) head groups, so an uneven split
costs what the next even one with that many heads per rank costs.

Writes ``uneven_heads.md`` / ``.csv`` to ``--out``.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import tempfile
import time

import common  # (also puts the repository root on sys.path)
import torch
import torch.distributed as dist

import distattn
from distattn.ulysses import head_split

CONFIGS = ((12, 4), (12, 3), (8, 8), (6, 6), (4, 4), (40, 8))


def _busiest_bytes(hq, hkv, U, n, d, elem):
    """All-to-all bytes (sent + received) of the busiest rank for one forward + backward of
    batch 1: six tensors per q head (forward q, out; backward q, out, dout, dq), six per K/V
    head copy (forward K, V; backward K, V, dK, dV), lse (float32) twice; a rank's own part
    does not travel."""
    s = head_split(hq, hkv, U)
    qc = [s.q_count(u) for u in range(U)]
    kc = [len(ix) for ix in s.kv_index]
    return max(sum(n * d * elem * 6 * (qc[w] + qc[u] + kc[w] + kc[u]) + n * 4 * 2 * (qc[w] + qc[u])
                   for w in range(U) if w != u) for u in range(U))


def measure(args):
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda", torch.cuda.current_device()) if args.cuda else torch.device("cpu")
    dtype = torch.bfloat16 if args.cuda else torch.float32
    mesh = distattn.SPMesh.build(ulysses_degree=world)
    rows = []
    for hq, hkv in (CONFIGS[0],) + CONFIGS:     # the first one again: a warm-up
        if hq < world:
            continue
        g = torch.Generator(device=dev).manual_seed(rank)
        shape = (1, args.seq_local)
        q = torch.randn(*shape, hq, args.head_dim, generator=g, device=dev, dtype=dtype,
                        requires_grad=True)
        k = torch.randn(*shape, hkv, args.head_dim, generator=g, device=dev, dtype=dtype,
                        requires_grad=True)
        v = torch.randn(*shape, hkv, args.head_dim, generator=g, device=dev, dtype=dtype,
                        requires_grad=True)
        times = []
        for it in range(args.repeats + 1):
            dist.barrier()
            if args.cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = distattn.dist_flash_attn(q, k, v, mesh=mesh, causal=True)
            out.sum().backward()
            if args.cuda:
                torch.cuda.synchronize()
            dist.barrier()
            if it:                              # the first one warms up
                times.append(time.perf_counter() - t0)
        if len(rows) == 0 and not getattr(measure, "warm", False):
            measure.warm = True
            continue
        s = head_split(hq, hkv, world)
        counts = sorted({s.q_count(u) for u in range(world)}, reverse=True)
        kvs = sorted({len(ix) for ix in s.kv_index}, reverse=True)
        rows.append({
            "Hq/Hkv": f"{hq}/{hkv}", "split": "even" if s.even else "uneven",
            "q heads per rank": "/".join(map(str, counts)),
            "K/V heads per rank": "/".join(map(str, kvs)),
            "busiest rank a2a MB": f"{_busiest_bytes(hq, hkv, world, args.seq_local, args.head_dim, torch.finfo(dtype).bits // 8) / 1e6:.2f}",
            "fwd+bwd ms": f"{1e3 * statistics.median(times):.1f}",
            "ms per q head of the busiest rank": f"{1e3 * statistics.median(times) / counts[0]:.1f}",
        })
    return rows


def _report(args, rows):
    os.makedirs(args.out, exist_ok=True)
    device = common.device_name(torch.device("cuda") if args.cuda else torch.device("cpu"))
    world = dist.get_world_size()
    head = (f"Ulysses degree {world}, causal, {args.seq_local} tokens per rank, head_dim "
            f"{args.head_dim}, {'bf16' if args.cuda else 'fp32'}, {device}, "
            f"{'NCCL' if args.cuda else 'gloo'}")
    cols = list(rows[0])
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(r[c] for c in cols) + " |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    with open(os.path.join(args.out, "uneven_heads.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "uneven_heads.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)


def _worker(rank, world, init_file, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    rows = measure(args)
    if rank == 0:
        _report(args, rows)
    dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nproc", type=int, default=4, help="local CPU processes (without torchrun)")
    p.add_argument("--seq-local", type=int, default=256)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=common.DEFAULT_OUT)
    args = p.parse_args(argv)
    if "RANK" in os.environ:   # under torchrun
        args.cuda = torch.cuda.is_available()
        if args.cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if args.cuda else "gloo")
        rows = measure(args)
        if dist.get_rank() == 0:
            _report(args, rows)
        dist.destroy_process_group()
        return
    args.cuda = False
    fd, init_file = tempfile.mkstemp(prefix="distattn_uneven_")
    os.close(fd)
    os.unlink(init_file)
    common.start_ranks(_worker, (args.nproc, init_file, args), args.nproc)


if __name__ == "__main__":
    main()
