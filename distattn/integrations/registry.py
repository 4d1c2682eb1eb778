"""What distattn has put into transformers' attention registries, and how to take it out.

``dtf.register`` installs an attention function and a mask function under one key of
transformers' class-wide ``AttentionInterface`` / ``AttentionMaskInterface``: a new name
(``"distattn"``), or, with ``override=``, one of transformers' own keys (``"sdpa"``,
``"flash_attention_2"``, ...), whose original functions are kept here so that
``dtf.unregister`` puts them back. Registering a key again replaces distattn's functions
but keeps the originals of the first time, so one ``unregister`` always restores
transformers' own. Process-wide, like the registries themselves.
"""
from __future__ import annotations

from . import hf

# key -> (distattn's attention function, (transformers' attention, mask) it replaced, or None
# for a key distattn added)
_INSTALLED: dict = {}


def install(key: str, attention, mask, override: bool) -> None:
    """Put ``attention`` and ``mask`` under ``key``; with ``override`` the key is one of
    transformers' own (``hf.overridable_keys``) and its functions are kept for ``uninstall``."""
    attention_interface, mask_interface = hf.require()
    previous = _INSTALLED.get(key)
    originals = None
    if override:
        originals = previous[1] if previous is not None else (
            hf.registered(attention_interface, key), hf.registered(mask_interface, key))
    attention_interface.register(key, attention)
    mask_interface.register(key, mask)
    _INSTALLED[key] = (attention, originals)


def uninstall(key: str) -> None:
    """Undo ``install``: restore transformers' functions under an overridden key, remove a key
    distattn added. Raises ValueError for a key distattn did not register."""
    if key not in _INSTALLED:
        raise ValueError(f"{key!r} was not registered by dtf.register (registered: "
                         f"{sorted(_INSTALLED) or 'none'}); nothing to unregister")
    attention_interface, mask_interface = hf.require()
    _, originals = _INSTALLED.pop(key)
    for interface, original in zip((attention_interface, mask_interface),
                                   originals or (None, None)):
        if original is None:
            hf.unregister(interface, key)
        else:
            interface.register(key, original)


def attention(key: str):
    """distattn's attention function registered under ``key`` (it carries ``.mesh`` and
    ``.layout``), or None. None too when something else has replaced it since."""
    entry = _INSTALLED.get(key)
    if entry is None:
        return None
    attention_interface, _ = hf.require()
    return entry[0] if hf.registered(attention_interface, key) is entry[0] else None


def overridden(key: str) -> bool:
    """Whether ``key`` is one of transformers' own keys that distattn currently overrides."""
    entry = _INSTALLED.get(key)
    return entry is not None and entry[1] is not None
