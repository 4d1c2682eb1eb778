"""examples/generate.py --check compares what can be wrong in sharded generation -- tokens,
the cache's length per rank and in total, and the prefill work -- and exits non-zero when
one is off. The run below is a fresh process (transformers resolved today); the checks
themselves are also fed the numbers of a prompt that was re-fed on top of the sharded
prefill (transformers 5.24 with a cache that reported no layers) and must fail."""
import argparse
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))

import generate as example  # noqa: E402


def test_generate_check_passes_on_odd_prompt():
    cmd = [sys.executable, "examples/generate.py", "--nproc", "4", "--prompt-len", "37",
           "--new-tokens", "6", "--hidden", "64", "--layers", "2", "--heads", "4",
           "--kv-heads", "2", "--check"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for line in ("tokens identical:", "cache length:", "cache per rank:",
                 "prompt prefilled once:", "one token per decode step:"):
        assert any(l.startswith(line) and " yes " in l for l in proc.stdout.splitlines()), \
            (line, proc.stdout)


def _stats(cached, held, sharded, replicated):
    return [{"tokens": h, "cached": cached, "work": {"sharded_queries": s,
             "replicated_queries": q, "replicated_steps": n}}
            for h, s, (q, n) in zip(held, sharded, replicated)]


def test_checks_fail_on_a_refed_prompt(capsys):
    args = argparse.Namespace(prompt_len=37)
    out = torch.zeros(1, 45, dtype=torch.long)             # 8 generated
    good = _stats(44, [11] * 4, [9] * 4, [(8, 8)] * 4)
    assert all(ok for _, ok in example.checks(args, out, good, None))
    # the 5.24 bug: the first replicated step re-fed all 37 prompt tokens on every rank
    refed = _stats(80, [20] * 4, [9] * 4, [(44, 8)] * 4)
    failed = {name for name, ok in example.checks(args, out, refed, None) if not ok}
    assert failed == {"cache length", "cache per rank", "one token per decode step"}
    # tokens that differ from one process fail even when the cache is right
    ref = (out + 1, 0.0, 0.0, 0.0)
    failed = {name for name, ok in example.checks(args, out, good, ref) if not ok}
    assert failed == {"tokens identical"}
