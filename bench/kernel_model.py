"""A performance model of the csrc kernels from their sm_90a SASS: per-tile cycles of each
pipe (tensor cores, shared memory, special functions, FP32/INT, instruction issue) and the
TFLOP/s they predict on an H100/H200 class GPU, for the first GPU run to check.

    python bench/kernel_model.py [--build build/cmake-ci] [--out bench/out] [--clock-ghz 1.83]

Needs the objects `tests/cpp/ci.sh` builds (its CMake build dir) and `cuobjdump` (the CUDA
toolkit's, or the `nvidia-cuda-cuobjdump` wheel's); exits 0 with a message when either is
missing. Nothing here runs on a GPU: every number is a prediction.

How a prediction is made (docs/KERNELS.md, "Performance model"):
1. `cuobjdump -sass` of each kernel; the *main loop* is the backward branch whose body holds
   the most tensor instructions (HMMA / HGMMA): one iteration is one key tile (forward) or one
   query tile (backward) of one CTA.
2. The loop body is cut into basic blocks. The *fast path* of a tile (no softcap, no masking:
   the interior tiles of a long sequence) leaves out the blocks that only softcap runs
   (MUFU.TANH and no tensor op; in a block with tensor ops just the MUFU.TANH) and the
   masking blocks (no math, at least 40% index compares: ISETP/PLOP3). Inner
   loops (the cp.async issue loops) count `trips` times, from the bytes a tile loads.
3. Per warp and tile, instructions are sorted into pipes; per SM and tile of every resident
   CTA, each pipe's cycles = work / its rate (RATES, per SM per clock, from NVIDIA's published
   H100 figures; `mma_sync_fraction` is an assumption, see below).
4. Two bounds: *overlapped* = the busiest pipe (perfect overlap, the best the schedule could
   do), *serial* = tensor + the sum of the others (nothing overlaps). The first GPU run
   reads where the kernel lands between them. For the Hopper forward's two ping-pong
   consumer warpgroups, a third estimate: max(tensor, tensor/2 + softmax/2), softmax being
   the non-tensor pipes of the tile one after another (wgmma and barrier latencies ignored).
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Per SM per clock, H100 SXM / H200 (132 SMs; 989 dense bf16 TFLOP/s at 1.83 GHz):
RATES = {
    "tensor_flop": 4096.0,   # wgmma dense 16-bit (989.4e12 / (132 * 1.83e9))
    "smem_bytes": 128.0,     # shared memory: 32 banks x 4 bytes
    "mufu_lanes": 16.0,      # special functions (ex2, tanh, rcp): 3.9 TFLOP/s in FA3's paper
    "fp32_lanes": 128.0,     # FFMA/FMUL/FADD/FMNMX
    "int_lanes": 64.0,       # integer and logic
    "issue_warps": 4.0,      # one warp instruction per clock per sub-partition
}
# mma.sync (HMMA) on sm_90 issues to the same tensor cores but not at wgmma's rate; public
# microbenchmarks put legacy mma well below the wgmma peak. An assumption until measured.
MMA_SYNC_FRACTION = 0.625

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)\s*([^;]*);")
_MMA_SHAPES = {"HMMA.16816": (16, 8, 16), "HMMA.1688": (16, 8, 8)}   # SASS spells m16n8k16
_GMMA_SHAPE = re.compile(r"HGMMA\.(\d+)x(\d+)x(\d+)")


@dataclass
class Instr:
    addr: int
    op: str
    args: str


def cuobjdump() -> tuple[str | None, dict]:
    """(cuobjdump, its environment) as the SASS gate finds them (tests/cpp/sass_gate.py)."""
    sys.path.insert(0, os.path.join(_ROOT, "tests", "cpp"))
    try:
        import sass_gate
    finally:
        sys.path.pop(0)
    return sass_gate.find_cuobjdump()


def sass_functions(obj: str, tool: tuple, arch: str = "sm_90a") -> dict:
    """{mangled kernel name: [Instr]} of ``obj``'s ``arch`` cubin (``tool``: cuobjdump())."""
    exe, env = tool
    text = subprocess.run([exe, "-sass", "-arch", arch, obj], capture_output=True, text=True,
                          check=True, env=env).stdout
    funcs, cur = {}, None
    for line in text.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            cur = funcs.setdefault(m.group(1), [])
            continue
        m = _LINE.search(line)
        if m and cur is not None:
            cur.append(Instr(int(m.group(1), 16), m.group(3), m.group(4).strip()))
    return funcs


def _target(ins: Instr) -> int | None:
    m = re.search(r"0x([0-9a-f]+)", ins.args)
    return int(m.group(1), 16) if ins.op.startswith("BRA") and m else None


def _is_tensor(op: str) -> bool:
    return op.startswith(("HMMA", "HGMMA"))


def main_loop(ins: list) -> tuple[int, int]:
    """(first, last) address of the loop with the most tensor instructions."""
    best, span = -1, None
    for i in ins:
        t = _target(i)
        if t is not None and t < i.addr:
            n = sum(1 for x in ins if t <= x.addr <= i.addr and _is_tensor(x.op))
            if n > best:
                best, span = n, (t, i.addr)
    if span is None:
        raise ValueError("no loop with tensor instructions")
    return span


def blocks(body: list) -> list:
    """Basic blocks of ``body`` (split at branch targets and after branches)."""
    targets = {t for t in map(_target, body) if t is not None}
    out, cur = [], []
    for x in body:
        if x.addr in targets and cur:
            out.append(cur)
            cur = []
        cur.append(x)
        if x.op.startswith(("BRA", "EXIT", "BSYNC")):
            out.append(cur)
            cur = []
    if cur:
        out.append(cur)
    return out


def _math_free(block: list) -> bool:
    return not any(_is_tensor(x.op) or x.op.startswith("MUFU") for x in block)


def _key(x: Instr) -> str:
    """The opcode, and for HGMMA where A comes from: ``.RS`` (registers, ``R24, gdesc[..]``)
    or ``.SS`` (shared memory: one ``gdesc`` names both operands)."""
    if x.op.startswith("HGMMA"):
        ops = [a.strip() for a in x.args.split(",")]
        return x.op + (".RS" if len(ops) > 1 and re.match(r"R\d", ops[1]) else ".SS")
    return x.op


def fast_path(body: list, lds_bytes_per_tile: float) -> collections.Counter:
    """Opcode counts of one iteration on the fast path (see the module docstring).
    ``lds_bytes_per_tile``: global bytes one thread copies per tile (for inner-loop trips)."""
    counts: collections.Counter = collections.Counter()
    start = body[0].addr                                 # the main loop's head
    for b in blocks(body):
        t = _target(b[-1])
        if t is not None and start < t <= b[0].addr:     # an inner loop: count its trips
            per_trip = sum(1 for x in b if x.op.startswith(("LDGSTS", "UTMALDG")))
            trips = max(1.0, lds_bytes_per_tile / 16.0 / max(per_trip, 1)) / 2  # K, then V
            for x in b:
                counts[x.op] += trips
            continue
        if _math_free(b) and len(b) >= 4 and \
                sum(1 for x in b if x.op.startswith(("ISETP", "PLOP3"))) >= 0.4 * len(b):
            continue                                     # a masking block (index compares)
        tensor = any(_is_tensor(x.op) for x in b)
        if any(x.op == "MUFU.TANH" for x in b) and not tensor:
            continue                                     # a softcap-only block
        for x in b:
            if x.op != "MUFU.TANH":                      # softcap merged into a math block
                counts[_key(x)] += 1
    return counts


@dataclass
class Kernel:
    name: str
    kind: str            # "fwd", "bwd_kv", "bwd_q"
    d: int
    dv: int
    registers: int
    smem_bytes: int
    threads: int
    counts: collections.Counter = field(default_factory=collections.Counter)


def pipes(counts: collections.Counter, threads: int) -> dict:
    """Per CTA tile: tensor FLOP, shared-memory bytes, MUFU/FP32/INT lane-ops, issued warp
    instructions. ``counts`` are one warp's (HMMA) or one warpgroup's view (HGMMA counted
    once per warpgroup: each of its 4 warps shows the instruction)."""
    warps = threads // 32
    w = {"tensor_flop": 0.0, "smem_bytes": 0.0, "mufu_lanes": 0.0, "fp32_lanes": 0.0,
         "int_lanes": 0.0, "issue_warps": 0.0}
    for op, n in counts.items():
        w["issue_warps"] += n * warps
        if shape := next((v for k, v in _MMA_SHAPES.items() if op.startswith(k + ".")), None):
            mm, nn, kk = shape
            w["tensor_flop"] += n * warps * 2 * mm * nn * kk * 1.0 / MMA_SYNC_FRACTION
        elif m := _GMMA_SHAPE.match(op):
            mm, nn, kk = (int(g) for g in m.groups())
            w["tensor_flop"] += n * (warps // 4) * 2 * mm * nn * kk
            # operand B (and A for .SS) from shared memory, once per warpgroup
            elem = 2
            w["smem_bytes"] += n * (warps // 4) * (nn * kk + (0 if op.endswith(".RS") else
                                                               mm * kk)) * elem
        elif op.startswith("LDSM"):
            x = 4 if ".4" in op else 2 if ".2" in op else 1
            w["smem_bytes"] += n * warps * 128 * x
        elif op.startswith(("LDS", "STS")):
            size = 16 if ".128" in op else 8 if ".64" in op else 4
            w["smem_bytes"] += n * warps * 32 * size
        elif op.startswith("LDGSTS"):
            w["smem_bytes"] += n * warps * 32 * 16
        elif op.startswith("MUFU"):
            w["mufu_lanes"] += n * warps * 32
        elif op.startswith(("FFMA", "FMUL", "FADD", "FMNMX", "FSEL", "FSETP", "F2FP", "FMNMX")):
            w["fp32_lanes"] += n * warps * 32
        elif op.startswith(("IADD", "IMAD", "ISETP", "LOP", "SHF", "LEA", "SEL", "IABS", "PLOP",
                            "MOV", "PRMT")):
            w["int_lanes"] += n * warps * 32
    return w


def predict(k: Kernel, sms: int, clock_ghz: float, useful_flop_per_tile: float,
            loop_threads: int | None = None) -> dict:
    """TFLOP/s bounds for a long sequence (every SM busy, fast-path tiles only)."""
    loop_threads = loop_threads or k.threads
    per_sm = min(65536 // max(k.registers * k.threads, 1), (228 * 1024) // max(k.smem_bytes, 1),
                 2048 // k.threads, 32)
    w = pipes(k.counts, loop_threads)
    cycles = {p: w[p] / RATES[p] for p in w}                     # per CTA tile, one SM alone
    cycles["issue_warps"] = w["issue_warps"] / RATES["issue_warps"]
    over = max(cycles.values())
    serial = cycles["tensor_flop"] + sum(c for p, c in cycles.items()
                                         if p not in ("tensor_flop", "issue_warps"))
    serial = max(serial, cycles["issue_warps"])
    # Two consumer warpgroups in ping-pong (fwd_sm90): one's softmax (its half of the
    # non-tensor pipes, run one after another) hides under the other's GEMMs (its half of the
    # tensor work): period = max(tensor, tensor / 2 + softmax / 2). Latencies ignored.
    softmax = cycles["mufu_lanes"] + cycles["fp32_lanes"] + cycles["int_lanes"]
    pingpong = max(cycles["tensor_flop"], cycles["tensor_flop"] / 2 + softmax / 2,
                   cycles["issue_warps"]) if k.kind == "fwd_sm90" else None
    tflops = lambda c: useful_flop_per_tile / c * sms * clock_ghz * 1e9 / 1e12
    return {"ctas_per_sm": per_sm, "cycles": cycles, "bound": max(cycles, key=cycles.get),
            "serial_cycles": serial,
            "tflops_overlapped": tflops(over), "tflops_serial": tflops(serial),
            "tflops_pingpong": None if pingpong is None else tflops(pingpong)}


@dataclass(frozen=True)
class Tile:
    """One main-loop iteration of a kernel: ``rows`` x ``cols`` (query, key) pairs, the FLOPs
    it counts (forward 4*D per pair; a backward kernel its own GEMMs), the bytes its CTA loads
    per iteration and its shared memory (csrc/distattn/tiling.h)."""
    rows: int
    cols: int
    flop: float
    load_bytes: float
    smem: int
    threads: int = 128          # the CTA's
    loop_threads: int = 128     # those that run the main loop (the consumers when specialised)

    @property
    def pairs(self) -> int:
        return self.rows * self.cols


def _pitch(cols: int) -> int:
    return cols + 8


# tiling.h's tile shapes (kWarps = 4): fwd BM = 64, BN = 64 if d/4 + dv/2 <= 112 else 32;
# dK/dV: 64 keys x (64 if d/2 + dv/2 <= 64 else 32) queries; dQ: 64 queries x (64 if d/2 <= 96
# else 32) keys. Elements are 2 bytes.
def _fwd(d, dv):
    bn = 64 if d // 4 + dv // 2 <= 112 else 32
    return Tile(64, bn, 2.0 * 64 * bn * (d + dv), bn * (d + dv) * 2,
                ((64 + bn) * _pitch(d) + bn * _pitch(dv)) * 2)


def _bwd_kv(d, dv):
    bm = 64 if d // 2 + dv // 2 <= 64 else 32
    return Tile(bm, 64, 2.0 * bm * 64 * (2 * d + 2 * dv), bm * (d + dv) * 2,
                ((64 + bm) * _pitch(d) + (64 + bm) * _pitch(dv)) * 2 + 2 * bm * 4)


def _bwd_q(d, dv):
    bn = 64 if d // 2 <= 96 else 32
    return Tile(64, bn, 2.0 * 64 * bn * (2 * d + dv), bn * (d + dv) * 2,
                ((64 + bn) * _pitch(d) + (64 + bn) * _pitch(dv)) * 2)


def _fwd_sm90(d, dv):
    # fwd_sm90_kernel.cuh: 128 query rows (2 consumer warpgroups x 64) x 128 keys per
    # iteration; a producer warpgroup loads K/V by TMA (no copy loops in the consumers).
    smem = 1024 + 2 * (128 * d + 2 * 128 * (d + dv)) + 8 * 7
    return Tile(128, 128, 2.0 * 128 * 128 * (d + dv), 0.0, smem, threads=384, loop_threads=256)


def _bwd_kv_sm90(d, dv):
    # bwd_sm90_kernel.cuh: 128 keys (2 consumer warpgroups x 64) x a staged query tile of
    # 64 rows (32 at d > 64) per iteration, 4 GEMMs; Q/dO streamed by TMA.
    bm = 32 if d > 64 else 64
    smem = 1024 + 2 * (128 * (d + dv) + 2 * bm * (d + dv))
    return Tile(bm, 128, 2.0 * bm * 128 * (2 * d + 2 * dv), 0.0, smem, threads=384,
                loop_threads=256)


def _bwd_q_sm90(d, dv):
    # bwd_sm90_kernel.cuh's dQ kernel: 128 query rows (2 consumer warpgroups x 64) x a staged
    # key tile of 128 keys (64 at d > 64) per iteration, 3 GEMMs; K/V streamed by TMA.
    bn = 64 if d > 64 else 128
    smem = 1024 + 2 * (128 * (d + dv) + 2 * bn * (d + dv))
    return Tile(128, bn, 2.0 * 128 * bn * (2 * d + dv), 0.0, smem, threads=384,
                loop_threads=256)


TILES = {"fwd": _fwd, "bwd_kv": _bwd_kv, "bwd_q": _bwd_q, "fwd_sm90": _fwd_sm90,
         "bwd_kv_sm90": _bwd_kv_sm90, "bwd_q_sm90": _bwd_q_sm90}
# The backward = a dK/dV kernel + a dQ kernel: mma.sync, the Hopper dK/dV kernel with the
# mma.sync dQ kernel (the Hopper backward before bwd_q_sm90_kernel), the full Hopper backward.
BACKWARDS = (("bwd_kv", "bwd_q"), ("bwd_kv_sm90", "bwd_q"), ("bwd_kv_sm90", "bwd_q_sm90"))

_NAME = re.compile(r"(fwd_sm90_kernel|bwd_kv_sm90_kernel|bwd_q_sm90_kernel|fwd_kernel|"
                   r"bwd_kv_kernel|bwd_q_kernel)I(\w+?)Li(\d+)ELi(\d+)E")


def _ptxas(log: str) -> dict:
    """{kernel: registers} for sm_90a from a ptxas -v log."""
    regs, cur = {}, None
    for line in open(log):
        m = re.search(r"Compiling entry function '(\S+)' for 'sm_90a'", line)
        if m:
            cur = m.group(1)
        elif cur and (m := re.search(r"Used (\d+) registers", line)):
            regs[cur], cur = int(m.group(1)), None
    return regs


def kernels(build: str, tool: tuple) -> list:
    out, seen = [], set()
    objdir = os.path.join(build, "CMakeFiles", "distattn_kernels.dir", "csrc", "kernels")
    for obj in sorted(glob.glob(os.path.join(objdir, "**", "*bf16_hd128.cu.o"), recursive=True)):
        regs = _ptxas(obj + ".ptxas.log") if os.path.exists(obj + ".ptxas.log") else {}
        for name, ins in sass_functions(obj, tool).items():
            m = _NAME.search(name)
            if not m or name in seen or not any(_is_tensor(x.op) for x in ins):
                continue              # (a launcher's TU may instantiate another TU's kernel)
            seen.add(name)
            kind = {"fwd_kernel": "fwd", "bwd_kv_kernel": "bwd_kv", "bwd_q_kernel": "bwd_q",
                    "fwd_sm90_kernel": "fwd_sm90", "bwd_kv_sm90_kernel": "bwd_kv_sm90",
                    "bwd_q_sm90_kernel": "bwd_q_sm90"}.get(
                m.group(1), m.group(1))
            out.append((obj, name, kind, int(m.group(3)), int(m.group(4)), regs.get(name, 0), ins))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", default=os.path.join(_ROOT, "build", "cmake-ci"))
    ap.add_argument("--clock-ghz", type=float, default=1.83)
    ap.add_argument("--sms", type=int, default=132)
    args = ap.parse_args(argv)
    tool = cuobjdump()
    if tool[0] is None:
        print("kernel_model: no cuobjdump (CUDA toolkit or `pip install nvidia-cuda-cuobjdump`)"
              "; nothing to model")
        return 0
    found = kernels(args.build, tool) if os.path.isdir(args.build) else []
    if not found:
        print(f"kernel_model: no kernel objects under {args.build}; run tests/cpp/ci.sh first")
        return 0
    print(f"kernel_model: predictions for {args.sms} SMs at {args.clock_ghz} GHz (H100 SXM / "
          f"H200 class); mma.sync at {MMA_SYNC_FRACTION} of the wgmma rate (assumed); "
          f"bf16, hd128, fast-path tiles (no mask, no softcap). Not measured.")
    print("| kernel | regs | CTAs/SM | tensor | smem | mufu | fp32 | int | issue | bound | "
          "TFLOP/s overlapped | serial |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    per_pair = {}
    for obj, name, kind, d, dv, regs, ins in found:
        lo, hi = main_loop(ins)
        body = [x for x in ins if lo <= x.addr <= hi]
        tile = TILES[kind](d, dv)
        k = Kernel(name, kind, d, dv, regs or 255, tile.smem, tile.threads,
                   fast_path(body, tile.load_bytes / tile.loop_threads))
        p = predict(k, args.sms, args.clock_ghz, tile.flop, tile.loop_threads)
        c = p["cycles"]
        print(f"| {kind} {os.path.basename(obj)} | {k.registers} | {p['ctas_per_sm']} | "
              f"{c['tensor_flop']:.0f} | {c['smem_bytes']:.0f} | {c['mufu_lanes']:.0f} | "
              f"{c['fp32_lanes']:.0f} | {c['int_lanes']:.0f} | {c['issue_warps']:.0f} | "
              f"{p['bound'].split('_')[0]} | {p['tflops_overlapped']:.0f} | "
              f"{p['tflops_serial']:.0f} |"
              + ("" if p["tflops_pingpong"] is None else
                 f" ping-pong (latencies ignored): {p['tflops_pingpong']:.0f}"))
        head_dim = d
        per_pair[kind] = {b: max(c.values()) / tile.pairs if b == "over" else
                          p["serial_cycles"] / tile.pairs for b in ("over", "serial")}
    for kv, dq in BACKWARDS:   # backward = dK/dV + dQ kernels, 10*D per pair
        if kv not in per_pair or dq not in per_pair:
            continue
        for b in ("over", "serial"):
            cyc = per_pair[kv][b] + per_pair[dq][b]
            print(f"backward ({kv} + {dq}), {b}: "
                  f"{10 * head_dim / cyc * args.sms * args.clock_ghz * 1e9 / 1e12:.0f} TFLOP/s "
                  f"(FLOPs counted as 2.5x the forward's)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
