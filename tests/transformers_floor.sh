#!/usr/bin/env bash
# The transformers integration against the oldest transformers distattn supports (the floor
# stated in pyproject.toml and distattn/integrations/hf.py). The main pytest run covers the
# newest release pip resolves today; this covers the other end, so that a break shows as a
# version break. A venv that sees everything already installed (torch, distattn) gets the
# floor's newest patch release of transformers and the packages it pins, then runs every
# test file that uses transformers.
set -euo pipefail
cd "$(dirname "$0")/.."
floor=$(python3 -c "from distattn.integrations import hf; print(hf.OLDEST)")
venv=${DISTATTN_FLOOR_VENV:-${TMPDIR:-/tmp}/distattn-transformers-$floor}
python3 -m venv --system-site-packages "$venv"
PIP_ROOT_USER_ACTION=ignore "$venv/bin/python" -m pip install -q --disable-pip-version-check \
    "transformers==$floor.*"
newest=$(python3 -c "import transformers; print(transformers.__version__)")
oldest=$("$venv/bin/python" -c "import transformers; print(transformers.__version__)")
echo "transformers: newest resolved $newest (main run), floor $oldest (this run)"
# the test files that import transformers (or a test module that does), not every one naming
# it; not the examples' end-to-end runs (test_*_example.py): what they call of transformers,
# dtf.prepare / training and dtf.generate, the integration tests here run at the floor too
files=$(grep -lE 'import transformers|from transformers|importorskip\("transformers"\)|from test_transformers|integrations import .*transformers' \
    tests/test_*.py | grep -v '_example\.py$' | tr '\n' ' ')
"$venv/bin/python" -m pytest -q -p no:cacheprovider -W ignore::FutureWarning $files
