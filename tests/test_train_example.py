"""The main job's packed mode runs end to end and its --check (one-process, per-document
training at the same weights) passes: examples/train.py exits non-zero when it does not."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("layout,ulysses", [("packed", 2)])
def test_packed_training_check(layout, ulysses):
    cmd = [sys.executable, "examples/train.py", "--nproc", "4", "--ulysses", str(ulysses),
           "--packed", "--docs", "mix", "--layout", layout, "--check", "--steps", "3",
           "--seq-len", "97", "--layers", "2", "--hidden", "64", "--heads", "4",
           "--kv-heads", "2", "--sample", "0", "--gloo"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "check: worst relative loss difference" in proc.stdout and ": OK" in proc.stdout
    assert "packed rows of 194 tokens" in proc.stdout
