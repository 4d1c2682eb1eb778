#!/usr/bin/env python3
"""SASS gate of the Hopper kernels: their sm_90a machine code really uses the Hopper units.

For every object file of a Hopper TU (csrc/kernels/{fwd,bwd}_sm90_*.cu -> *_sm90_*.cu.o) under
a CMake build directory, disassembles it (cuobjdump -sass) and fails (exit 1) unless each
sm_90a function of fwd_sm90_kernel<T, D, Dv>, bwd_kv_sm90_kernel<T, D, Dv> and
bwd_q_sm90_kernel<T, D, Dv> contains

  * HGMMA   (wgmma.mma_async: S = Q K^T and O += P V; S^T, dP^T, dV and dK in the dK/dV
            kernel; S, dP and dQ in the dQ kernel),
  * UTMALDG (TMA tiled loads of Q, K, V (and dO)),
  * SYNCS   (mbarrier arrive / try_wait: the producer/consumer ring),

and every expected kernel (fp16, bf16 x the given head dims) is there. Functions compiled for
other architectures (where the kernel body is empty) must contain no HGMMA. Prints, per kernel,
the instruction counts and the registers ptxas reported (tests/cpp/ptxas_log.sh's logs).

cuobjdump (and the nvdisasm it runs) is looked up in $CUOBJDUMP, PATH, next to nvcc
($CUDACXX or /usr/local/cuda/bin) and in the `nvidia-cuda-cuobjdump` / `nvidia-cuda-nvdisasm`
pip packages (nvidia/cu13/bin), which a minimal toolkit install may need.

Usage: sass_gate.py BUILD_DIR [--head-dims 64,128]
"""
from __future__ import annotations

import argparse
import os
import pathlib
import re
import shutil
import subprocess
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import ptxas_gate  # noqa: E402  (same directory)

FUNC = re.compile(r"Function : (\S+)")
ARCH = re.compile(r"code for (sm_\w+)")
KERNEL = re.compile(r"(fwd_sm90_kernel|bwd_kv_sm90_kernel|bwd_q_sm90_kernel)I(6__half|13__nv_bfloat16)"
                    r"Li(\d+)ELi(\d+)E")
KINDS = ("fwd_sm90_kernel", "bwd_kv_sm90_kernel", "bwd_q_sm90_kernel")
REQUIRED = ("HGMMA", "UTMALDG", "SYNCS")


def find_cuobjdump() -> tuple[str | None, dict]:
    """The cuobjdump to run and the environment (PATH with nvdisasm's directory)."""
    env = dict(os.environ)
    candidates = []
    if env.get("CUOBJDUMP"):
        candidates.append(env["CUOBJDUMP"])
    if shutil.which("cuobjdump"):
        candidates.append(shutil.which("cuobjdump"))
    nvcc = env.get("CUDACXX") or shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    candidates.append(str(pathlib.Path(nvcc).parent / "cuobjdump"))
    try:
        import nvidia  # the pip packages' namespace
        for root in nvidia.__path__:
            candidates += [str(p) for p in pathlib.Path(root).glob("cu*/bin/cuobjdump")]
    except ImportError:
        pass
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            env["PATH"] = str(pathlib.Path(c).parent) + os.pathsep + env.get("PATH", "")
            return c, env
    return None, env


def parse_sass(text: str) -> list[tuple[str, str, dict]]:
    """(arch, mangled name, {opcode prefix: count}) per function of a cuobjdump -sass listing."""
    out, arch, name, counts, func_arch = [], "?", None, {}, "?"
    for line in text.splitlines():
        m = ARCH.search(line)
        if m:
            arch = m.group(1)
            continue
        m = FUNC.search(line)
        if m:
            if name is not None:
                out.append((func_arch, name, counts))
            name, counts, func_arch = m.group(1), {}, arch
            continue
        if name is not None and "/*" in line:
            for op in REQUIRED + ("USETMAXREG", "BAR"):
                if re.search(rf"\b{op}\b", line) or re.search(rf"\b{op}\.", line):
                    counts[op] = counts.get(op, 0) + 1
    if name is not None:
        out.append((func_arch, name, counts))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("build_dir", type=pathlib.Path)
    ap.add_argument("--head-dims", default="64,128")
    args = ap.parse_args(argv)
    dims = [int(d) for d in args.head_dims.split(",") if d]
    tool, env = find_cuobjdump()
    if tool is None:
        print("sass gate: FAILED: cuobjdump not found (set CUOBJDUMP, or pip install "
              "nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)", file=sys.stderr)
        return 1
    objs = sorted(p for pat in ("fwd_sm90_*.cu.o", "bwd_sm90_*.cu.o")
                  for p in args.build_dir.rglob(pat))
    logs = "\n".join(p.with_name(p.name + ".ptxas.log").read_text(errors="replace")
                     for p in objs if p.with_name(p.name + ".ptxas.log").exists())
    regs = {(e.arch, e.mangled): e.registers for e in ptxas_gate.parse(logs)[0]}
    bad, seen = [], set()
    for obj in objs:
        r = subprocess.run([tool, "-sass", str(obj)], capture_output=True, text=True, env=env)
        if r.returncode != 0:
            bad.append(f"{obj.name}: cuobjdump failed: {r.stderr.strip()[:300]}")
            continue
        for arch, name, counts in parse_sass(r.stdout):
            k = KERNEL.search(name)
            if not k:
                continue
            kind, dtype = k.group(1), ptxas_gate.DTYPES[k.group(2)]
            label = f"{arch} {kind}<{dtype} hd{k.group(3)}>"
            summary = " ".join(f"{op} {counts.get(op, 0)}" for op in REQUIRED + ("USETMAXREG",))
            print(f"  {label:36s} {regs.get((arch, name), -1):4d} regs  {summary}")
            if arch == "sm_90a":
                seen.add((kind, dtype, int(k.group(3))))
                missing = [op for op in REQUIRED if counts.get(op, 0) == 0]
                if missing:
                    bad.append(f"{label}: no {', '.join(missing)} in the SASS")
            elif counts.get("HGMMA", 0):
                bad.append(f"{label}: HGMMA outside sm_90a")
    for kind in KINDS:
        for dtype in ("fp16", "bf16"):
            for d in dims:
                if (kind, dtype, d) not in seen:
                    bad.append(f"sm_90a {kind}<{dtype} hd{d}>: not found in the objects "
                               f"under {args.build_dir} (was 90a among the archs?)")
    if bad:
        print("sass gate: FAILED", file=sys.stderr)
        for b in bad:
            print(f"  {b}", file=sys.stderr)
        return 1
    print(f"sass gate: {len(seen)} sm_90a Hopper kernels use HGMMA, UTMALDG and SYNCS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
