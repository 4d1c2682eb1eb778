"""Drop-in modules for clients written against other sequence-parallel attention libraries
(docs/COMPAT.md): ``distattn.compat.ring_flash_attn`` (ring-flash-attention 0.1.x's API) and
``distattn.compat.yunchang`` (yunchang's USP API).
Each is a thin adapter over ``distattn.dist_flash_attn``.

Nothing here touches ``sys.modules`` on import. ``alias(name)`` does, on request only, so that
client code that says ``import ring_flash_attn`` (or ``from ring_flash_attn.adapters.hf_adapter
import ...``) gets distattn's module unchanged.
"""
from __future__ import annotations

import importlib
import sys

# alias name -> the compat package that provides it
PROVIDED = {"ring_flash_attn": "distattn.compat.ring_flash_attn",
            "yunchang": "distattn.compat.yunchang"}


def alias(name: str):
    """Install distattn's drop-in for module ``name`` (and its submodules, e.g.
    ``ring_flash_attn.adapters.hf_adapter``) in ``sys.modules`` and return it. Idempotent.
    Raises if the real package is already imported (both cannot be one module name), or if
    ``name`` is not provided."""
    if name not in PROVIDED:
        raise ValueError(f"distattn.compat.alias: {name!r} is not provided; choose one of "
                         f"{sorted(PROVIDED)}")
    target = importlib.import_module(PROVIDED[name])
    existing = sys.modules.get(name)
    if existing is not None and existing is not target:
        raise RuntimeError(
            f"distattn.compat.alias({name!r}): the real {name!r} package "
            f"({getattr(existing, '__file__', existing)!r}) is already imported; call alias "
            f"before anything imports {name}, or use one of the two, not both")
    subs = {f"{name}.{sub}": importlib.import_module(f"{PROVIDED[name]}.{sub}")
            for sub in target.SUBMODULES}
    for key, mod in subs.items():
        present = sys.modules.get(key)
        if present is not None and present is not mod:
            raise RuntimeError(f"distattn.compat.alias({name!r}): {key!r} is already imported "
                               f"from elsewhere ({getattr(present, '__file__', present)!r})")
    sys.modules[name] = target
    sys.modules.update(subs)
    return target
