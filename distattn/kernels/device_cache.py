"""``device_cache``: an lru_cache for functions that build tensors on a device, bypassed
while tensors are traced.

Their key is the device, not the mode: a cached tensor built under a FakeTensorMode, a
functionalization or a proxy (make_fx) mode -- Dynamo and AOTAutograd tracing a call, or a
test tracing the CUDA path on fake tensors -- would reach a later eager call (or another
trace) as a tensor of the wrong kind. So while any dispatch mode is on the stack (the
infrastructure modes of a trace count) or Dynamo is compiling, the function runs uncached:
it neither reads nor fills the cache. An eager call before, between or after traces
(eager forward -> compile -> eager backward included) therefore only ever sees tensors
built eagerly. The check is one C call (about 0.1 us) on the host path of each ring step.
"""
from __future__ import annotations

import functools

import torch

_modes = torch._C._len_torch_dispatch_stack
_compiling = torch.compiler.is_compiling


def tracing() -> bool:
    """True while a dispatch mode is active (fake, functional, proxy or a user's) or Dynamo is
    compiling: tensors built now must not be cached."""
    return _modes() > 0 or _compiling()


def device_cache(maxsize: int):
    """``functools.lru_cache(maxsize)`` that runs the function uncached while ``tracing()``.
    The wrapper keeps ``cache_info`` / ``cache_clear`` and ``uncached`` (the function)."""
    def wrap(fn):
        cached = functools.lru_cache(maxsize=maxsize)(fn)

        @functools.wraps(fn)
        def call(*args):
            if _modes() > 0 or _compiling():
                return fn(*args)
            return cached(*args)

        call.cache_info, call.cache_clear, call.uncached = cached.cache_info, \
            cached.cache_clear, fn
        return call
    return wrap


def address_aligned(t: torch.Tensor, byte_align: int) -> bool:
    """Whether ``t``'s first element sits at a multiple of ``byte_align`` (<= 256) bytes.

    Eagerly this reads the address. A traced tensor (fake, functional) has none: there the
    answer is ``storage_offset * element_size % byte_align == 0``, which relies on the
    storage itself starting aligned -- true of every allocation PyTorch makes (the CUDA
    caching allocator rounds to 512 bytes and cudaMalloc to 256; the CPU allocator to 64,
    and CPU kernels here need at most 16). Memory from outside (``from_blob``, DLPack) may
    start anywhere: eagerly the address check catches it; a compiled graph fed such a tensor
    would skip the copy the eager call makes."""
    if _modes() > 0 or _compiling():      # tracing(), inlined: once per kernel input
        return t.storage_offset() * t.element_size() % byte_align == 0
    return t.data_ptr() % byte_align == 0
