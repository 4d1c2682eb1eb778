"""The supported transformers range is stated once and checked: pyproject.toml's floor is
``distattn.integrations.hf.OLDEST``, the installed version is inside it, and CI runs the
integration tests at that floor too (tests/transformers_floor.sh, called by .ci/run)."""
import os
import re

import pytest

transformers = pytest.importorskip("transformers")
from distattn.integrations import hf  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pyproject_states_the_floor():
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        text = f.read()
    spec = re.search(r'transformers = \["transformers([^"]*)"\]', text).group(1)
    assert spec == hf.SUPPORTED == f">={hf.OLDEST}"   # a floor; no known-broken upper bound


def test_installed_version_is_supported():
    hf.check_version()
    assert hf.version() >= tuple(int(p) for p in hf.OLDEST.split("."))


def test_ci_runs_the_floor():
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        assert "tests/transformers_floor.sh" in f.read()


def test_cache_kwarg_is_the_models_name():
    """5.24 renamed the cache argument of models and generate (past_key_values -> cache)."""
    import inspect

    from transformers import LlamaModel
    assert hf.cache_kwarg() in inspect.signature(LlamaModel.forward).parameters
