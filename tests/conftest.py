import os
import sys

# Worker functions for spawned processes live in tests/; make them importable by name.
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

# Tests use tiny tensors: intra-op threads only add contention with the spawned ranks (and
# with each other on a 2-core machine), so the pytest process runs single-threaded, as the
# ranks of tests/spawn.py do.
torch.set_num_threads(1)
