"""Hybrid transformers models under SP: their non-attention sequence mixers, run exactly.

Mamba / Mamba2 mixers, Gated DeltaNet, lightning attention and short convolutions see the
sequence outside distattn's attention. ``gather_mixers(model)`` (called by ``dtf.prepare``)
replaces the forward of every such module of a family in ``GATHERED_FAMILIES`` so that, while the model's
attention is a distattn one (``dtf.register``), the module runs its own code -- the model's
math and kernels -- in one of two exact forms, chosen per forward (the same choice on every
rank: it depends only on what every rank holds):

- **state passing** (``distattn.mixers.passing``; families in ``PASSING_FAMILIES``, with
  transformers >= ``PASSING_SINCE``, the ``contiguous`` layout, no padding slots): the module
  runs on this rank's tokens only, with a cache object (``PassingCache``) standing in for
  the model's generation cache. The model asks it for the conv halo and the initial
  recurrent state, and hands it the final state, the way it does when it continues a cached
  prompt; the cache fetches them from the previous rank and sends the next rank this rank's.
  Compute and activation memory shrink with P; the traffic is k - 1 tokens of conv input and
  one state per layer. A recurrent layer is a chain: rank i starts when rank i - 1 has
  finished it (P - 1 hops forward, and backward in reverse order).
- **gathered** (``distattn.mixers.gather``; every family, every layout): the module runs on
  the whole sequence gathered over the mesh and each rank keeps its tokens of the result:
  each rank pays the layer's full compute and activation memory, plus one all-gather of its
  input forward and one all-reduce of its gradient backward.

The mesh and layout come from the model's attention function at each forward (the one
``dtf.register`` made), so they can never disagree with the attention's. While the model
runs another attention (one process, ``sdpa``), the module runs as it is. A packed row of
several documents runs each document's piece on its own (the models' own torch paths do not
reset their state at document boundaries): a piece continues the previous rank's state only
where its document does, and sends its state on only where its document goes on. Refused, on
every rank alike: a KV/state cache (generation). The module's ``forward`` is replaced by an
instance attribute: the module tree and the state dict stay unchanged (no wrapper modules).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..mixers import gather_sequence, local_part
from ..mixers.gather import sequence_length
from ..mixers.passing import exchange_halo, receive_from_previous, send_to_next
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


# model_type -> how its mixers take part in state passing, for families tested exact that way
# (tests/test_transformers_hybrid.py, contiguous layout): "conv" (a short convolution only:
# the halo is exchanged by every rank at once) or "recurrent" (a conv halo and/or a recurrent
# state: a chain down the sequence). Jamba is absent: its scan ignores an initial state, so
# it runs gathered.
PASSING_FAMILIES = {
    "lfm2": "conv",
    "bamba": "recurrent",
    "granitemoehybrid": "recurrent",
    "nemotron_h": "recurrent",
    "falcon_h1": "recurrent",
    "qwen3_next": "recurrent",
    "minimax": "recurrent",
}
# The transformers version whose mixers were tested taking their halo and initial state from
# the cache interface (get_conv_state / update_conv_state / get_recurrent_state /
# update_recurrent_state, MiniMax's get/set_linear_cache); older ones run gathered.
PASSING_SINCE = (5, 24)


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
    """What the SP forwards of one model's mixers share: the document boundaries of the current forward,
    and the form each mixer ran in at its last forward (``mixer_forms``)."""

    def __init__(self):
        self.cu: Optional[tuple] = None
        self.forms: dict = {}


FORMS_ATTR = "_distattn_mixer_forms"


def mixer_forms(model) -> dict:
    """module name -> the form its last SP forward ran in: "gathered", "passing (conv)" or
    "passing (recurrent)" (empty before one)."""
    return dict(getattr(model, FORMS_ATTR, {}))


def _distattn_of(model):
    """(mesh, layout) of the model's distattn attention, or None for another attention."""
    name = getattr(model.config, "_attn_implementation", None)
    fn = hf.attention_function(name) if isinstance(name, str) else None
    if fn is None or not hasattr(fn, "mesh") or not hasattr(fn, "layout"):
        return None
    return fn.mesh, fn.layout


def _refuse(module_name: str, what: str):
    return NotImplementedError(
        f"distattn runs the sequence mixer {module_name!r} under sequence parallelism for "
        f"training only: {what}. Generate with this model without sequence parallelism")


def _model_hook(state: _Forward):
    def hook(_module, args, kwargs):
        state.cu = kwargs.get(hf.CU_SEQLENS_KEY)
        return None
    return hook


class PassingCache:
    """The cache a hybrid mixer sees under state passing: it answers the calls the model's
    mixers (transformers >= ``PASSING_SINCE``) make on their generation cache when they
    continue a prompt, with what the previous sequence rank sent.

    - ``get_conv_state`` / ``get_recurrent_state`` (``get_linear_cache``): the first such
      call receives [conv tail, final state] from the previous rank (None on the first
      rank: the model starts from zeros); ``"conv"`` mode receives nothing here.
    - ``update_conv_state(x [B, C, S], layer_idx, conv_kernel_size)``: [halo; x], the halo
      being the k - 1 conv inputs before this rank's tokens (zeros on the first rank) --
      the model convolves it and keeps the last S outputs.
    - ``update_recurrent_state`` (``set_linear_cache``): this rank's final state, which
      ``finish`` sends to the next rank with the conv tail.
    - ``is_recording_past``: True, so a mixer never takes its single-token decode branch.
    Any other call is refused (a transformers version this was not tested with)."""

    def __init__(self, mesh, module_name: str, mode: str, anchor: torch.Tensor,
                 receive: bool = True, send: bool = True, exchange: bool = True):
        self.mesh, self.module_name, self.mode, self.anchor = mesh, module_name, mode, anchor
        self.receive, self.send = receive, send     # False: the document starts / ends here
        self.exchange = exchange and mode == "conv"  # the halo exchanged by every rank at once
        self.received = None      # [halo, state] from the previous rank, once fetched
        self.tail = self.final = None
        self.chained = not self.exchange        # sends [tail, final] at finish
        self.calls = set()

    def _what(self):
        return f"state passing of {self.module_name!r}"

    def _receive(self):
        if self.received is None:
            self.received = (receive_from_previous(self.anchor, 2, self.mesh, self._what())
                             if self.receive else [None, None])
        return self.received

    def is_recording_past(self, layer_idx=None) -> bool:
        return True

    def get_conv_state(self, layer_idx, state_idx=0):
        self.calls.add("get_conv_state")
        return None if self.exchange else self._receive()[0]

    def get_recurrent_state(self, layer_idx, state_idx=0):
        self.calls.add("get_recurrent_state")
        return self._receive()[1]

    def get_linear_cache(self, layer_idx):
        return self.get_recurrent_state(layer_idx)

    def update_conv_state(self, x, layer_idx, conv_kernel_size=None, **_):
        self.calls.add("update_conv_state")
        width = (conv_kernel_size or 1) - 1
        if width <= 0:
            return x
        if self.exchange and x.shape[-1] >= width:
            halo = exchange_halo(x[..., -width:], self.mesh, f"halo of {self.module_name!r}")
        else:              # this rank's tokens do not cover the halo: chain it
            self.chained = True
            halo = self._receive()[0]
            if halo is None:
                halo = x.new_zeros(*x.shape[:-1], width)
        full = torch.cat([halo.to(x.dtype), x], dim=-1)
        if self.chained:
            self.tail = full[..., -width:]
        return full

    def update_recurrent_state(self, state, layer_idx=None, **_):
        self.calls.add("update_recurrent_state")
        self.final = state
        return state

    def set_linear_cache(self, layer_idx, state):
        self.update_recurrent_state(state, layer_idx)

    def finish(self, out: torch.Tensor) -> torch.Tensor:
        """After the module's forward: check the model made the calls state passing relies
        on (the same outcome on every rank), then send [tail, final] on, through ``out``."""
        needed = {"update_conv_state"} if self.mode == "conv" else {"update_recurrent_state"}
        if not needed <= self.calls:
            raise NotImplementedError(
                f"distattn's state passing for {self.module_name!r} expected the model to "
                f"call cache.{sorted(needed - self.calls)[0]}, and it did not: this "
                f"transformers version's mixer is not the one distattn was tested with. "
                f"Use the tested transformers, or the 'zigzag' layout (the mixer then runs "
                f"gathered)")
        if not (self.chained and self.send):
            return out
        return send_to_next(out, [self.tail, self.final], self.mesh, self._what())

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise NotImplementedError(
            f"distattn's state passing for {self.module_name!r}: the model called "
            f"cache.{name}, which this transformers version's mixer was not tested with. Use "
            f"the tested transformers, or the 'zigzag' layout (the mixer then runs gathered)")


def _segments(start: int, stop: int, cu: Optional[tuple]) -> list:
    """[(g0, g1)]: the pieces of documents in global tokens [start, stop), in order."""
    cuts = sorted({start, stop} | {c for c in (cu or ()) if start < c < stop})
    return list(zip(cuts[:-1], cuts[1:]))


def passing_mode(model_type, mesh, layout: str, local_len: int, cu) -> Optional[str]:
    """The state-passing mode of ``model_type``'s mixers for this forward, or None for the
    gathered form: passing needs a family of ``PASSING_FAMILIES``, transformers >=
    ``PASSING_SINCE``, the ``contiguous`` layout without padding slots, and, for a recurrent
    mixer, 2 tokens or more wherever a document continues onto a rank (the models'
    one-token branches update a cache in place). Depends only on what every rank holds."""
    mode = PASSING_FAMILIES.get(model_type)
    if (mode is None or hf.version() < PASSING_SINCE or layout != "contiguous"
            or sequence_length(local_len, mesh, cu) != local_len * mesh.size):
        return None
    if mode == "recurrent":
        bounds = set(cu or ())
        for b in range(local_len, local_len * mesh.size, local_len):
            first = _segments(b, b + local_len, cu)[0]
            if b not in bounds and first[1] - first[0] < 2:
                return None
    return mode


def _anchor(module, hidden: torch.Tensor) -> torch.Tensor:
    """A tensor that requires grad exactly when the module's output does (see
    ``receive_from_previous``): the input, else a trainable parameter."""
    if hidden.requires_grad:
        return hidden
    return next((p for p in module.parameters() if p.requires_grad), hidden)


def _per_token(value, length: int, fn):
    """``fn`` applied to ``value`` if it is a tensor along the tokens (dim 1 of length
    ``length``), and to such tensors inside a tuple or list; anything else as it is."""
    if isinstance(value, (tuple, list)):
        return type(value)(_per_token(v, length, fn) for v in value)
    if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] == length:
        return fn(value)
    return value


def _run_pieces(original, hidden, args, kwargs, pieces, caches):
    """``original`` (the module's own forward) on each piece of ``hidden``'s tokens with its
    cache; the outputs concatenated along the tokens (other outputs: the last piece's)."""
    outs, rest = [], ()
    length = hidden.shape[1]
    for piece, cache in zip(pieces, caches):
        kw = {k: _per_token(v, length, lambda t: t[:, piece]) for k, v in kwargs.items()}
        if cache is not None:       # (transformers 4.x mixers take no `cache` argument)
            kw["cache"] = cache
        out = original(hidden[:, piece], *args, **kw)
        if isinstance(out, tuple):
            out, rest = out[0], tuple(out[1:])
        outs.append(cache.finish(out) if cache is not None else out)
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    return (out,) + rest if rest else out


def _sp_forward(model, model_type, module_name: str, module, state: _Forward):
    """The forward that replaces ``module``'s while the model's attention is distattn's."""
    original = type(module).forward.__get__(module)

    def forward(*args, **kwargs):
        where = _distattn_of(model)
        if where is None:
            return original(*args, **kwargs)
        mesh, layout = where
        for key in ("cache", "past_key_values", "cache_params"):
            if kwargs.get(key) is not None:
                raise _refuse(module_name, "a cache was passed (generation is not supported "
                                           "through SP mixers)")
        kwargs = {k: v for k, v in kwargs.items()
                  if k not in (hf.CU_SEQLENS_KEY, "cache", "cache_params")}
        # padding is refused by the registered mask function (every rank, before the first
        # layer): the mask here masks nothing
        if "attention_mask" in kwargs:
            kwargs["attention_mask"] = None
        hidden = kwargs.pop("hidden_states") if "hidden_states" in kwargs else args[0]
        args = args[1:] if args and args[0] is hidden else args
        length = hidden.shape[1]
        mode = passing_mode(model_type, mesh, layout, length, state.cu)
        # several documents: each piece of one runs on its own, its state reset at its start
        cu = state.cu if state.cu is not None and len(state.cu) > 2 else None
        if mode is not None:
            state.forms[module_name] = f"passing ({mode})"
            index = mesh.ring_rank * mesh.ulysses_degree + mesh.ulysses_rank
            start = index * length
            pieces = _segments(start, start + length, cu)
            bounds = set(cu or ()) | {0, length * mesh.size}
            caches = []
            for i, (g0, g1) in enumerate(pieces):
                receive = i == 0 and g0 not in bounds
                send = i == len(pieces) - 1 and g1 not in bounds
                if receive or send or cu is None:
                    caches.append(PassingCache(mesh, module_name, mode,
                                               _anchor(module, hidden), receive=receive,
                                               send=send, exchange=cu is None))
                else:
                    caches.append(None)         # a whole document: the model's own path
            return _run_pieces(original, hidden, args, kwargs,
                               [slice(g0 - start, g1 - start) for g0, g1 in pieces], caches)
        state.forms[module_name] = "gathered"
        full = gather_sequence(hidden, mesh, layout, state.cu)
        gather = lambda t: gather_sequence(t, mesh, layout, state.cu)
        kwargs = {k: _per_token(v, length, gather) for k, v in kwargs.items()}
        if isinstance(kwargs.get("cache_position"), torch.Tensor):
            kwargs["cache_position"] = torch.arange(full.shape[1],
                                                    device=kwargs["cache_position"].device)
        pieces = [slice(g0, g1) for g0, g1 in _segments(0, full.shape[1], cu)]
        out = _run_pieces(original, full, args, kwargs, pieces, [None] * len(pieces))
        if isinstance(out, tuple):
            return (local_part(out[0], mesh, layout, state.cu),) + tuple(out[1:])
        return local_part(out, mesh, layout, state.cu)

    return forward


def gather_mixers(model) -> list:
    """Hook every sequence mixer of ``model`` (a family in ``GATHERED_FAMILIES``) to run
    exactly -- state passing where ``passing_mode`` allows, else gathered -- whenever the
    model's attention is distattn's; once per model. Returns the names of the hooked
    modules."""
    done = getattr(model, MIXERS_ATTR, None)
    if done is not None:
        return done
    state = _Forward()
    base = getattr(model, "base_model", model)
    for target in {id(model): model, id(base): base}.values():
        target.register_forward_pre_hook(_model_hook(state), with_kwargs=True)
    names = []
    config = getattr(model.config, "text_config", None) or model.config
    for name, module in mixer_modules(model):
        # an instance attribute: the module tree and the state dict stay as they are
        module.forward = _sp_forward(model, getattr(config, "model_type", None), name,
                                     module, state)
        names.append(name)
    setattr(model, MIXERS_ATTR, names)
    setattr(model, FORMS_ATTR, state.forms)
    return names
