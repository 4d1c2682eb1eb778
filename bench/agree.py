"""Cost of distattn's cross-rank agreement (``distattn.agree``), in microseconds per call.

Rows (the slowest rank's median over repeats):

- ``baseline``: one ``dist.barrier`` on the same group, the latency floor of any collective;
- ``check_agreement, default``: the fields of one ``dist_flash_attn`` call, digested (cached
  by their cheap key) and compared over the mesh's control group (one small all-gather), as
  on every call by default;
- ``check_agreement, DISTATTN_CHECK=0``: the same fields when they equal the last agreed ones:
  the opt-out's steady state, no collective;
- ``agree_error``: one agreement on "no error" (the transformers mask function, per model call);
- ``dist_flash_attn forward``, default and with ``DISTATTN_CHECK=0``: the whole call, to set
  the agreement's cost against an attention (their difference is the price of the default).

    python bench/agree.py                       # 4 CPU processes over gloo, USP 2 x 2
    python bench/agree.py --nproc 8 --ulysses 2 --seq-local 512
    torchrun --nproc-per-node 8 bench/agree.py  # NCCL: the control group is still gloo
"""
from __future__ import annotations

import argparse
import csv
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
from distattn.agree import agree_error, check_agreement  # noqa: E402


def _per_call_us(fn, iters: int, repeats: int, group) -> float:
    """Median over ``repeats`` of the mean time of ``iters`` calls of ``fn``, in µs; every
    repeat starts together on all ranks."""
    fn()   # warm up (the first agreement of a call is never cached)
    times = []
    for _ in range(repeats):
        dist.barrier(group=group)
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        times.append((time.perf_counter() - start) / iters * 1e6)
    return statistics.median(times)


def _with_check(on: bool, fn):
    def run():
        old = os.environ.get("DISTATTN_CHECK")
        os.environ["DISTATTN_CHECK"] = "1" if on else "0"
        try:
            fn()
        finally:
            if old is None:
                del os.environ["DISTATTN_CHECK"]
            else:
                os.environ["DISTATTN_CHECK"] = old
    return run


def measure(args) -> list[tuple[str, float]]:
    mesh = distattn.SPMesh.build(ulysses_degree=args.ulysses)
    device = torch.device("cuda", torch.cuda.current_device()) if args.cuda else None
    q, k, v = (torch.randn(1, args.seq_local, args.heads, args.head_dim, device=device)
               for _ in range(3))
    fields = dict(q=q, k=k, v=v, causal=True, softmax_scale=args.head_dim ** -0.5,
                  layout="zigzag", schedule="auto", backend="auto", cu_seqlens=None,
                  window=None, softcap=None, sinks=None, requires_grad=False)
    agree = lambda: check_agreement(mesh, "dist_flash_attn", fields)
    attn = lambda: distattn.dist_flash_attn(q, k, v, mesh=mesh, causal=True, layout="zigzag")
    if args.cuda:
        attn_sync = lambda: (attn(), torch.cuda.synchronize())
    else:
        attn_sync = attn
    rows = [
        ("baseline: dist.barrier on the control group",
         lambda: dist.barrier(group=mesh.control_group), args.iters),
        ("check_agreement, default (every call)", _with_check(True, agree), args.iters),
        ("check_agreement, DISTATTN_CHECK=0 (unchanged)", _with_check(False, agree),
         args.iters),
        ("agree_error (no error)", lambda: agree_error(mesh, None), args.iters),
        ("dist_flash_attn forward, default", _with_check(True, attn_sync), args.attn_iters),
        ("dist_flash_attn forward, DISTATTN_CHECK=0", _with_check(False, attn_sync),
         args.attn_iters),
    ]
    out = []
    for name, fn, iters in rows:
        us = torch.tensor([_per_call_us(fn, iters, args.repeats, mesh.control_group)],
                          dtype=torch.float64)
        dist.all_reduce(us, op=dist.ReduceOp.MAX, group=mesh.control_group)
        out.append((name, float(us)))
    return out


def _report(args, rows) -> None:
    world = dist.get_world_size()
    backend = dist.get_backend()
    head = (f"distattn.agree cost: world {world} ({backend}), USP {args.ulysses} x "
            f"{world // args.ulysses}, q/k/v [1, {args.seq_local}, {args.heads}, "
            f"{args.head_dim}] fp32, slowest rank's median of {args.repeats} repeats")
    print(head)
    print("| what | µs per call |\n|---|---:|")
    for name, us in rows:
        print(f"| {name} | {us:,.1f} |")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "agree.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["what", "us per call", "world", "backend", "ulysses", "seq_local"])
        for name, us in rows:
            w.writerow([name, f"{us:.1f}", world, backend, args.ulysses, args.seq_local])


def _worker(rank: int, world: int, init_file: str, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    _main(args)


def _main(args) -> None:
    rows = measure(args)
    if dist.get_rank() == 0:
        _report(args, rows)
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nproc", type=int, default=4, help="local CPU processes (without torchrun)")
    p.add_argument("--ulysses", type=int, default=2)
    p.add_argument("--seq-local", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--attn-iters", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=common.DEFAULT_OUT)
    args = p.parse_args()
    if "RANK" in os.environ:   # under torchrun
        args.cuda = torch.cuda.is_available()
        if args.cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if args.cuda else "gloo")
        _main(args)
        return
    args.cuda = False
    fd, init_file = tempfile.mkstemp(prefix="distattn_agree_")
    os.close(fd)
    os.unlink(init_file)   # the FileStore creates it
    try:
        common.start_ranks(_worker, (args.nproc, init_file, args), args.nproc)
    finally:
        if os.path.exists(init_file):
            os.unlink(init_file)


if __name__ == "__main__":
    main()
