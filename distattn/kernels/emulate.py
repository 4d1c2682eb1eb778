"""``emulate`` backend: this project's CUDA kernels (csrc/) compiled for the host CPU.

``distattn._emulate`` is csrc/kernels built with ``DISTATTN_EMULATE``: the same kernel text as
the ``cuda`` backend, over host models of the instructions it uses (mma.sync m16n8k16,
ldmatrix, cp.async, warp shuffles, barriers) and a CTA emulator that runs every CUDA thread as
a fiber and checks shared memory for races (csrc/emulate/, docs/KERNELS.md). It exists to test
the kernels where there is no GPU: it takes CPU tensors (float16/bfloat16) and is slow, so
``backend="auto"`` never picks it; ask for it with ``backend="emulate"``.

Everything else (contract, fused ring step, accumulators, strided views) is the ``cuda``
backend's: ``EmulateBackend`` is ``CudaBackend`` on the other extension module and device.
A kernel that breaks a rule the emulator checks (a shared-memory race, an uninitialised read,
a divergent warp-collective) raises RuntimeError naming the kernel, block and threads.
"""
from __future__ import annotations

import os

from .cuda import CudaBackend

# Which kernels the emulator runs, read once at import: "sm80" (default: the mma.sync kernels)
# or "sm90" (the Hopper kernels for D = Dv = 64 and 128: the forward, fwd_sm90_kernel.cuh, and
# the backward's dQ and dK/dV kernels, bwd_sm90_kernel.cuh; other head dims and delta keep the
# mma.sync kernels). EmulateBackend(arch=...) overrides it per backend object.
ARCHS = {"sm80": 80, "sm90": 90}
DEFAULT_ARCH = os.environ.get("DISTATTN_EMULATE_ARCH", "sm80") or "sm80"
if DEFAULT_ARCH not in ARCHS:  # pragma: no cover - a configuration error
    raise ValueError(f"DISTATTN_EMULATE_ARCH={DEFAULT_ARCH!r}: expected one of {sorted(ARCHS)}")

_IMPORT_ERROR: str | None = None
try:  # built by setup.py on any torch (a host C++ extension, no CUDA needed)
    from .. import _emulate  # type: ignore[attr-defined]
except ImportError as exc:  # pragma: no cover - depends on the build
    _emulate = None
    _IMPORT_ERROR = str(exc)


def extension_error() -> str | None:
    """None when ``distattn._emulate`` is importable, else one line saying why not."""
    if _emulate is None:
        return (f"the distattn._emulate extension is not built ({_IMPORT_ERROR}); build it with "
                f"`pip install --no-build-isolation -e .` (or `python setup.py build_ext "
                f"--inplace`), which needs a C++ compiler but no CUDA")
    return None


class EmulateBackend(CudaBackend):
    name = "emulate"
    device_type = "cpu"

    def __init__(self, arch: str | None = None):
        super().__init__()
        arch = DEFAULT_ARCH if arch is None else arch
        if arch not in ARCHS:
            raise ValueError(f"EmulateBackend(arch={arch!r}): expected one of {sorted(ARCHS)}")
        self.arch = arch

    @property
    def _ext(self):
        self._select_arch()
        return _emulate

    def _select_arch(self) -> None:
        # The extension's switch is per process (launches go through kernels/ops.py, which
        # calls the module directly): set it before every forward launch, so that backends of
        # both archs can live side by side in one process.
        if _emulate is not None and hasattr(_emulate, "set_arch"):
            _emulate.set_arch(ARCHS[self.arch])

    def forward(self, *args, **kwargs):
        self._select_arch()
        return super().forward(*args, **kwargs)

    def forward_into(self, *args, **kwargs):
        self._select_arch()
        return super().forward_into(*args, **kwargs)

    def unavailable(self) -> str | None:
        return extension_error()

    def head_dims(self) -> tuple[int, ...]:
        return tuple(_emulate.head_dims()) if _emulate is not None else ()
