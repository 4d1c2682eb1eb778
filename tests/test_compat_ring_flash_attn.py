"""distattn.compat.ring_flash_attn vs fp64 dense attention (out, lse, dq, dk, dv at 1e-10) on
gloo worlds 2, 4 and 8: every entry point, causal and not, packed forms, a global window with
softcap, the per-document varlen layouts, llama3's prepare + varlen, the hf adapter's
flash_attention_2 function; and compat.alias."""
from __future__ import annotations

import subprocess
import sys

import pytest

from compat_cases import run_compat
from spawn import run_world

TOL = 1e-10


@pytest.mark.parametrize("world", [2, 4, 8])
def test_every_entry_point_matches_dense_reference(world):
    per_rank = run_world(world, run_compat, world == 8)
    for rank, res in enumerate(per_rank):
        for name, r in res.items():
            if isinstance(r, dict):
                assert r.pop("third_is_none"), (rank, name)
                assert max(r.values()) <= TOL, (rank, name, r)
            else:
                assert r is True, (rank, name)


def test_alias_installs_on_request_and_refuses_the_real_package():
    code = r'''
import sys, types
import distattn, distattn.compat as compat
assert "ring_flash_attn" not in sys.modules          # importing distattn installs nothing
mod = compat.alias("ring_flash_attn")
import ring_flash_attn
from ring_flash_attn import zigzag_ring_flash_attn_func, llama3_flash_attn_varlen_func
from ring_flash_attn.adapters.hf_adapter import substitute_hf_flash_attn, DATA_PARAMS
assert ring_flash_attn is mod and compat.alias("ring_flash_attn") is mod
for k in list(sys.modules):
    if k == "ring_flash_attn" or k.startswith("ring_flash_attn."):
        del sys.modules[k]
sys.modules["ring_flash_attn"] = types.ModuleType("ring_flash_attn")   # "the real one"
try:
    compat.alias("ring_flash_attn"); raise SystemExit("no refusal")
except RuntimeError as e:
    assert "already imported" in str(e)
try:
    compat.alias("nope"); raise SystemExit("no refusal")
except ValueError:
    pass
yc = compat.alias("yunchang")
from yunchang import LongContextAttention, set_seq_parallel_pg, EXTRACT_FUNC_DICT
import yunchang.globals
assert yunchang.globals.PROCESS_GROUP is yc.PROCESS_GROUP
print("ok")
'''
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr
