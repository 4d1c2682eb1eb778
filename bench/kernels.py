"""Kernel benchmark: distattn's CUDA kernels next to PyTorch's flash and cuDNN SDPA backends.

    python bench/kernels.py [--dtype bf16|fp16] [--reps 20] [--out bench/out] [--quick]

1. TFLOP/s of forward and backward on the FlashAttention-3 paper's shapes: batch * seqlen =
   16k tokens, Hq * head_dim = 2048, seqlen 1k..16k, head_dim 64 and 128, causal and not.
   FLOPs = 4 * B * H * Sq * Sk * D forward (x0.5 causal), x2.5 for backward (docs/BENCHMARKS.md).
   Each method runs in its own native layout: distattn on [B, S, H, D], SDPA on [B, H, S, D].
   Backward of distattn includes its delta preprocessing; backward of SDPA is autograd's
   backward of the SDPA node (retain_graph), i.e. the ATen backward kernel.
2. One P=8 zigzag ring sequence of steps on one GPU (rank 0's 8 steps, no communication):
   the fused ring step (CudaBackend.forward_into / backward_into) against the torch backend's
   forward + merge (TorchBackend.forward_into / backward_into), and against our own kernels
   unfused (forward + standalone merge kernel).

Writes <out>/kernels.md (table, with the GPU name), <out>/kernels.csv and <out>/kernels.png
(when matplotlib is installed). Prints the GPU name first. Exits 0 with a message on a
machine without a CUDA GPU.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def attention_flops(b, h, sq, sk, d, causal, direction):
    f = 4.0 * b * h * sq * sk * d * (0.5 if causal else 1.0)
    return f * (2.5 if direction == "bwd" else 1.0)


def time_ms(fn, reps, warmup=3):
    """Median wall time of fn() in milliseconds, measured with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


# ---- methods: each returns (fwd_fn, bwd_fn) closures for one shape, or raises -----------------
def distattn_method(b, s, h, d, causal, dtype):
    from distattn import _C  # noqa: PLC0415
    q, k, v, dout = (torch.randn(b, s, h, d, device="cuda", dtype=dtype) for _ in range(4))
    out = torch.empty_like(q)
    lse = torch.empty(b, h, s, device="cuda")
    dq, dk, dv = (torch.empty(b, s, h, d, device="cuda") for _ in range(3))
    scale = d ** -0.5

    def fwd():
        _C.fwd(q, k, v, out, lse, scale, causal, 0)

    fwd()

    def bwd():
        _C.bwd(dout, q, k, v, out, lse, dq, dk, dv, scale, causal, 0, False)

    return fwd, bwd


def sdpa_method(backend_name):
    def make(b, s, h, d, causal, dtype):
        from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: PLC0415
        backend = getattr(SDPBackend, backend_name)
        q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=dtype, requires_grad=True)
                   for _ in range(3))
        dout = torch.randn(b, h, s, d, device="cuda", dtype=dtype)

        def fwd():
            with sdpa_kernel(backend), torch.no_grad():
                F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        def bwd():
            torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)

        fwd()
        bwd()
        return fwd, bwd
    return make


METHODS = {
    "distattn": distattn_method,
    "torch-flash": sdpa_method("FLASH_ATTENTION"),
    "torch-cudnn": sdpa_method("CUDNN_ATTENTION"),
}


def bench_shapes(args, have_ext):
    rows = []
    seqlens = [1024, 4096] if args.quick else [1024, 2048, 4096, 8192, 16384]
    for d in (64, 128):
        h = 2048 // d
        for causal in (False, True):
            for s in seqlens:
                b = 16384 // s
                for name, make in METHODS.items():
                    if name == "distattn" and not have_ext:
                        continue
                    row = dict(method=name, head_dim=d, causal=causal, seqlen=s, batch=b,
                               heads=h, fwd_tflops=None, bwd_tflops=None, note="")
                    try:
                        fwd, bwd = make(b, s, h, d, causal, DTYPES[args.dtype])
                        for direction, fn in (("fwd", fwd), ("bwd", bwd)):
                            ms = time_ms(fn, args.reps)
                            row[f"{direction}_tflops"] = (
                                attention_flops(b, h, s, s, d, causal, direction) / ms / 1e9)
                    except Exception as exc:  # noqa: BLE001 - an unsupported backend is a row
                        row["note"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
                    rows.append(row)
                    print(f"  d={d} causal={causal!s:5} s={s:5} {name:12} "
                          f"fwd {_fmt(row['fwd_tflops'])} bwd {_fmt(row['bwd_tflops'])} "
                          f"TFLOP/s {row['note']}", flush=True)
                    torch.cuda.empty_cache()
    return rows


def _fmt(x):
    return f"{x:7.1f}" if x is not None else "    n/a"


# ---- the ring sequence ------------------------------------------------------------------------
def bench_ring(args, have_ext):
    """Rank 0's P=8 zigzag steps: fused vs torch backend + merge vs our unfused kernels."""
    from distattn.kernels import Mask  # noqa: PLC0415
    from distattn.kernels.base import BlockAttention  # noqa: PLC0415
    from distattn.kernels.torch_sdpa import TorchBackend  # noqa: PLC0415

    world, rank = 8, 0
    seq = 16384 if args.quick else 65536
    b, h, d = 1, 16, 128
    c = seq // (2 * world)  # zigzag chunk
    dtype = DTYPES[args.dtype]

    def chunks(r):  # (local start, global start) of rank r's two chunks
        return [(0, r * c), (c, (2 * world - 1 - r) * c)]

    q = torch.randn(b, 2 * c, h, d, device="cuda", dtype=dtype)
    kv = [(torch.randn(b, 2 * c, h, d, device="cuda", dtype=dtype),
           torch.randn(b, 2 * c, h, d, device="cuda", dtype=dtype)) for _ in range(world)]
    dout = torch.randn_like(q)
    scale = d ** -0.5
    steps = []  # (q slice, k, v, mask) of every block of every step, in ring order
    for step in range(world):
        src = (rank - step) % world
        k, v = kv[src]
        for ql, qg in chunks(rank):
            for kl, kg in chunks(src):
                mask = Mask.causal(qg - kg).simplify(c, c)
                if mask.kind != "empty":
                    steps.append((slice(ql, ql + c), k[:, kl:kl + c], v[:, kl:kl + c], mask))

    # Final out/lse for backward (any correct forward will do).
    torch_be = TorchBackend()
    out_acc = torch.zeros(b, 2 * c, h, d, device="cuda")
    lse_acc = torch.full((b, h, 2 * c), float("-inf"), device="cuda")
    for qs, k, v, mask in steps:
        torch_be.forward_into(q[:, qs], k, v, out_acc[:, qs], lse_acc[:, :, qs], scale=scale,
                              mask=mask)
    out_final = out_acc.to(dtype)
    lse_final = lse_acc.clone()

    def run_fwd(step_fn):
        def go():
            oa = torch.zeros(b, 2 * c, h, d, device="cuda")
            la = torch.full((b, h, 2 * c), float("-inf"), device="cuda")
            for qs, k, v, mask in steps:
                step_fn(q[:, qs], k, v, oa[:, qs], la[:, :, qs], scale=scale, mask=mask)
        return go

    def run_bwd(step_fn):
        def go():
            dq = torch.zeros(b, 2 * c, h, d, device="cuda")
            dk = torch.zeros(b, c, h, d, device="cuda")
            dv = torch.zeros(b, c, h, d, device="cuda")
            for qs, k, v, mask in steps:  # dk/dv accumulators stand in for the travelling ones
                step_fn(dout[:, qs], q[:, qs], k, v, out_final[:, qs], lse_final[:, :, qs],
                        dq[:, qs], dk, dv, scale=scale, mask=mask)
        return go

    variants = {"torch backend + merge": torch_be}
    if have_ext:
        from distattn.kernels.cuda import CudaBackend  # noqa: PLC0415
        cuda_be = CudaBackend()
        variants["distattn fused"] = cuda_be
        variants["distattn unfused"] = None
    rows = []
    for name, be in variants.items():
        if name == "distattn unfused":
            fwd_fn = lambda *a, **kw: BlockAttention.forward_into(cuda_be, *a, **kw)  # noqa: E731
            bwd_fn = lambda *a, **kw: BlockAttention.backward_into(cuda_be, *a, **kw)  # noqa: E731
        else:
            fwd_fn, bwd_fn = be.forward_into, be.backward_into
        fwd_ms = time_ms(run_fwd(fwd_fn), max(3, args.reps // 4))
        bwd_ms = time_ms(run_bwd(bwd_fn), max(3, args.reps // 4))
        rows.append(dict(variant=name, fwd_ms=fwd_ms, bwd_ms=bwd_ms, blocks=len(steps)))
        print(f"  ring P={world} zigzag seq={seq}: {name:22} fwd {fwd_ms:8.2f} ms  "
              f"bwd {bwd_ms:8.2f} ms", flush=True)
    return rows, dict(world=world, seq=seq, batch=b, heads=h, head_dim=d)


# ---- output -----------------------------------------------------------------------------------
def write_outputs(args, gpu, rows, ring_rows, ring_cfg, ext_note):
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "kernels.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()) if rows else ["method"])
        w.writeheader()
        w.writerows(rows)
    lines = [f"# Kernel benchmark on {gpu}", "",
             f"torch {torch.__version__}, CUDA {torch.version.cuda}, dtype {args.dtype}, "
             f"median of {args.reps} runs. TFLOP/s, FLOPs = 4*B*H*S*S*D (x0.5 causal, x2.5 bwd).",
             ""]
    if ext_note:
        lines += [f"distattn kernels not measured: {ext_note}", ""]
    methods = list(METHODS)
    lines.append("| head_dim | causal | seqlen | " +
                 " | ".join(f"{m} fwd | {m} bwd" for m in methods) + " |")
    lines.append("|---" * (3 + 2 * len(methods)) + "|")
    keys = sorted({(r["head_dim"], r["causal"], r["seqlen"]) for r in rows})
    for key in keys:
        cells = []
        for m in methods:
            r = next((r for r in rows if (r["head_dim"], r["causal"], r["seqlen"]) == key
                      and r["method"] == m), None)
            cells += [_fmt(r["fwd_tflops"]).strip(), _fmt(r["bwd_tflops"]).strip()] if r else \
                ["-", "-"]
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + " |")
    notes = [f"- {r['method']} d={r['head_dim']} causal={r['causal']} s={r['seqlen']}: "
             f"{r['note']}" for r in rows if r["note"]]
    if notes:
        lines += ["", "Failures:"] + notes
    lines += ["", f"## Ring sequence: P={ring_cfg['world']} zigzag, rank 0, "
                  f"seq {ring_cfg['seq']}, B={ring_cfg['batch']}, H={ring_cfg['heads']}, "
                  f"D={ring_cfg['head_dim']} ({ring_rows[0]['blocks']} non-empty blocks)", "",
              "| variant | fwd ms | bwd ms |", "|---|---|---|"]
    lines += [f"| {r['variant']} | {r['fwd_ms']:.2f} | {r['bwd_ms']:.2f} |" for r in ring_rows]
    path = os.path.join(args.out, "kernels.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {path}")
    print("\n".join(lines))

    try:
        import matplotlib  # noqa: PLC0415
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        print("matplotlib is not installed: skipping the plot (pip install matplotlib)")
        return
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
    for i, direction in enumerate(("fwd", "bwd")):
        for j, causal in enumerate((False, True)):
            ax = axes[i][j]
            for m in methods:
                for d, style in ((64, "--"), (128, "-")):
                    pts = [(r["seqlen"], r[f"{direction}_tflops"]) for r in rows
                           if r["method"] == m and r["head_dim"] == d and r["causal"] == causal
                           and r[f"{direction}_tflops"] is not None]
                    if pts:
                        xs, ys = zip(*sorted(pts))
                        ax.plot(xs, ys, style, marker="o", label=f"{m} d={d}")
            ax.set_xscale("log", base=2)
            ax.set_title(f"{direction}, {'causal' if causal else 'non-causal'}")
            ax.set_xlabel("seqlen")
            ax.set_ylabel("TFLOP/s")
            ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"distattn kernels vs SDPA on {gpu} ({args.dtype})")
    fig.tight_layout()
    png = os.path.join(args.out, "kernels.png")
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=os.path.join(_ROOT, "bench", "out"))
    ap.add_argument("--quick", action="store_true", help="fewer shapes, shorter ring")
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench/kernels.py: no CUDA GPU is available (torch.cuda.is_available() is "
              "False); nothing to measure.")
        return 0
    gpu = torch.cuda.get_device_name()
    print(f"GPU: {gpu}")
    from distattn.kernels.cuda import extension_error  # noqa: PLC0415
    ext_note = extension_error()
    if ext_note:
        print(f"distattn kernels absent ({ext_note}); measuring the PyTorch backends only")
    rows = bench_shapes(args, have_ext=ext_note is None)
    ring_rows, ring_cfg = bench_ring(args, have_ext=ext_note is None)
    write_outputs(args, gpu, rows, ring_rows, ring_cfg, ext_note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
