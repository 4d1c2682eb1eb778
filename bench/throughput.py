"""Distributed throughput of dist_flash_attn: every Ulysses x ring split, every layout/schedule.

For each split of the world size into ``ulysses_degree x ring_degree`` (those the head counts
allow) and each layout/schedule (causal: contiguous ring, zigzag ring, stripe ring,
contiguous helper; ``--no-causal``: contiguous ring), it times forward and forward+backward
iterations of ``distattn.dist_flash_attn`` on a global sequence of ``--seqlen`` tokens and
reports iterations/s (the slowest rank's time), TFLOP/s per GPU and the fraction of the
"no-comm" bound: the same attention as one kernel call on one device (rank 0's), divided by
the world size. The table has the form of the published USP tables (one row per
``ring_degree x ulysses_degree``) and is written to ``--out`` (markdown and CSV).

    torchrun --nproc-per-node 8 bench/throughput.py --seqlen 65536     # NCCL on GPUs
    torchrun --nproc-per-node 8 bench/throughput.py --profile          # + per-step overlap
    python bench/throughput.py --nproc 4 --smoke                        # 4 CPU procs, gloo

``--profile`` runs one more forward+backward per configuration with a
``distattn.profile.StepProfiler`` and prints, per pass and step, the compute time and the time
spent waiting for communication after it (max over ranks): measured overlap.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402  (puts the repository root on sys.path)
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import distattn  # noqa: E402
from distattn.kernels import get_backend  # noqa: E402
from distattn.kernels.mask import Mask  # noqa: E402
from distattn.layout import seq_multiple  # noqa: E402

COLUMNS = ["schedule", "ring_degree x ulysses_degree", "fwd it/s", "fwd+bwd it/s",
           "fwd TFLOP/s/GPU", "fwd+bwd TFLOP/s/GPU", "fwd % of no-comm",
           "fwd+bwd % of no-comm", "note"]
PROFILE_COLUMNS = ["schedule", "ring_degree x ulysses_degree", "rank", "pass", "step",
                   "compute_ms", "wait_ms"]
BOUND = "no-comm bound"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlen", type=int, default=None,
                   help="global sequence length (default: 8192 tokens per rank)")
    p.add_argument("--heads", type=int, default=32, help="query heads")
    p.add_argument("--kv-heads", type=int, default=8, help="key/value heads")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=sorted(common.DTYPES), default="bf16")
    p.add_argument("--backend", default="auto", help="auto | cuda | torch | reference")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--no-causal", dest="causal", action="store_false",
                   help="non-causal attention (only the contiguous ring is timed)")
    p.add_argument("--placement", default="ulysses_inner",
                   choices=("ulysses_inner", "ring_inner"))
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--profile", action="store_true",
                   help="also print per-step compute / communication-wait times")
    p.add_argument("--nproc", type=int, default=None,
                   help="without torchrun: spawn this many local processes")
    p.add_argument("--out", default=common.DEFAULT_OUT, help="output directory")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes on CPU (gloo): checks that everything runs")
    args = p.parse_args(argv)
    if args.smoke:
        args.device = args.device or "cpu"
        args.heads, args.kv_heads, args.head_dim, args.dtype = 4, 2, 16, "fp32"
        args.warmup, args.iters = 1, 2
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.heads % args.kv_heads:
        p.error("--heads must be a multiple of --kv-heads")
    return args


def _schedules(causal: bool):
    return common.CAUSAL_SCHEDULES if causal else (("contiguous", "ring"),)


def _sync(device):
    common.synchronize(device)


def _timed_ms(fn, args, device) -> float:
    """Milliseconds per ``fn()`` call: the slowest rank's time over ``args.iters`` calls
    after ``args.warmup`` calls (CUDA events on a GPU, perf_counter on CPU)."""
    for _ in range(args.warmup):
        fn()
    _sync(device)
    dist.barrier()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(args.iters):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        ms = start.elapsed_time(end)
    else:
        t = time.perf_counter()
        for _ in range(args.iters):
            fn()
        ms = (time.perf_counter() - t) * 1e3
    slowest = torch.tensor([ms], dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return float(slowest.item()) / args.iters


def _bound_ms(args, device, seqlen: int) -> tuple[float, float]:
    """(fwd ms, fwd+bwd ms) of the whole attention as one backend call on this device."""
    dt = common.DTYPES[args.dtype]
    shp = (args.batch, seqlen, args.heads, args.head_dim)
    kshp = (args.batch, seqlen, args.kv_heads, args.head_dim)
    q = torch.randn(shp, device=device, dtype=dt)
    k, v = torch.randn(kshp, device=device, dtype=dt), torch.randn(kshp, device=device, dtype=dt)
    dout = torch.randn(shp, device=device, dtype=dt)
    be = get_backend(args.backend, q, k, v)
    scale = args.head_dim ** -0.5
    mask = Mask.causal(0) if args.causal else Mask.none()

    def fwd():
        return be.forward(q, k, v, scale=scale, mask=mask)

    def fwd_bwd():
        out, lse = fwd()
        be.backward(dout, q, k, v, out, lse, scale=scale, mask=mask)

    f = common.time_ms(fwd, device, args.warmup, args.iters)
    fb = common.time_ms(fwd_bwd, device, args.warmup, args.iters)
    return f, fb


def _why_not(layout: str, schedule: str, seqlen: int, U: int, R: int) -> str | None:
    """Why this configuration cannot run on ``seqlen`` tokens, or None."""
    m = seq_multiple(layout, R, U)
    if seqlen % m:
        return f"seqlen not a multiple of {m}"
    if schedule == "helper" and R > 1 and R % 2 == 0 and (seqlen // R) % 2:
        return "helper with even ring_degree needs an even ring part"
    return None


def _run_config(mesh, layout, schedule, args, device, world, seqlen, profile_rows, label):
    """Time one configuration; returns (fwd ms, fwd+bwd ms)."""
    dt = common.DTYPES[args.dtype]
    n = seqlen // world
    g = torch.Generator(device="cpu").manual_seed(1234 + dist.get_rank())

    def rnd(h):
        return torch.randn((args.batch, n, h, args.head_dim), generator=g).to(device, dt)

    q, k, v = rnd(args.heads), rnd(args.kv_heads), rnd(args.kv_heads)
    dout = rnd(args.heads)
    for t in (q, k, v):
        t.requires_grad_(True)
    kw = dict(mesh=mesh, causal=args.causal, layout=layout, schedule=schedule,
              backend=args.backend)

    def fwd():
        with torch.no_grad():
            distattn.dist_flash_attn(q, k, v, **kw)

    def fwd_bwd():
        for t in (q, k, v):
            t.grad = None
        distattn.dist_flash_attn(q, k, v, **kw).backward(dout)

    f_ms = _timed_ms(fwd, args, device)
    fb_ms = _timed_ms(fwd_bwd, args, device)
    if args.profile:
        from distattn.profile import StepProfiler
        prof = StepProfiler()
        for t in (q, k, v):
            t.grad = None
        distattn.dist_flash_attn(q, k, v, profiler=prof, **kw).backward(dout)
        summary = prof.summary()
        gathered = [None] * world
        dist.all_gather_object(gathered, summary)
        for rank, rows in enumerate(gathered):
            for r in rows:
                profile_rows.append({"schedule": label[0], "ring_degree x ulysses_degree":
                                     label[1], "rank": rank, **r})
        if dist.get_rank() == 0:
            _print_profile(gathered, label)
    return f_ms, fb_ms


def _print_profile(gathered, label) -> None:
    """Per pass and step: max over ranks of compute and of wait (ms)."""
    steps: dict = {}
    for rows in gathered:
        for r in rows:
            key = (r["pass"], r["step"])
            c, w = steps.get(key, (0.0, 0.0))
            steps[key] = (max(c, r["compute_ms"]), max(w, r["wait_ms"]))
    print(f"  profile {label[0]} {label[1]} (max over ranks):")
    print(f"    {'pass':<9s}{'step':>5s}{'compute ms':>13s}{'wait ms':>11s}")
    for (pass_name, step), (c, w) in sorted(steps.items()):
        print(f"    {pass_name:<9s}{step:>5d}{c:>13.3f}{w:>11.3f}")


def worker(args) -> int:
    """Body of every rank (the process group is initialised). Returns the exit status."""
    rank, world = dist.get_rank(), dist.get_world_size()
    device = common.rank_device(args.device, rank)
    if device.type == "cpu":
        torch.set_num_threads(1 if args.smoke else max(1, torch.get_num_threads() // world))
    torch.manual_seed(0)
    seqlen = args.seqlen or (32 if args.smoke else 8192) * world
    flops_f = common.attention_flops(args.batch, seqlen, args.heads, args.head_dim, args.causal)
    flops_fb = flops_f * 3.5
    header = [
        f"device: {common.device_name(device)} x {world} ({dist.get_backend()}); "
        f"dtype {args.dtype}; backend {args.backend}",
        f"seqlen {seqlen} (global), batch {args.batch}, heads {args.heads}, kv heads "
        f"{args.kv_heads}, head_dim {args.head_dim}, causal {args.causal}, placement "
        f"{args.placement}; {args.warmup} warmup + {args.iters} timed iterations",
    ]
    if device.type == "cpu":
        header.append("CPU run (smoke test): these numbers say nothing about GPU performance.")
    if rank == 0:
        print("\n".join(header), flush=True)

    rows, profile_rows, failures = [], [], 0
    # the no-comm bound, on rank 0 while the others wait
    bound = None
    if rank == 0:
        try:
            bound = _bound_ms(args, device, seqlen)
        except torch.OutOfMemoryError:
            bound = None
            print("no-comm bound: the whole sequence does not fit on one device", flush=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    box = [bound]
    dist.broadcast_object_list(box, src=0)
    bound = box[0]
    if bound is not None:
        rows.append({"schedule": BOUND, "ring_degree x ulysses_degree": f"1 GPU / {world}",
                     "fwd it/s": world * 1e3 / bound[0], "fwd+bwd it/s": world * 1e3 / bound[1],
                     "fwd TFLOP/s/GPU": flops_f / bound[0] / 1e9,
                     "fwd+bwd TFLOP/s/GPU": flops_fb / bound[1] / 1e9,
                     "fwd % of no-comm": 100.0, "fwd+bwd % of no-comm": 100.0, "note": ""})

    for U in common.ulysses_degrees(world, args.heads, args.kv_heads):
        R = world // U
        mesh = distattn.SPMesh.build(ulysses_degree=U, ring_degree=R,
                                     placement=args.placement)
        split = f"{R}x{U}"
        for layout, schedule in _schedules(args.causal):
            name = common.label(layout, schedule)
            row = {"schedule": name, "ring_degree x ulysses_degree": split}
            why = _why_not(layout, schedule, seqlen, U, R)
            if why:
                row["note"] = f"skipped: {why}"
                rows.append(row)
                continue
            try:
                f_ms, fb_ms = _run_config(mesh, layout, schedule, args, device, world, seqlen,
                                          profile_rows, (name, split))
            except Exception as exc:  # report and go on with the other configurations
                failures += 1
                row["note"] = f"error: {type(exc).__name__}: {exc}".replace("\n", " ")[:200]
                if rank == 0:
                    traceback.print_exc()
                rows.append(row)
                continue
            row.update({"fwd it/s": 1e3 / f_ms, "fwd+bwd it/s": 1e3 / fb_ms,
                        "fwd TFLOP/s/GPU": flops_f / world / f_ms / 1e9,
                        "fwd+bwd TFLOP/s/GPU": flops_fb / world / fb_ms / 1e9, "note": ""})
            if bound is not None:
                row["fwd % of no-comm"] = 100.0 * bound[0] / world / f_ms
                row["fwd+bwd % of no-comm"] = 100.0 * bound[1] / world / fb_ms
            rows.append(row)
            if rank == 0:
                print(f"  {name:<18s} ring {R} x ulysses {U}: fwd {1e3 / f_ms:9.3f} it/s, "
                      f"fwd+bwd {1e3 / fb_ms:9.3f} it/s", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()

    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        intro = "\n".join(f"- {h}" for h in header)
        md = (f"# dist_flash_attn throughput\n\n{intro}\n\n"
              + common.markdown_table(COLUMNS, rows) + "\n")
        with open(os.path.join(args.out, "throughput.md"), "w") as f:
            f.write(md)
        common.write_csv(os.path.join(args.out, "throughput.csv"), COLUMNS, rows)
        if args.profile:
            common.write_csv(os.path.join(args.out, "throughput_profile.csv"),
                             PROFILE_COLUMNS, profile_rows)
        print()
        print(md)
        print(f"written to {args.out}" + (f"; {failures} configuration(s) failed"
                                          if failures else ""), flush=True)
    return 1 if failures else 0


def _init(rank: int, world: int, init_method: str, device: str) -> None:
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world)


def _spawned(rank: int, world: int, init_file: str, args) -> None:
    """Entry point of a process started by ``--nproc``."""
    os.environ["LOCAL_RANK"] = str(rank)
    _init(rank, world, f"file://{init_file}", args.device)
    try:
        status = worker(args)
    finally:
        dist.destroy_process_group()
    if status:
        sys.exit(status)


def main(argv=None) -> int:
    args = parse_args(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:      # under torchrun
        _init(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), "env://", args.device)
        try:
            return worker(args)
        finally:
            dist.destroy_process_group()
    import torch.multiprocessing as mp
    nproc = args.nproc or 1
    fd, init_file = tempfile.mkstemp(prefix="distattn_bench_")
    os.close(fd)
    os.unlink(init_file)   # the FileStore creates it
    try:
        common.start_ranks(_spawned, (nproc, init_file, args), nproc)
    except mp.ProcessExitedException as exc:
        print(f"a worker exited with status {exc.exit_code}", file=sys.stderr)
        return 1
    finally:
        if os.path.exists(init_file):
            os.unlink(init_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
