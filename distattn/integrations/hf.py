"""What distattn needs to know about the installed transformers, in one place.

transformers changes its internals from release to release; the two integration modules
(``transformers.py`` for training, ``generation.py`` for ``dtf.generate``) read them only
through this module, so a version break is fixed here once. The supported range is
``SUPPORTED`` (also stated in ``pyproject.toml``, and tested at both ends:
``tests/test_transformers_versions.py``).

Nothing here imports transformers at import time.
"""
from __future__ import annotations

import functools

# The oldest transformers the integration is tested with (pyproject.toml says the same).
OLDEST = "4.57"
SUPPORTED = f">={OLDEST}"

# Attention kwargs some models pass that change the attention computation itself and that
# distattn does not run: name -> what it is.
UNSUPPORTED_ATTENTION_KWARGS = {
    "position_bias": "additive position bias",
    "cache": "paged KV caches",
}


def require():
    """Import transformers' attention and mask registries, or raise an ImportError that says
    how to install the extra (and which versions work)."""
    try:
        import transformers  # noqa: F401
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(f"distattn.integrations.transformers needs transformers{SUPPORTED}: "
                          f"pip install 'distattn[transformers]'") from exc
    check_version()
    return AttentionInterface, AttentionMaskInterface


@functools.cache
def version() -> tuple[int, int]:
    """(major, minor) of the installed transformers."""
    import transformers

    major, minor = transformers.__version__.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def check_version() -> None:
    oldest = tuple(int(p) for p in OLDEST.split("."))
    if version() < oldest:
        import transformers

        raise ImportError(f"distattn's transformers integration needs transformers{SUPPORTED}, "
                          f"found {transformers.__version__}: pip install -U 'transformers"
                          f"{SUPPORTED}'")


def cache_kwarg() -> str:
    """The name under which models and ``generate`` take a KV cache: ``cache`` from
    transformers 5.24 on (``past_key_values`` is then a deprecated alias), before that
    ``past_key_values``."""
    return "cache" if version() >= (5, 24) else "past_key_values"


def output_cache(output):
    """The cache of a model or ``generate`` output object (``.cache`` from 5.24 on,
    ``.past_key_values`` before)."""
    return getattr(output, cache_kwarg())


def attention_variant(module, kwargs) -> dict:
    """window / softcap / sinks of one attention call, in distattn's terms.

    transformers' ``sliding_window=W`` lets query i see key j when ``|i - j| < W`` on the
    allowed side: ``window=(W - 1, W - 1)``; with causal attention the right side is cut to
    0, and bidirectional sliding layers (Gemma 3) keep both sides."""
    width = kwargs["sliding_window"] if "sliding_window" in kwargs else \
        getattr(module, "sliding_window", None)
    sinks = kwargs.get("s_aux", kwargs.get("sinks"))
    return {"window": None if width is None else (int(width) - 1, int(width) - 1),
            "softcap": kwargs.get("softcap"), "sinks": sinks}


def plain_checkpointing(model) -> None:
    """Turn on transformers' own activation checkpointing (``activation_checkpointing_enable``
    from transformers 5, ``gradient_checkpointing_enable`` before)."""
    enable = getattr(model, "activation_checkpointing_enable", None) or \
        model.gradient_checkpointing_enable
    enable()
