#!/usr/bin/env python3
"""Compile gate on ptxas's resource report (nvcc -Xptxas -v) of the kernel build.

The CMake kernel build keeps each translation unit's report next to its object file
(tests/cpp/ptxas_log.sh writes <object>.ptxas.log). This script reads every such log under a
build directory and fails (exit 1) when

  * a kernel at gated head dims (default D = Dv = 64 and 128 and MLA's (D, Dv) = (192, 128);
    kernels without a head dim always) has a stack frame or spill stores/loads (local memory
    in the inner loop costs more than the registers it saves),
  * ptxas printed advisory C7510 (tensor-core instructions serialised, e.g. by a device
    assert; the build uses -DNDEBUG),
  * an expected kernel (fwd, dK/dV, dQ x fp16/bf16 x gated head dims x architecture, and on
    sm_90a the Hopper forward fwd_sm90_kernel and the Hopper backward's dK/dV and dQ kernels
    bwd_kv_sm90_kernel, bwd_q_sm90_kernel at D = Dv = 64, 128) has no report at all, so
    that the gate cannot pass by finding nothing. (tests/cpp/sass_gate.py checks that the
    Hopper kernel's SASS uses HGMMA, UTMALDG and SYNCS.)

Usage: ptxas_gate.py BUILD_DIR [--archs "90a;80"] [--head-dims 64,128,192x128]
(a head dim D means the pair (D, D); DxDv names a pair with V's head dim Dv).
"""
from __future__ import annotations

import argparse
import pathlib
import re
import sys
from dataclasses import dataclass

ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
PROPS = re.compile(r"Function properties for (\S+)")
USAGE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
REGS = re.compile(r"Used (\d+) registers")
# distattn::kern::<kind><T, D, Dv> (the attention kernels) or <T, ...> (the others); a single
# int argument D is read as (D, D).
KERNEL = re.compile(r"kern\d+(\w+?_kernel)I(6__half|13__nv_bfloat16|f)(?:Li(\d+)E(?:Li(\d+)E)?)?")
DTYPES = {"6__half": "fp16", "13__nv_bfloat16": "bf16", "f": "fp32"}
GATED_KINDS = ("fwd_kernel", "bwd_kv_kernel", "bwd_q_kernel")
# The Hopper kernels (fwd_sm90_kernel.cuh, bwd_sm90_kernel.cuh): expected on sm_90a at the gated
# D = Dv in here.
SM90_KINDS = ("fwd_sm90_kernel", "bwd_kv_sm90_kernel", "bwd_q_sm90_kernel")
SM90_DIMS = ((64, 64), (128, 128))


@dataclass
class Entry:
    arch: str        # "sm_80"
    mangled: str
    kind: str        # "fwd_kernel", ... or "?" when not one of ours
    dtype: str
    head_dim: int | None
    head_dim_v: int | None
    stack: int = -1
    spill_stores: int = -1
    spill_loads: int = -1
    registers: int = -1

    @property
    def dims(self) -> tuple[int, int] | None:
        return (self.head_dim, self.head_dim_v) if self.head_dim else None

    @property
    def label(self) -> str:
        return f"{self.arch} {self.kind}<{self.dtype}{dims_label(self.dims)}>"


def dims_label(dims) -> str:
    """The label's head dims: ' hd128' for (128, 128), ' hd192x128' for MLA's pair."""
    if dims is None:
        return ""
    d, dv = dims
    return f" hd{d}" if d == dv else f" hd{d}x{dv}"


def parse_dims(spec) -> tuple[int, int]:
    """64 or "64" -> (64, 64); "192x128" or (192, 128) -> (192, 128)."""
    if isinstance(spec, tuple):
        return spec
    d, _, dv = str(spec).partition("x")
    return int(d), int(dv or d)


def parse(text: str) -> tuple[list[Entry], list[str]]:
    """Entries of one or more ptxas -v reports, and the lines that carry advisory C7510."""
    entries: list[Entry] = []
    c7510 = [line.strip() for line in text.splitlines() if "C7510" in line]
    current: Entry | None = None
    props_for: str | None = None
    for line in text.splitlines():
        m = ENTRY.search(line)
        if m:
            mangled, arch = m.groups()
            k = KERNEL.search(mangled)
            d = int(k.group(3)) if k and k.group(3) else None
            dv = int(k.group(4)) if k and k.group(4) else d
            current = Entry(arch, mangled, k.group(1) if k else "?",
                            DTYPES.get(k.group(2), "?") if k else "?", d, dv)
            entries.append(current)
            props_for = None
            continue
        m = PROPS.search(line)
        if m:
            props_for = m.group(1)
            continue
        m = USAGE.search(line)
        if m and current is not None and props_for == current.mangled:
            current.stack, current.spill_stores, current.spill_loads = map(int, m.groups())
            continue
        m = REGS.search(line)
        if m and current is not None and current.registers < 0:
            current.registers = int(m.group(1))
    return entries, c7510


def violations(entries: list[Entry], c7510: list[str], archs: list[str],
               head_dims: list) -> list[str]:
    """Everything that fails the gate, one sentence each (empty: the gate passes).
    ``head_dims``: the gated pairs, each D (for (D, D)), "DxDv" or a tuple (D, Dv)."""
    gated = [parse_dims(h) for h in head_dims]
    bad = [f"ptxas advisory C7510: {line}" for line in c7510]
    for e in entries:
        if e.dims is not None and e.dims not in gated:
            continue
        if e.stack < 0:
            bad.append(f"{e.label}: no resource usage line in the report")
        elif e.stack or e.spill_stores or e.spill_loads:
            bad.append(f"{e.label}: {e.stack} bytes stack frame, {e.spill_stores} bytes spill "
                       f"stores, {e.spill_loads} bytes spill loads (must all be 0)")
    seen = {(e.arch, e.kind, e.dtype, e.dims) for e in entries}
    for arch in archs:
        if arch == "90a":
            for kind in SM90_KINDS:
                for dtype in ("fp16", "bf16"):
                    for dims in gated:
                        if dims in SM90_DIMS and (f"sm_{arch}", kind, dtype, dims) not in seen:
                            bad.append(f"sm_{arch} {kind}<{dtype}{dims_label(dims)}>: no ptxas "
                                       f"report found (was the kernel compiled with -Xptxas -v?)")
        for kind in GATED_KINDS:
            for dtype in ("fp16", "bf16"):
                for dims in gated:
                    if (f"sm_{arch}", kind, dtype, dims) not in seen:
                        bad.append(f"sm_{arch} {kind}<{dtype}{dims_label(dims)}>: no ptxas "
                                   f"report found (was the kernel compiled with -Xptxas -v?)")
    return bad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("build_dir", type=pathlib.Path)
    ap.add_argument("--archs", default="90a;80", help='e.g. "90a;80" (DISTATTN_CUDA_ARCHS)')
    ap.add_argument("--head-dims", default="64,128,192x128",
                    help="gated head dims: D for (D, D), DxDv for a pair")
    args = ap.parse_args(argv)
    logs = sorted(args.build_dir.rglob("*.ptxas.log"))
    text = "\n".join(p.read_text(errors="replace") for p in logs)
    entries, c7510 = parse(text)
    archs = [a for a in args.archs.replace(",", ";").split(";") if a]
    head_dims = [parse_dims(d) for d in args.head_dims.split(",") if d]
    for e in sorted(entries, key=lambda e: e.label):
        print(f"  {e.label:40s} {e.registers:4d} regs  stack {e.stack}  spills "
              f"{e.spill_stores}/{e.spill_loads}")
    bad = violations(entries, c7510, archs, head_dims)
    if bad:
        print(f"ptxas gate: FAILED ({len(logs)} reports)", file=sys.stderr)
        for b in bad:
            print(f"  {b}", file=sys.stderr)
        return 1
    print(f"ptxas gate: {len(entries)} kernels in {len(logs)} reports, no spills, no stack, "
          f"no C7510")
    return 0


if __name__ == "__main__":
    sys.exit(main())
