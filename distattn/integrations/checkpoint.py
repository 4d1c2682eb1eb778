"""Rematerialization-aware activation checkpointing (the idea of DistFlashAttn, arXiv 2310.03294).

Plain activation checkpointing of a transformer layer runs the layer's forward twice: once in
the forward pass (keeping only the layer input) and once more in backward to rebuild the
activations. With sequence-parallel attention the second run repeats the whole distributed
attention forward, communication included, although backward only needs its *result*.

Here the layer is checkpointed with ``torch.utils.checkpoint`` (non-reentrant), and attention
inside it goes through ``remat_attention``:

- in the forward pass the distributed attention runs once, without autograd, and its output
  and log-sum-exp are kept (one ``out`` [B, S_local, H, D] and one ``lse`` [B, H, S_local]
  float32 per attention call: the only memory beyond plain per-layer checkpointing);
- in the recomputation during backward, the layer's cheap local parts (norms, projections,
  RoPE, MLP) run again, but attention returns the kept output instead of running again;
- both passes wrap the result in ``_SavedAttention``, an autograd Function whose backward is
  the distributed attention *backward* given (q, k, v, out, lse). So dq, dk and dv flow as
  usual, and the attention forward and its communication run once per step, not twice.

The state lives on the model (a ``RematSlot`` attached to every submodule of a checkpointed
layer), never in module-level globals, so several models and meshes can coexist.
"""
from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import distattn
import distattn.attention

SLOT_ATTR = "_distattn_remat"


class _SavedAttention(torch.autograd.Function):
    """(q, k, v, sinks, out, lse) -> out, with the distributed attention backward as its
    backward.

    ``out`` and ``lse`` are a finished ``dist_flash_attn`` result for these q, k, v (and
    sinks, or None): the forward only hands ``out`` on; the backward computes dq, dk, dv (and
    dsinks) from them."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, out, lse, params):
        ctx.save_for_backward(q, k, v, sinks, out, lse)
        ctx.params = params
        return out.view_as(out)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, sinks, out, lse = ctx.saved_tensors
        grads = distattn.attention.dist_flash_attn_backward(dout, q, k, v, out, lse,
                                                            sinks=sinks, **ctx.params)
        dsinks = grads[3] if sinks is not None else None
        return grads[0], grads[1], grads[2], dsinks, None, None, None


class _Record:
    """The attention results of one checkpointed call of one layer, in call order."""

    def __init__(self):
        self.saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.recorded = False   # True once the first (forward-pass) run has finished
        self.cursor = 0         # next entry to hand out while recomputing


class RematSlot:
    """Per-layer handle: which ``_Record`` is active while the layer runs (None outside)."""

    def __init__(self):
        self.active: _Record | None = None


def checkpoint_with_remat(function, *args, slot: RematSlot, **checkpoint_kwargs):
    """``torch.utils.checkpoint.checkpoint(function, *args)`` (non-reentrant), with the
    attention calls inside ``function`` made through ``remat_attention`` recorded in the
    forward pass and replayed in the recomputation."""
    record = _Record()

    def run(*inner):
        record.cursor = 0
        previous, slot.active = slot.active, record
        try:
            return function(*inner)
        finally:
            slot.active = previous
            record.recorded = True

    checkpoint_kwargs.setdefault("use_reentrant", False)
    if checkpoint_kwargs["use_reentrant"]:
        raise ValueError("rematerialization-aware checkpointing needs use_reentrant=False")
    return checkpoint(run, *args, **checkpoint_kwargs)


def remat_attention(module: nn.Module | None, q, k, v, **params):
    """``distattn.dist_flash_attn(q, k, v, **params)`` for attention inside a layer that
    ``checkpoint_module`` / ``checkpoint_layers`` wrapped.

    ``module`` is any submodule of the checkpointed layer (usually the attention module); if
    it is None or not inside such a layer, or the layer is not being checkpointed right now,
    this is exactly ``dist_flash_attn``. ``params`` must not contain ``return_lse``.
    """
    slot = getattr(module, SLOT_ATTR, None) if module is not None else None
    record = slot.active if slot is not None else None
    if record is None:
        return distattn.dist_flash_attn(q, k, v, **params)
    if record.recorded:  # recomputation in backward: hand back what the forward pass made
        if record.cursor >= len(record.saved):
            raise RuntimeError(
                "the recomputation of a checkpointed layer called attention more often than "
                "its forward pass did; the layer's forward must be deterministic")
        out, lse = record.saved[record.cursor]
        record.cursor += 1
        if out.shape != q.shape[:3] + (v.shape[-1],):
            raise RuntimeError(
                f"recomputed attention input {tuple(q.shape)} does not match the saved "
                f"output {tuple(out.shape)}; the layer's forward must be deterministic")
    else:
        with torch.no_grad():
            out, lse = distattn.dist_flash_attn(q, k, v, return_lse=True, **params)
        record.saved.append((out, lse))
    sinks = params.pop("sinks", None)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (q, k, v, sinks)):
        return _SavedAttention.apply(q, k, v, sinks, out, lse, params)
    return out


def install_slot(layer: nn.Module) -> RematSlot:
    """Attach a fresh ``RematSlot`` to ``layer`` and all of its submodules and return it."""
    slot = RematSlot()
    for m in layer.modules():
        setattr(m, SLOT_ATTR, slot)
    return slot


def checkpoint_module(layer: nn.Module) -> nn.Module:
    """Make ``layer`` (any ``nn.Module`` whose attention calls ``remat_attention(self_or_
    submodule, ...)``) checkpoint itself with rematerialization-aware recomputation whenever
    it runs in training mode with gradients enabled. Tensor inputs that need gradients must
    be positional. Returns ``layer``. Calling it twice is harmless."""
    if getattr(layer, "_distattn_checkpointed", False):
        return layer
    slot = install_slot(layer)
    plain_forward = layer.forward

    @functools.wraps(plain_forward)
    def forward(*args, **kwargs):
        if not (layer.training and torch.is_grad_enabled()):
            return plain_forward(*args, **kwargs)
        return checkpoint_with_remat(functools.partial(plain_forward, **kwargs), *args,
                                     slot=slot)

    layer.forward = forward
    layer._distattn_checkpointed = True
    return layer
