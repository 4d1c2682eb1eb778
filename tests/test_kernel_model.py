"""bench/kernel_model.py: the SASS reading behind the kernels' performance model.

On a synthetic listing: the main loop is the one with the tensor instructions, inner copy
loops count their trips, softcap and masking blocks stay off the fast path. On the real
sm_90a objects (when tests/cpp/ci.sh built them and a cuobjdump is there): the tensor work
found in each main loop's SASS equals what tiling.h's tile shape implies -- so the loop the
model reads is the kernel's tile loop, not some other loop.
"""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import kernel_model as km  # noqa: E402


def _listing(lines):
    """Instrs from (op, args) pairs at consecutive addresses 0x10 apart."""
    return [km.Instr(16 * i, op, args) for i, (op, args) in enumerate(lines)]


def _loop():
    head = [("MOV", "R0, 0x0")]                                          # loop head, 0x0
    copy = [("ISETP.GE.AND", "P0, PT, R1, R2, PT"),                      # inner copy loop
            ("LDGSTS.E.BYPASS.LTC128B.128", "[R3], desc[UR4][R4.64]"),
            ("IADD3", "R1, R1, 0x1, RZ"), ("BRA", "0x10")]
    mma = [("HMMA.16816.F32.BF16", "R8, R12, R16, R8")] * 8
    softcap = [("MUFU.TANH", "R20, R20")] * 4
    mask = [("ISETP.GT.AND", "P1, PT, R5, R6, PT")] * 32
    tail = [("MUFU.EX2", "R21, R21")] * 2 + [("FMNMX.FTZ", "R22, R22, R23, !PT"), ("BRA", "0x0")]
    at = lambda n: hex(16 * n)
    n_soft = len(head + copy + mma) + 1                  # the softcap skip's own slot
    n_mask = n_soft + len(softcap) + 1
    lines = (head + copy + mma + [("BRA", at(n_soft + len(softcap)))] + softcap
             + [("BRA", at(n_mask + len(mask)))] + mask + tail + [("EXIT", "")])
    return _listing(lines)


def test_main_loop_and_fast_path_on_a_synthetic_listing():
    ins = _loop()
    lo, hi = km.main_loop(ins)
    assert lo == 0x0 and ins[-2].addr == hi
    body = [x for x in ins if lo <= x.addr <= hi]
    counts = km.fast_path(body, lds_bytes_per_tile=16 * 6)   # 6 copies: 3 trips of K, 3 of V
    assert counts["HMMA.16816.F32.BF16"] == 8
    assert counts["LDGSTS.E.BYPASS.LTC128B.128"] == 3
    assert counts["MUFU.TANH"] == 0 and counts["ISETP.GT.AND"] == 0      # off the fast path
    assert counts["MUFU.EX2"] == 2 and counts["FMNMX.FTZ"] == 1


def test_pipes_count_tensor_flops_per_cta():
    w = km.pipes({"HMMA.16816.F32.BF16": 10, "MUFU.EX2": 3}, threads=128)
    assert w["tensor_flop"] == pytest.approx(10 * 4 * 4096 / km.MMA_SYNC_FRACTION)
    assert w["mufu_lanes"] == 3 * 4 * 32 and w["issue_warps"] == 13 * 4
    g = km.pipes({"HGMMA.64x128x16.F32.BF16": 2}, threads=384)       # 3 warpgroups
    assert g["tensor_flop"] == 2 * 3 * 2 * 64 * 128 * 16


def _real_kernels():
    tool = km.cuobjdump()
    build = os.path.join(ROOT, "build", "cmake-ci")
    if tool[0] is None or not os.path.isdir(build):
        return []
    return km.kernels(build, tool)


@pytest.mark.skipif(not _real_kernels(), reason="needs tests/cpp/ci.sh's objects and cuobjdump")
def test_sass_tensor_work_matches_the_tile_shapes():
    seen = set()
    for obj, name, kind, d, dv, regs, ins in _real_kernels():
        if kind not in km.TILES:
            continue
        lo, hi = km.main_loop(ins)
        tile = km.TILES[kind](d, dv)
        counts = km.fast_path([x for x in ins if lo <= x.addr <= hi],
                              tile.load_bytes / tile.loop_threads)
        w = km.pipes(counts, tile.loop_threads)
        hopper = any(op.startswith("HGMMA") for op in counts)
        scale = 1.0 if hopper else km.MMA_SYNC_FRACTION
        assert w["tensor_flop"] * scale == pytest.approx(tile.flop), (kind, name)
        seen.add(kind)
    assert {"fwd", "bwd_kv", "bwd_q", "fwd_sm90", "bwd_kv_sm90", "bwd_q_sm90"} <= seen
