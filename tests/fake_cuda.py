"""Fake CUDA tensors on a CPU-only PyTorch, for tests that trace the CUDA host path.

``FakeTensorMode`` runs every ATen op's meta kernel on tensors that claim ``device="cuda"``.
A few *Python bindings* of a CPU-only PyTorch open a CUDA device guard before dispatching and
abort with "PyTorch is not linked with support for cuda devices": ``Tensor.__getitem__`` /
``__setitem__``, ``__invert__``, ``Tensor.copy_`` and ``Tensor.contiguous``. ``fake_cuda()`` routes those
to the same ATen ops without the guard (a ``TorchFunctionMode``); nothing else changes.

Autograd cannot run on such tensors here: creating a leaf's gradient accumulator asks the
CUDA device guard for a stream and terminates the process (not an exception), so tests call
the backward functions directly instead of ``.backward()``.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode

aten = torch.ops.aten


def _getitem(t: torch.Tensor, idx):
    """Basic indexing (ints, slices, None, Ellipsis) through view ops."""
    if not isinstance(idx, tuple):
        idx = (idx,)
    if any(isinstance(i, (torch.Tensor, list)) for i in idx):
        raise NotImplementedError(f"fake_cuda: advanced indexing {idx!r}")
    real = sum(1 for i in idx if i is not None and i is not Ellipsis)
    out, dim = t, 0
    for i in idx:
        if i is Ellipsis:
            dim += t.dim() - real
        elif i is None:
            out = out.unsqueeze(dim)
            dim += 1
        elif isinstance(i, int):
            out = out.select(dim, i)
        else:
            start, stop, step = i.indices(out.shape[dim])
            out = aten.slice.Tensor(out, dim, start, max(start, stop), step)
            dim += 1
    return out


class _NoDeviceGuard(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.__getitem__:
            return _getitem(*args)
        if func is torch.Tensor.__setitem__:
            t, idx, value = args
            dst = _getitem(t, idx)
            if isinstance(value, torch.Tensor):
                aten.copy_.default(dst, value)
            else:
                aten.fill_.Scalar(dst, value)
            return None
        if func is torch.Tensor.__invert__:
            return aten.bitwise_not.default(args[0])
        if func is torch.Tensor.copy_:
            return aten.copy_.default(args[0], args[1])
        if func is torch.Tensor.contiguous:
            t = args[0]
            return t if t.is_contiguous() else aten.clone.default(
                t, memory_format=torch.contiguous_format)
        return func(*args, **kwargs)


@contextlib.contextmanager
def fake_cuda():
    """A FakeTensorMode in which ``device="cuda"`` tensors work on a CPU-only PyTorch."""
    # (the device-keyed tensor caches are bypassed while a mode is active:
    # distattn/kernels/device_cache.py)
    with FakeTensorMode(), _NoDeviceGuard():
        yield


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    """A one-rank SP mesh over a one-process gloo group (the trace tests' fixture: import it
    as ``from fake_cuda import mesh``)."""
    import torch.distributed as dist

    import distattn
    if not dist.is_initialized():
        store = dist.FileStore(str(tmp_path_factory.mktemp("pg") / "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield distattn.SPMesh.build(ulysses_degree=1, ring_degree=1)
