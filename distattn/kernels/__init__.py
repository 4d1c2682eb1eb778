"""Block-attention backends and their registry (docs/DESIGN.md, "Backends").

``get_backend(name, q, k, v)`` returns a ``BlockAttention`` that can run these inputs:
``"reference"``, ``"torch"``, ``"cuda"`` (this project's kernels, when built), ``"emulate"``
(the same kernels compiled for the CPU CTA emulator, for tests; never chosen by auto) or
``"auto"``: cuda when built, applicable and verified, else torch when applicable, else reference.

``CUDA_KERNELS_VERIFIED``: the csrc kernels compile and their host logic is tested, but their
GPU tests (tests/test_cuda_kernels.py) have not run on hardware yet. Until they have, "auto"
does not pick them; ``backend="cuda"`` uses them on request.
"""
from __future__ import annotations

from .base import BlockAttention
from .mask import Mask, accumulation_dtype
from .reference import ReferenceBackend, reference_attention
from .torch_sdpa import TorchBackend

BACKENDS = ("auto", "cuda", "torch", "reference", "emulate")
CUDA_KERNELS_VERIFIED = False


def _cuda_backend():
    """The csrc backend, or None with the reason when the extension is not available."""
    try:
        from .cuda import CudaBackend, extension_error
    except ImportError as exc:  # the module itself is missing or broken
        return None, f"distattn.kernels.cuda failed to import: {exc}"
    err = extension_error()
    return (None, err) if err else (CudaBackend(), None)


def _features_ok(backend: BlockAttention, window: bool, softcap: bool) -> bool:
    return (backend.supports_bands or not window) and (backend.supports_softcap or not softcap)


def get_backend(name, q, k, v, window: bool = False, softcap: bool = False) -> BlockAttention:
    """The backend ``name`` for these inputs. ``window`` / ``softcap``: the call needs bands
    with a lower bound / soft-capping; a backend without them is refused by name (and skipped
    by "auto"). ``name`` may also be a ``BlockAttention`` the caller keeps (e.g.
    ``TorchBackend(pick="measure")``, whose measurements then last across calls): it is
    checked against these inputs and returned as it is."""
    if isinstance(name, BlockAttention):
        backend = name
        backend.check(q, k, v)
        name = backend.name
    else:
        backend = _get_backend(name, q, k, v, window, softcap)
    if not _features_ok(backend, window, softcap):
        what = " and ".join(w for w, on in (("sliding windows", window), ("softcap", softcap))
                            if on)
        raise ValueError(f"backend={name!r} does not run {what}; use backend='torch' or "
                         f"'reference' (or 'auto')")
    return backend


def check_backend(backend) -> None:
    """A backend argument is one of ``BACKENDS`` or a ``BlockAttention`` object."""
    if not isinstance(backend, BlockAttention) and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or a "
                         f"distattn.kernels.BlockAttention, got {backend!r}")


def backend_key(backend) -> str:
    """What ranks agree on for a backend argument: the name, or for an object its class,
    name and pick mode (its measurements may differ between ranks; its kind may not)."""
    if isinstance(backend, str):
        return backend
    pick = getattr(backend, "pick", None)
    return f"{type(backend).__qualname__}({backend.name}{'' if pick is None else ', ' + pick})"


def _get_backend(name: str, q, k, v, window: bool, softcap: bool) -> BlockAttention:
    check_backend(name)
    if name == "reference":
        return ReferenceBackend()
    if name == "torch":
        backend = TorchBackend()
        backend.check(q, k, v)
        return backend
    if name == "cuda":
        backend, why = _cuda_backend()
        if backend is None:
            raise RuntimeError(f"backend='cuda' is not available: {why}")
        backend.check(q, k, v)
        return backend
    if name == "emulate":  # never chosen by auto: slow, for tests without a GPU
        from .emulate import EmulateBackend
        backend = EmulateBackend()
        backend.check(q, k, v)
        return backend
    # auto
    if q.device.type == "cuda" and CUDA_KERNELS_VERIFIED:
        backend, _ = _cuda_backend()
        if (backend is not None and backend.applicable(q, k, v)
                and _features_ok(backend, window, softcap)):
            return backend
    torch_backend = TorchBackend()
    try:
        torch_backend.check(q, k, v)
        return torch_backend
    except (TypeError, ValueError):
        return ReferenceBackend()


__all__ = ["BACKENDS", "BlockAttention", "Mask", "ReferenceBackend", "TorchBackend",
           "accumulation_dtype", "backend_key", "check_backend", "get_backend",
           "reference_attention"]
