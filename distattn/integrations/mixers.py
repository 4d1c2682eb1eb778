"""Hybrid transformers models under SP: their non-attention sequence mixers, run gathered.

Mamba / Mamba2 mixers, Gated DeltaNet, lightning attention and short convolutions see the
sequence outside distattn's attention. ``gather_mixers(model)`` (called by ``dtf.prepare``)
hooks every such module of a family in ``GATHERED_FAMILIES`` so that, while the model's
attention is a distattn one (``dtf.register``), the module runs *unchanged* -- the model's own
code -- on the whole sequence gathered over the mesh (``distattn.mixers.gather``), and each
rank keeps its tokens of the result. Exact, forward and backward, on every layout; the cost:
each rank runs these layers over the full sequence (their compute and activation memory do
not shrink with the SP size), plus one all-gather of the layer's input (forward) and one
all-reduce of its gradient (backward). While the model runs another attention (one process,
``sdpa``), the hooks do nothing.

The mesh and layout come from the model's attention function at each forward (the one
``dtf.register`` made), so they can never disagree with the attention's. Refused, on every
rank alike (each decision depends only on what every rank holds): a KV/state cache
(generation), and a packed row of several documents (the models' own torch paths do not
reset their state at document boundaries).

The hooks keep the module tree and the state dict unchanged (no wrapper modules).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..mixers import gather_sequence, local_part
from . import hf

MIXERS_ATTR = "_distattn_gathered_mixers"   # on the model: the hooked module names

# model_type -> (what its sequence mixers are, the decoder layer's attribute holding one, a
# fragment of the mixer's class name), for families tested exact with gathered mixers
# (tests/test_transformers_hybrid.py: one SP training step on ring 4 and USP 2 x 2 equals one
# process). Extend only with proof.
GATHERED_FAMILIES = {
    "lfm2": ("short causal convolutions", "conv", "ShortConv"),
    "bamba": ("Mamba2 mixers", "mamba", "Mixer"),
    "granitemoehybrid": ("Mamba2 mixers", "mamba", "Mamba"),
    "nemotron_h": ("Mamba2 mixers", "mixer", "Mamba2Mixer"),
    "falcon_h1": ("Mamba2 mixers beside attention", "mamba", "Mixer"),
    "jamba": ("Mamba mixers", "mamba", "MambaMixer"),
    "qwen3_next": ("Gated DeltaNet linear attention", "linear_attn", "GatedDeltaNet"),
    "minimax": ("lightning (linear) attention", "self_attn", "LightningAttention"),
}


# Gathered families whose transformers 4.x code builds its own 4-D causal mask for the
# attention layers (not through the mask interface), which distattn refuses: they need 5.x.
NEEDS_TRANSFORMERS_5 = frozenset({"bamba", "falcon_h1", "granitemoehybrid", "jamba"})


def version_error(model_type) -> Optional[str]:
    """Why the installed transformers cannot train ``model_type``'s gathered mixers, or None."""
    if model_type in NEEDS_TRANSFORMERS_5 and hf.version() < (5, 0):
        return (f"distattn trains {model_type!r} under sequence parallelism with transformers "
                f"5 or newer only: transformers {'.'.join(map(str, hf.version()))} builds its "
                f"own 4-D causal mask for this family's attention layers, which distattn does "
                f"not take. Upgrade transformers, or train without sequence parallelism")
    return None


def mixer_modules(model) -> list:
    """(name, module) of every sequence mixer of ``model``, by its family's entry in
    ``GATHERED_FAMILIES`` (empty for another family)."""
    config = getattr(model.config, "text_config", None) or model.config
    entry = GATHERED_FAMILIES.get(getattr(config, "model_type", None))
    if entry is None:
        return []
    _, attribute, fragment = entry
    return [(name, module) for name, module in model.named_modules()
            if name.rsplit(".", 1)[-1] == attribute and fragment in type(module).__name__]


class _Forward:
    """What the hooks of one model share: the document boundaries of the current forward."""

    def __init__(self):
        self.cu: Optional[tuple] = None


def _distattn_of(model):
    """(mesh, layout) of the model's distattn attention, or None for another attention."""
    name = getattr(model.config, "_attn_implementation", None)
    fn = hf.attention_function(name) if isinstance(name, str) else None
    if fn is None or not hasattr(fn, "mesh") or not hasattr(fn, "layout"):
        return None
    return fn.mesh, fn.layout


def _refuse(module_name: str, what: str):
    return NotImplementedError(
        f"distattn runs the sequence mixer {module_name!r} gathered over the SP group for "
        f"training only: {what}. Train with one document per row, or run this model without "
        f"sequence parallelism for it")


def _model_hook(state: _Forward):
    def hook(_module, args, kwargs):
        state.cu = kwargs.get(hf.CU_SEQLENS_KEY)
        return None
    return hook


def _hooks(model, module_name: str, state: _Forward):
    """The (pre, post) forward hooks of one mixer."""
    seen = {}

    def pre(_module, args, kwargs):
        where = _distattn_of(model)
        seen.clear()
        if where is None:
            return None
        mesh, layout = where
        for key in ("cache", "past_key_values", "cache_params"):
            if kwargs.get(key) is not None:
                raise _refuse(module_name, "a cache was passed (generation is not supported "
                                           "through gathered mixers)")
        cu = state.cu
        if cu is not None and len(cu) > 2:
            raise _refuse(module_name, f"the row packs {len(cu) - 1} documents")
        kwargs = dict(kwargs)
        kwargs.pop(hf.CU_SEQLENS_KEY, None)
        # padding is refused by the registered mask function (every rank, before the first
        # layer): the mask here masks nothing
        if "attention_mask" in kwargs:
            kwargs["attention_mask"] = None
        args = list(args)
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        full = gather_sequence(hidden, mesh, layout, cu)
        if "hidden_states" in kwargs:
            kwargs["hidden_states"] = full
        else:
            args[0] = full
        gathered = lambda t: gather_sequence(t, mesh, layout, cu) if isinstance(
            t, torch.Tensor) and t.dim() >= 2 and t.shape[1] == hidden.shape[1] else t
        for key in ("position_ids", "position_embeddings"):
            value = kwargs.get(key)
            if isinstance(value, (tuple, list)):
                kwargs[key] = type(value)(gathered(t) for t in value)
            elif value is not None:
                kwargs[key] = gathered(value)
        if isinstance(kwargs.get("cache_position"), torch.Tensor):
            kwargs["cache_position"] = torch.arange(full.shape[1],
                                                    device=kwargs["cache_position"].device)
        seen["where"] = (mesh, layout, cu)
        return tuple(args), kwargs

    def post(_module, _args, _kwargs, output):
        if "where" not in seen:
            return None
        mesh, layout, cu = seen.pop("where")
        if isinstance(output, tuple):
            return (local_part(output[0], mesh, layout, cu),) + tuple(output[1:])
        return local_part(output, mesh, layout, cu)

    return pre, post


def gather_mixers(model) -> list:
    """Hook every sequence mixer of ``model`` (a family in ``GATHERED_FAMILIES``) to run
    gathered whenever the model's attention is distattn's; once per model. Returns the names
    of the hooked modules."""
    done = getattr(model, MIXERS_ATTR, None)
    if done is not None:
        return done
    state = _Forward()
    base = getattr(model, "base_model", model)
    for target in {id(model): model, id(base): base}.values():
        target.register_forward_pre_hook(_model_hook(state), with_kwargs=True)
    names = []
    for name, module in mixer_modules(model):
        pre, post = _hooks(model, name, state)
        module.register_forward_pre_hook(pre, with_kwargs=True)
        module.register_forward_hook(post, with_kwargs=True)
        names.append(name)
    setattr(model, MIXERS_ATTR, names)
    return names
