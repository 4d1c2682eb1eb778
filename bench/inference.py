"""Cost of sequence-parallel inference per layer: prefill, decode and follow-up chunks.

For each world size P (``--worlds``; under torchrun: the world) and context length S
(``--contexts``), on one attention layer of a ``distattn.inference.ShardedKVCache``:

- prefill: ms and tokens/s of the prompt's sharded step (ring attention, pass-KV);
- decode: ms per replicated one-token step, and the bytes each rank sends per step (measured
  by wrapping torch.distributed, ``count_sent_bytes``; the cache's own count must agree)
  next to the analytic value: one packed partial result, ``B * Hq * (D + 1)`` fp32 numbers,
  to each other rank of the Ulysses and the ring group. It does not depend on S;
- chunks (``--chunks``, fractions of S): a follow-up chunk of new tokens timed with pass-KV
  and with pass-Q, the bytes each rank sends (the core's ring included), and what
  ``choose_strategy`` picks.

    python bench/inference.py                       # CPU: worlds 1, 2, 4 (spawned, gloo)
    torchrun --nproc-per-node 8 bench/inference.py --contexts 32768,131072 --dtype bf16
    python bench/inference.py --smoke               # tiny shapes, checks that it all runs

Tables go to ``--out`` (markdown and CSV). Times are the slowest rank's, medians over
``--iters`` (every prefill and chunk timing starts from a fresh cache).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402  (puts the repository root on sys.path)
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import distattn  # noqa: E402
from distattn.inference import ShardedKVCache, choose_strategy, count_sent_bytes  # noqa: E402

COLUMNS = ["P", "ulysses", "context", "prefill ms", "prefill tok/s", "decode ms/step",
           "decode bytes/step", "expected bytes/step", "cache MiB/rank", "full cache MiB"]
CHUNK_COLUMNS = ["P", "context", "new tokens", "new/(new+cached)", "pass_kv ms", "pass_q ms",
                 "pass_kv MiB sent", "pass_q MiB sent", "auto picks", "faster"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worlds", default="1,2,4",
                   help="world sizes to spawn without torchrun (comma-separated)")
    p.add_argument("--ulysses", type=int, default=1, help="Ulysses degree inside each world")
    p.add_argument("--contexts", default=None,
                   help="context lengths (default: 2048,8192,32768; smoke: 64,256)")
    p.add_argument("--chunks", default="0.01,0.1,0.5",
                   help="follow-up chunk sizes as fractions of the context")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=sorted(common.DTYPES), default=None,
                   help="default: bf16 on GPUs, fp32 on CPU")
    p.add_argument("--backend", default="auto")
    p.add_argument("--layout", default="zigzag", choices=("zigzag", "contiguous", "stripe"))
    p.add_argument("--decode-steps", type=int, default=8)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--device", choices=("cuda", "cpu"), default=None)
    p.add_argument("--out", default=common.DEFAULT_OUT)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU")
    args = p.parse_args(argv)
    if args.smoke:
        args.device = args.device or "cpu"
        args.heads, args.kv_heads, args.head_dim = 4, 2, 16
        args.contexts = args.contexts or "64,256"
        args.decode_steps, args.iters = 3, 1
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    args.contexts = [int(x) for x in (args.contexts or "2048,8192,32768").split(",")]
    args.chunks = [float(x) for x in args.chunks.split(",")]
    args.worlds = [int(x) for x in args.worlds.split(",")]
    return args


class Bench:
    """One rank's view: the mesh, tensor factory and timing over the group."""

    def __init__(self, args, device):
        self.args, self.device = args, device
        self.mesh = distattn.SPMesh.build(ulysses_degree=args.ulysses)
        self.dtype = common.DTYPES[args.dtype]
        self.gen = torch.Generator().manual_seed(1 + dist.get_rank())

    def qkv(self, tokens: int):
        a = self.args
        return [torch.randn(a.batch, tokens, h, a.head_dim, generator=self.gen)
                .to(self.device, self.dtype) for h in (a.heads, a.kv_heads, a.kv_heads)]

    def slowest_ms(self, ms: float) -> float:
        t = torch.tensor([ms], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def timed(self, fn) -> float:
        """The slowest rank's milliseconds for one ``fn()``."""
        common.synchronize(self.device)
        dist.barrier()
        t = time.perf_counter()
        fn()
        common.synchronize(self.device)
        return self.slowest_ms((time.perf_counter() - t) * 1e3)

    def step(self, cache, begin, *args, sent=None):
        """Open a step with ``begin(*args)`` and run its one layer on random tensors; with a
        list ``sent``, append the bytes this rank sent during the step."""
        step = begin(*args)
        qkv = self.qkv(step.local_slots)
        with count_sent_bytes() as wire:
            cache.attend(0, *qkv)
        if sent is not None:
            sent.append(wire["bytes"])

    def prefilled(self, context: int) -> ShardedKVCache:
        cache = ShardedKVCache(self.mesh, 1, layout=self.args.layout, backend=self.args.backend)
        self.step(cache, cache.begin_sharded, context)
        return cache


def measure(b: Bench, context: int) -> tuple[dict, list]:
    a, P = b.args, b.mesh.size
    prefill = []
    for _ in range(a.iters):
        cache = ShardedKVCache(b.mesh, 1, layout=a.layout, backend=a.backend)
        prefill.append(b.timed(lambda: b.step(cache, cache.begin_sharded, context)))
    b.step(cache, cache.begin_replicated, 1)    # untimed: the first also agrees on arguments
    decode, sent, counted = [], [], []
    for _ in range(a.decode_steps):
        before = cache.comm.bytes_sent
        decode.append(b.timed(lambda: b.step(cache, cache.begin_replicated, 1, sent=sent)))
        counted.append(cache.comm.bytes_sent - before)
    if counted != sent:
        raise RuntimeError(f"the cache counted {counted} bytes, the wire {sent}")
    others = (b.mesh.ulysses_degree - 1) + (b.mesh.ring_degree - 1)
    full = 2 * a.batch * context * a.kv_heads * a.head_dim * common.DTYPES[a.dtype].itemsize
    row = {"P": P, "ulysses": b.mesh.ulysses_degree, "context": context,
           "prefill ms": statistics.median(prefill),
           "prefill tok/s": context / statistics.median(prefill) * 1e3,
           "decode ms/step": statistics.median(decode), "decode bytes/step": max(sent),
           "expected bytes/step": others * a.batch * a.heads * (a.head_dim + 1) * 4,
           "cache MiB/rank": cache.nbytes() / 2**20, "full cache MiB": full / 2**20}
    chunks = []
    for frac in a.chunks:
        n_new = max(1, round(frac * context))
        got = {}
        for strategy in ("pass_kv", "pass_q"):
            times, sent = [], []
            for _ in range(a.iters):
                cache = b.prefilled(context)
                times.append(b.timed(lambda: b.step(cache, cache.begin_sharded, n_new,
                                                    strategy, sent=sent)))
            got[strategy] = (statistics.median(times), max(sent) / 2**20)
        elem = common.DTYPES[a.dtype].itemsize
        acc = 8 if a.dtype == "fp64" else 4
        auto = choose_strategy(n_new, context, a.heads, a.kv_heads, a.head_dim, elem, acc)
        chunks.append({"P": P, "context": context, "new tokens": n_new,
                       "new/(new+cached)": n_new / (n_new + context),
                       "pass_kv ms": got["pass_kv"][0], "pass_q ms": got["pass_q"][0],
                       "pass_kv MiB sent": got["pass_kv"][1], "pass_q MiB sent": got["pass_q"][1],
                       "auto picks": auto,
                       "faster": min(got, key=lambda s: got[s][0])})
    return row, chunks


def worker(args) -> tuple[list, list, str]:
    rank, world = dist.get_rank(), dist.get_world_size()
    device = common.rank_device(args.device, rank)
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    b = Bench(args, device)
    rows, chunk_rows = [], []
    for context in args.contexts:
        row, chunks = measure(b, context)
        rows.append(row)
        chunk_rows += chunks
        if rank == 0:
            print(f"  P={world} context {context}: prefill {row['prefill ms']:.1f} ms, decode "
                  f"{row['decode ms/step']:.2f} ms/step, {row['decode bytes/step']} B/step",
                  flush=True)
    return rows, chunk_rows, f"{common.device_name(device)} x {world} ({dist.get_backend()})"


def _spawned(rank, world, init_file, args, queue):
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo",
                            init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = worker(args)
        if rank == 0:
            queue.put(result)
    finally:
        dist.destroy_process_group()


def _run_world(world: int, args):
    ctx = common.process_context()
    queue = ctx.Queue()
    fd, init_file = tempfile.mkstemp(prefix="distattn_bench_")
    os.close(fd)
    os.unlink(init_file)
    try:
        common.start_ranks(_spawned, (world, init_file, args, queue), world)
        return queue.get(timeout=10)
    finally:
        if os.path.exists(init_file):
            os.unlink(init_file)


def write_tables(args, rows, chunk_rows, devices) -> None:
    a = args
    intro = (f"- devices: {'; '.join(sorted(set(devices)))}\n"
             f"- one layer: batch {a.batch}, heads {a.heads}, kv heads {a.kv_heads}, head_dim "
             f"{a.head_dim}, {a.dtype}, layout {a.layout}, Ulysses degree {a.ulysses}; "
             f"medians of {a.iters} (prefill, chunks) and {a.decode_steps} (decode) timings")
    if a.device == "cpu":
        intro += ("\n- CPU run: processes share this machine's cores; the timings say little "
                  "about GPUs. The bytes are exact.")
    md = (f"# Sequence-parallel inference, per layer\n\n{intro}\n\n## Prefill and decode\n\n"
          + common.markdown_table(COLUMNS, rows)
          + "\n\n## Follow-up chunks: pass-KV or pass-Q\n\n"
          + common.markdown_table(CHUNK_COLUMNS, chunk_rows) + "\n")
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "inference.md"), "w") as f:
        f.write(md)
    common.write_csv(os.path.join(a.out, "inference.csv"), COLUMNS, rows)
    common.write_csv(os.path.join(a.out, "inference_chunks.csv"), CHUNK_COLUMNS, chunk_rows)
    print(md)
    print(f"written to {a.out}", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:      # torchrun: one world
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
        try:
            rows, chunk_rows, device = worker(args)
            if dist.get_rank() == 0:
                write_tables(args, rows, chunk_rows, [device])
        finally:
            dist.destroy_process_group()
        return 0
    rows, chunk_rows, devices = [], [], []
    for world in args.worlds:
        if world % args.ulysses:
            print(f"skipping world {world}: not a multiple of --ulysses {args.ulysses}")
            continue
        r, c, d = _run_world(world, args)
        rows += r
        chunk_rows += c
        devices.append(d)
    write_tables(args, rows, chunk_rows, devices)
    return 0


if __name__ == "__main__":
    sys.exit(main())
