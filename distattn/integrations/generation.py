"""Generation over a sequence-parallel prompt for transformers models (``dtf.generate``).

::

    from distattn.integrations import transformers as dtf
    ids = dtf.generate(model, input_ids, mesh, max_new_tokens=64)   # every rank of the mesh

Every rank passes the same full prompt and gets the same full ids back. What happens, on every
rank (docs/INFERENCE.md has the design):

1. The K/V cache is a ``ShardedCache`` (``sharded_cache(mesh, config)``): a transformers
   ``Cache`` holding a ``distattn.inference.ShardedKVCache``, so each rank keeps the K/V of
   its own tokens only (about 1/P of the cache; no rank ever holds a full-length cache).
2. The prompt, all but its last token, is prefilled *sharded*: each rank runs the model on its
   layout share of the tokens only (one sharded step per ``prefill_chunk_size`` chunk; the
   first is a ring prefill, later ones pass-KV or pass-Q by ``choose_strategy``).
3. transformers' own ``model.generate`` does the rest with that cache: it feeds the last prompt
   token, then every new token, to the model on every rank (replicated decode steps), with
   its usual logits processors, sampling and stopping criteria. Every rank computes
   bit-identical logits, so greedy and sampled tokens (same seed on every rank) agree; that
   is checked once at the end.

Sliding windows, soft-capping and sinks are passed on as the model's attention layers ask
(``distattn.integrations.transformers`` maps them); a window that would cut a prefill step over
cached tokens (``prefill_chunk_size`` or a continuation) is refused before any communication.

For the duration of the call the model's attention implementation is a function bound to the
cache, registered in transformers' ``AttentionInterface`` under a name unique to the cache and
removed afterwards; the previous implementation is restored. A continuation (a new turn) passes
the returned cache back as ``past_key_values`` with ``input_ids`` that extend the ids it holds.
"""
from __future__ import annotations

import copy
import functools
import hashlib
from contextlib import contextmanager

import torch

from ..agree import canonical, check_agreement, fail_everywhere
from ..inference import STRATEGIES, ShardedKVCache
from ..mesh import as_mesh
from ..ulysses import check_heads
from . import guard, hf
from .mixers import MIXERS_ATTR

# generate() arguments that work unchanged over a sharded cache (passed on to model.generate).
SUPPORTED_GENERATE_KWARGS = frozenset({
    "max_new_tokens", "max_length", "min_new_tokens", "min_length", "do_sample",
    "temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff",
    "repetition_penalty", "no_repeat_ngram_size", "bad_words_ids", "suppress_tokens",
    "begin_suppress_tokens", "forced_bos_token_id", "forced_eos_token_id",
    "renormalize_logits", "remove_invalid_values", "eos_token_id", "pad_token_id",
    "bos_token_id", "generation_config", "logits_processor", "stopping_criteria", "streamer",
    "return_dict_in_generate", "output_scores", "output_logits", "attention_mask",
    "prefill_chunk_size", "use_cache", "num_beams", "num_return_sequences",
})
# Generation-config values that must keep their default: name -> (default, why not).
_FIXED_CONFIG = {
    "num_beams": (1, "beam search reorders the cache"),
    "num_return_sequences": (1, "several sequences per prompt expand the cache's batch"),
    "use_cache": (True, "dtf.generate always decodes from the sharded cache"),
    "cache_implementation": (None, "the cache is distattn's sharded cache"),
    "output_attentions": (False, "attention weights are never materialised"),
    "output_hidden_states": (False, "the prefill's hidden states stay sharded"),
    "prompt_lookup_num_tokens": (None, "speculative decoding crops the cache"),
    "penalty_alpha": (None, "contrastive search"),
}


# ---------------------------------------------------------------------------------------------
# the cache
# ---------------------------------------------------------------------------------------------
class ShardedCacheMixin:
    """The methods of ``ShardedCache``, the transformers ``Cache`` whose K/V live in a
    ``distattn.inference.ShardedKVCache`` (``.sharded``): each rank of ``mesh`` holds the K/V
    of its own tokens only. Build one with ``sharded_cache(mesh, config)``; the class itself
    (``sharded_cache_class()``) is made on first use, so that importing this module does not
    import transformers.

    ``config``: the model's config (its decoder's ``num_hidden_layers`` layers are cached).
    ``layout`` and ``backend`` as in ``ShardedKVCache``. ``token_ids`` [B, seq_len] are the
    ids whose K/V are cached (set by ``generate``, checked when a continuation passes the
    cache back). A forward pass of the model with this cache is one step of the sharded
    cache: ``generate`` opens sharded steps for the prompt; any other forward (the ones
    ``model.generate`` makes) opens a replicated step for its tokens in ``update``.
    Beam search, cropping and batch reordering are not supported and raise.
    """

    def __init__(self, mesh, config, *, layout: str = "zigzag", backend: str = "auto"):
        text = config.get_text_config(decoder=True)
        sharded = ShardedKVCache(mesh, text.num_hidden_layers, layout=layout, backend=backend)
        # One layer object per decoder layer, as transformers' Cache contract has it: generate
        # reads the cache's length and kinds of layer through them (from 5.24 on, a cache
        # with no layers counts as "all linear" and makes generate re-feed the whole prompt).
        layer = sharded_layer_class()
        super().__init__(layers=[layer(sharded, sliding) for sliding in _sliding_layers(text)])
        self.sharded = sharded
        self.token_ids = None

    # -- what transformers asks of a Cache --------------------------------------------------------
    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """Called by every attention layer before attending; the K/V are stored by
        ``attention`` (which also has the queries). Opens a replicated step when none is."""
        if self.sharded.step is None:
            self.sharded.begin_replicated(key_states.shape[-2])
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.sharded.seq_len

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.sharded.seq_len + query_length, 0

    def get_max_length(self, layer_idx=None) -> int:
        return -1

    def _unsupported(self, what):
        raise NotImplementedError(f"ShardedCache does not support {what}: its K/V are spread "
                                  f"over the ranks of the mesh")

    def crop(self, tokens_to_remove):
        if tokens_to_remove != 0:    # generate may "crop" by 0 tokens at the end
            self._unsupported("crop (speculative or assisted decoding)")

    def reorder_cache(self, beam_idx):
        self._unsupported("reorder_cache (beam search)")

    def batch_repeat_interleave(self, repeats):
        self._unsupported("batch_repeat_interleave")

    def batch_select_indices(self, indices):
        self._unsupported("batch_select_indices")

    def reset(self):
        self._unsupported("reset (build a new ShardedCache instead)")

    def __repr__(self):
        s = self.sharded
        return (f"ShardedCache({s.mesh}, layers={s.num_layers}, layout={s.layout!r}, "
                f"seq_len={s.seq_len}, local tokens={s.local_len})")

    # -- the attention function (registered by generate, bound to this cache) ---------------
    def attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                  **kwargs):
        """transformers attention function: query [B, Hq, n, D], key/value [B, Hkv, n, D] are
        the step's tokens as this rank holds them -> ([B, n, Hq, D], None)."""
        name = "dtf.generate"
        if attention_mask is not None:
            raise ValueError(f"{name}: attention masks are not supported (padding, custom "
                             f"masks); pass unpadded prompts")
        if dropout:
            raise NotImplementedError(f"{name}: attention dropout ({dropout}) is not "
                                      f"supported; call model.eval()")
        hf.check_attention_kwargs(name, kwargs, allow=("output_router_logits",))  # no loss
        if kwargs.get("is_causal", getattr(module, "is_causal", True)) is False:
            raise NotImplementedError(f"{name} runs causal attention only")
        if kwargs.get("output_attentions"):
            raise NotImplementedError(f"{name} never materialises attention weights")
        out = self.sharded.attend(module.layer_idx, query.transpose(1, 2),
                                  key.transpose(1, 2), value.transpose(1, 2),
                                  softmax_scale=scaling, **hf.attention_variant(module, kwargs))
        return out, None


class ShardedLayerMixin:
    """One decoder layer of a ``ShardedCache`` as transformers sees it: it reports the cached
    length and the layer's kind; the K/V themselves live in the shared ``ShardedKVCache``
    (``sharded``), which ``ShardedCache.attention`` reads and writes."""

    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, sharded: ShardedKVCache, is_sliding: bool):
        super().__init__()
        self.sharded = sharded
        self.is_sliding = is_sliding

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("a ShardedCache layer is written by ShardedCache.attention only")

    def get_seq_length(self) -> int:
        return self.sharded.seq_len

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        return self.sharded.seq_len + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:
        return -1


def _sliding_layers(text_config) -> list[bool]:
    """Per decoder layer: does it attend through a sliding window?"""
    n = text_config.num_hidden_layers
    types = getattr(text_config, "layer_types", None)
    if types is not None:
        return [t == "sliding_attention" for t in types][:n]
    sliding = (getattr(text_config, "sliding_window", None) is not None
               and getattr(text_config, "use_sliding_window", True))
    return [bool(sliding)] * n


@functools.cache
def sharded_layer_class() -> type:
    """``ShardedLayer``: ``ShardedLayerMixin`` over transformers' ``CacheLayerMixin``."""
    hf.require()
    from transformers.cache_utils import CacheLayerMixin
    return type("ShardedLayer", (ShardedLayerMixin, CacheLayerMixin),
                {"__doc__": ShardedLayerMixin.__doc__, "__module__": __name__})


@functools.cache
def sharded_cache_class() -> type:
    """``ShardedCache``: ``ShardedCacheMixin`` over transformers' ``Cache`` (built once, on
    first use)."""
    hf.require()
    from transformers.cache_utils import Cache
    return type("ShardedCache", (ShardedCacheMixin, Cache),
                {"__doc__": ShardedCacheMixin.__doc__, "__module__": __name__})


def sharded_cache(mesh, config, *, layout: str = "zigzag", backend: str = "auto"):
    """A new, empty ``ShardedCache`` for a model with ``config`` over ``mesh`` (pass it to
    ``generate`` as ``past_key_values`` to keep a handle on it, e.g. to continue a
    conversation)."""
    return sharded_cache_class()(mesh, config, layout=layout, backend=backend)


@contextmanager
def _attention_bound_to(model, cache):
    """Run ``model`` with ``cache.attention`` as its attention implementation."""
    from transformers import AttentionInterface

    name = f"distattn_generate_{id(cache):x}"
    AttentionInterface.register(name, cache.attention)
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
        # transformers has no unregister: drop our entry so nothing refers to the cache
        AttentionInterface._global_mapping.pop(name, None)


# ---------------------------------------------------------------------------------------------
# checks (all before any communication)
# ---------------------------------------------------------------------------------------------
def _effective_config(model, kwargs):
    """The generation config ``model.generate`` would use: the given or model's, updated with
    the keyword arguments it knows."""
    config = copy.deepcopy(kwargs.get("generation_config") or model.generation_config)
    for key, value in kwargs.items():
        if key != "generation_config" and hasattr(config, key):
            setattr(config, key, value)
    return config


def _check_generate_kwargs(model, input_ids, mesh, kwargs) -> tuple:
    """Raise for what dtf.generate cannot do; returns the prefill chunk size (or None) and
    the final length (None when transformers' defaults decide it)."""
    unknown = sorted(set(kwargs) - SUPPORTED_GENERATE_KWARGS)
    if unknown:
        raise ValueError(f"dtf.generate does not support the generate argument(s) {unknown}; "
                         f"supported: {sorted(SUPPORTED_GENERATE_KWARGS)}")
    config = _effective_config(model, kwargs)
    for key, (default, why) in _FIXED_CONFIG.items():
        value = getattr(config, key, None)
        if value is not None and value != default:   # None: transformers' default
            raise ValueError(f"dtf.generate needs {key}={default!r} (got {value!r}): {why}")
    mask = kwargs.get("attention_mask")
    if mask is not None and (not isinstance(mask, torch.Tensor)
                             or tuple(mask.shape) != tuple(input_ids.shape) or not bool(mask.all())):
        raise ValueError("dtf.generate does not support padded batches (left padding) or "
                         "custom masks: attention_mask must be all ones with the shape of "
                         "input_ids. Batch prompts of equal length, or generate them one by one")
    text = model.config.get_text_config(decoder=True)
    if mesh.ulysses_degree > 1:
        check_heads(text.num_attention_heads,
                    getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
                    mesh.ulysses_degree)
    chunk = kwargs.get("prefill_chunk_size", config.prefill_chunk_size)
    if chunk is not None and (not isinstance(chunk, int) or chunk < mesh.size):
        raise ValueError(f"prefill_chunk_size must be an int of at least the mesh size "
                         f"({mesh.size}) or None, got {chunk!r}")
    # the final length when it is known now (None: up to transformers' defaults)
    total = (input_ids.shape[1] + config.max_new_tokens if config.max_new_tokens is not None
             else config.max_length)
    return chunk, total


def _check_window(model, input_ids, cached, chunk, total) -> None:
    """Sliding windows run on the prompt's prefill and on decode steps; a prefill step over
    cached tokens (a chunk after the first, or a continuation) cannot have one that cuts."""
    text = model.config.get_text_config(decoder=True)
    width = getattr(text, "sliding_window", None)
    if width is None or not getattr(text, "use_sliding_window", True):
        return
    prefill = input_ids.shape[1] - 1 - cached           # tokens prefilled sharded
    over_cache = (cached > 0 and prefill > 0) or (chunk is not None and prefill > chunk)
    if over_cache and (total is None or total > width):
        raise NotImplementedError(
            f"dtf.generate: the model's sliding window ({width} tokens) would cut a prefill "
            f"step over cached tokens ({'a continuation' if cached else 'prefill_chunk_size'}"
            f"), which is not supported: prefill the prompt in one step (no "
            f"prefill_chunk_size), or keep the whole sequence within {width} tokens")


def _check_temperature_tuning(model, input_ids) -> None:
    """Llama 4's NoPE layers scale a query by a temperature of its row index (arange of the
    step's tokens plus the cached length), which a sharded prefill step computes from the
    rank's local row: exact while every prompt token is below ``floor_scale`` (the
    temperature is 1 there), refused beyond. Decode steps are replicated and exact."""
    for module in model.modules():
        tuning = hf.temperature_tuning(module)
        if tuning is not None and input_ids.shape[1] - 1 > tuning[0] - 1:
            raise NotImplementedError(
                f"dtf.generate: {type(module).__name__} tunes its query temperature by row "
                f"index (attn_temperature_tuning, floor_scale={int(tuning[0])}), which a "
                f"sharded prefill of {input_ids.shape[1] - 1} tokens would compute from each "
                f"rank's local rows; prompts up to {int(tuning[0])} tokens are exact. Use a "
                f"shorter prompt, or one-process model.generate")


def _resolve_cache(past_key_values, mesh, model, input_ids, layout, backend):
    if past_key_values is None:
        return sharded_cache(mesh, model.config, layout=layout or "zigzag",
                             backend=backend or "auto")
    if not isinstance(past_key_values, ShardedCacheMixin):
        raise ValueError(f"past_key_values must be a ShardedCache (dtf.sharded_cache(mesh, "
                         f"config), or one an earlier dtf.generate filled), got "
                         f"{type(past_key_values).__name__}")
    sharded = past_key_values.sharded
    if sharded.mesh is not mesh:
        raise ValueError(f"past_key_values was built for another mesh ({sharded.mesh}), not "
                         f"{mesh}: pass the mesh the cache was built with")
    for arg, given, held in (("layout", layout, sharded.layout),
                             ("backend", backend, sharded.backend)):
        if given is not None and given != held:
            raise ValueError(f"{arg}={given!r} differs from the cache's {held!r}; leave it "
                             f"out when passing past_key_values")
    if sharded.step is not None or (sharded.seq_len > 0) != (past_key_values.token_ids is not None):
        raise ValueError("past_key_values is in the middle of a step or was not filled by "
                         "dtf.generate: pass a new ShardedCache or one dtf.generate returned")
    held = past_key_values.token_ids
    if held is None:
        return past_key_values
    if (input_ids.shape[0] != held.shape[0] or input_ids.shape[1] <= held.shape[1]
            or not torch.equal(input_ids[:, :held.shape[1]].to(held.device), held)):
        raise ValueError(f"input_ids must start with the {held.shape[1]} tokens the cache "
                         f"holds (batch {held.shape[0]}) and add at least one")
    return past_key_values


def _check_call(model, input_ids, mesh, past_key_values, layout, backend, strategy, kwargs):
    if not hasattr(model, "generate") or not hasattr(model, "set_attn_implementation"):
        raise TypeError(f"model must be a transformers PreTrainedModel with generate(), got "
                        f"{type(model).__name__} (unwrap DDP/FSDP wrappers first)")
    if model.config.is_encoder_decoder:
        raise ValueError("dtf.generate supports decoder-only models")
    if (not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2
            or input_ids.dtype not in (torch.int32, torch.int64) or input_ids.numel() == 0):
        raise ValueError(f"input_ids must be a non-empty 2-D integer tensor [batch, seq_len], "
                         f"got {getattr(input_ids, 'shape', type(input_ids).__name__)}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    guard.prepare(model)          # the whole model is exact under SP, or refused (local)
    if getattr(model, MIXERS_ATTR, None):
        raise NotImplementedError(
            f"dtf.generate does not support models with sequence-mixer layers yet "
            f"({', '.join(getattr(model, MIXERS_ATTR)[:3])}, ...): their state caches are not "
            f"sharded. Generate with one process")
    chunk, total = _check_generate_kwargs(model, input_ids, mesh, kwargs)
    _check_temperature_tuning(model, input_ids)
    cache = _resolve_cache(past_key_values, mesh, model, input_ids, layout, backend)
    _check_window(model, input_ids, cache.get_seq_length(), chunk, total)
    if cache.get_seq_length() == 0 and input_ids.shape[1] <= mesh.size:
        raise ValueError(
            f"input_ids has {input_ids.shape[1]} tokens: generating over a mesh of "
            f"{mesh.size} ranks needs a prompt of at least {mesh.size + 1} tokens (all but "
            f"the last are prefilled in parallel, at least one per rank). Use a longer prompt "
            f"or a smaller mesh")
    return cache, chunk


# ---------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------
def _prefill(model, cache, ids: torch.Tensor, chunk: int | None, strategy: str):
    """Run the decoder on ``ids`` (new tokens after the cached ones), sharded: one sharded
    step per chunk, each rank computing its slots only. The outputs are not needed (the
    cache is the result), so the LM head is skipped."""
    decoder = model.base_model
    n = ids.shape[1]
    for start in range(0, n, chunk or max(n, 1)):
        part = ids[:, start:start + (chunk or n)]
        step = cache.sharded.begin_sharded(part.shape[1], strategy)
        positions = step.positions.to(ids.device).unsqueeze(0).expand(ids.shape[0], -1)
        decoder(input_ids=step.shard(part, dim=1), position_ids=positions, use_cache=True,
                **{hf.cache_kwarg(): cache})


def _describe(value) -> str:
    """``canonical`` text for generate arguments, which may hold objects it cannot compare
    (logits processors, streamers): those count by their type; a GenerationConfig by the
    values it sets."""
    if hasattr(value, "to_diff_dict"):       # a GenerationConfig: what differs from defaults
        return type(value).__name__ + _describe(value.to_diff_dict())
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {_describe(value[k])}"
                               for k in sorted(value, key=repr)) + "}"
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(_describe(v) for v in value) + ")"
    try:
        return canonical(value)
    except TypeError:
        return f"<{type(value).__module__}.{type(value).__qualname__}>"


def _rng_digest(device: torch.device) -> str:
    """A digest of the RNG state sampling draws from (the CPU generator, and the current
    CUDA one for CUDA inputs)."""
    states = [torch.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device).cpu())
    return hashlib.blake2b(b"".join(bytes(s.numpy()) for s in states),
                           digest_size=8).hexdigest()


def _ids_digest(ids: torch.Tensor) -> str:
    return hashlib.blake2b(bytes(ids.detach().to("cpu", torch.int64).contiguous().numpy()),
                           digest_size=8).hexdigest()


def _agree_tokens(mesh, ids: torch.Tensor, when: str) -> None:
    """Raise on every rank if the ranks of the mesh hold different ``ids`` (one small host
    collective: shapes and a digest of the values)."""
    try:
        check_agreement(mesh, f"dtf.generate ({when})", {"ids": ids, "values": _ids_digest(ids)})
    except ValueError as exc:
        raise RuntimeError(
            f"dtf.generate: the ranks of the mesh generated different tokens ({when}). Their "
            f"logits must be bit-identical: use deterministic kernels and the same seed, "
            f"generation arguments and model weights on every rank. Every rank raises this") \
            from exc


def _token_agreement(mesh):
    """A transformers stopping criterion that never stops generation itself but agrees, after
    every new token, that every rank holds the same tokens, so that the ranks stop together
    (the same end-of-sequence decisions) or raise together at the first difference."""
    from transformers import StoppingCriteria

    class SameTokensOnEveryRank(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            _agree_tokens(mesh, input_ids, f"after {input_ids.shape[1]} tokens")
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return SameTokensOnEveryRank()


def _agree_call(model, input_ids, mesh, layout, backend, strategy, kwargs) -> None:
    """Every rank of the mesh calls dtf.generate with the same prompt shape, cache settings
    and generation arguments, and, when sampling, the same RNG state."""
    config = _effective_config(model, kwargs)
    others = {k: v for k, v in kwargs.items() if not hasattr(config, k)}
    check_agreement(mesh, "dtf.generate", dict(
        input_ids=input_ids, prompt=_ids_digest(input_ids), layout=layout, backend=backend,
        strategy=strategy, generation_config=_describe(config), other_arguments=_describe(
            others), sampling_rng=_rng_digest(input_ids.device) if config.do_sample else None))


def generate(model, input_ids: torch.Tensor, mesh, *, past_key_values=None, cache=None,
             layout: str | None = None, backend: str | None = None, strategy: str = "auto",
             **generate_kwargs):
    """``model.generate(input_ids, **generate_kwargs)`` with the prompt's K/V cache sharded
    over ``mesh`` (see the module docstring). Every rank of the mesh calls it with the same
    arguments and gets the same result back: the ids [B, S + new tokens], or transformers'
    output object with ``return_dict_in_generate=True`` (its cache is
    ``hf.output_cache(result)``: ``result.cache`` from transformers 5.24 on,
    ``result.past_key_values`` before). Greedy tokens equal one-process ``model.generate``; sampling draws from the global
    torch RNG as ``model.generate`` does, so seed every rank the same.

    ``input_ids`` [B, S]: unpadded prompts of one length (an all-ones ``attention_mask`` is
    accepted, padding is not), S > mesh.size. ``past_key_values`` (or ``cache``,
    transformers' name from 5.24 on): a ``ShardedCache`` built
    for ``mesh``: a new one (``sharded_cache``, to keep a handle on it), or one an earlier
    call filled, to
    continue it (``input_ids`` must then start with its ``token_ids``). ``layout`` (default
    "zigzag") and ``backend`` (default "auto") configure the cache built when none is given.
    ``strategy``: "auto", "pass_kv" or "pass_q" for prefill chunks over a non-empty cache
    (``prefill_chunk_size``, or a continuation). Sliding windows, logit soft-capping and
    attention sinks run as the model asks (Mistral, Qwen2, Gemma 2, gpt-oss, ...), except a
    window that would cut a prefill step over cached tokens. Unsupported generate arguments
    (beam search, assisted decoding, other caches, attention or hidden-state outputs,
    padding) and that window raise before any communication.
    """
    mesh = as_mesh(mesh)
    if cache is not None and past_key_values is not None:
        raise ValueError("pass the cache as past_key_values= or as cache= (transformers' newer "
                         "name), not both")
    past_key_values = cache if cache is not None else past_key_values
    try:
        cache, chunk = _check_call(model, input_ids, mesh, past_key_values, layout, backend,
                                   strategy, generate_kwargs)
    except Exception as exc:     # raised on every rank of the mesh
        fail_everywhere(mesh, "dtf.generate", exc)
    _agree_call(model, input_ids, mesh, layout, backend, strategy, generate_kwargs)
    generate_kwargs = {k: v for k, v in generate_kwargs.items()
                       if k not in ("attention_mask", "prefill_chunk_size")}
    generate_kwargs["stopping_criteria"] = _with_token_agreement(
        generate_kwargs.get("stopping_criteria"), mesh)
    cached = cache.get_seq_length()
    with torch.no_grad(), _attention_bound_to(model, cache):
        _prefill(model, cache, input_ids[:, cached:-1], chunk, strategy)
        result = model.generate(input_ids, prefill_chunk_size=None,
                                **{hf.cache_kwarg(): cache}, **generate_kwargs)
    ids = result if isinstance(result, torch.Tensor) else result.sequences
    cache.token_ids = ids[:, :cache.get_seq_length()].clone()
    _agree_tokens(mesh, ids, "the result")
    return result


def _with_token_agreement(criteria, mesh):
    from transformers import StoppingCriteriaList
    return StoppingCriteriaList([*(criteria or []), _token_agreement(mesh)])
