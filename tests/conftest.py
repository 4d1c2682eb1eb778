import os
import sys

# Worker functions for spawned processes live in tests/; make them importable by name.
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402
import torch  # noqa: E402

# Tests use tiny tensors: intra-op threads only add contention with the spawned ranks (and
# with each other on a 2-core machine), so the pytest process runs single-threaded, as the
# ranks of tests/spawn.py do.
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def all_cores():
    """One intra-op thread per core while a module runs (for the CTA emulator's modules: it
    runs a grid's CTAs on torch's intra-op threads, and a test there is one process's C++
    work, nothing else competing), then back to one."""
    before = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    yield
    torch.set_num_threads(before)
