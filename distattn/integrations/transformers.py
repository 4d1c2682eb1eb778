"""Sequence parallelism for Hugging Face transformers models (``import ... as dtf``).

A transformers model keeps its own modelling code; only its attention function is swapped::

    import distattn
    from distattn.integrations import transformers as dtf

    mesh = distattn.SPMesh.build(ulysses_degree=1)             # all ranks: a ring
    dtf.register(mesh, layout="zigzag")                        # attn_implementation "distattn"
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="distattn")
    dtf.checkpoint_layers(model)                               # optional
    local = dtf.shard_batch({"input_ids": ids}, mesh, layout="zigzag")
    out = model(input_ids=local["input_ids"], position_ids=local["position_ids"],
                use_cache=False)
    loss = dtf.sp_loss(out.logits, local["shift_labels"], mesh)
    loss.backward()   # then SUM gradients over the SP group (see sp_loss)

Every rank of the SP group holds the same full batch, keeps only its tokens (``shard_batch``),
and runs the model on them; attention is the only place where tokens meet, and there the
distributed attention sees the whole sequence. Everything here checks its arguments before
any communication, so a bad call fails the same way on every rank.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from ..agree import agree_error
from ..attention import SCHEDULES
from ..comm import sp_all_reduce
from ..kernels import BACKENDS
from ..documents import check_cu_seqlens
from ..layout import (agree_preparation, check_layout, local_indices, local_positions,
                      seq_multiple, take_shard)
from ..mesh import as_mesh
from . import checkpoint as _ckpt
from . import hf
from .generation import generate, sharded_cache  # noqa: F401  (dtf.generate)
from .hf import attention_variant
from .hf import require as _transformers
from . import guard as _guard
from . import registry as _registry
from .guard import UnsupportedModelError, prepare  # noqa: F401  (dtf.prepare)

IGNORE_INDEX = -100
CU_SEQLENS_KEY = hf.CU_SEQLENS_KEY   # model kwarg: global document boundaries (a tuple)
_BUILTIN_NAMES = ("eager", "sdpa", "flash_attention_2", "flash_attention_3",
                  "flash_attention_4", "flex_attention", "paged|eager")
# ---------------------------------------------------------------------------------------------
# the attention function
# ---------------------------------------------------------------------------------------------
def _refuse_unsupported(name, module, query, key, attention_mask, dropout, kwargs) -> None:
    """Raise (before any communication) for what the distributed attention cannot do yet."""
    if attention_mask is not None:
        raise ValueError(
            f"attn_implementation={name!r} (distattn) does not support attention masks yet "
            f"(got attention_mask of shape {tuple(attention_mask.shape)}): padding and custom "
            f"masks are not implemented. Pass unpadded sequences with attention_mask=None (a "
            f"2-D all-ones attention_mask is accepted) and use dtf.shard_batch")
    if dropout is not None and dropout > 0:
        raise NotImplementedError(
            f"attn_implementation={name!r} (distattn) does not support attention dropout "
            f"(dropout={dropout}); set config.attention_dropout=0.0")
    hf.check_attention_kwargs(f"attn_implementation={name!r} (distattn)", kwargs)
    config = getattr(module, "config", None)
    if kwargs.get("output_attentions") or getattr(config, "output_attentions", False):
        raise NotImplementedError(
            f"attn_implementation={name!r} (distattn) never materialises attention weights: "
            f"output_attentions=True is not supported")
    if query.shape[2] != key.shape[2]:
        raise NotImplementedError(
            f"attn_implementation={name!r} (distattn) needs queries and keys over the same "
            f"local tokens (got {query.shape[2]} queries, {key.shape[2]} keys): this looks "
            f"like KV-cache decoding (model.generate) or cross-attention. To generate with a "
            f"sequence-parallel cache use dtf.generate(model, input_ids, mesh); to train, "
            f"call the model with use_cache=False")


class _Reached:
    """Which attention layers ran through a distattn attention function: the layers of the
    latest forward that reached one, for ``sp_loss`` to check (``check``).

    A model whose attention never reaches distattn -- its family computes attention in its
    own modules instead of through transformers' ``AttentionInterface`` (transformers then
    ignores ``attn_implementation`` with a warning only), or some of its layers do -- would
    attend over each rank's own tokens and train silently wrong, without any distattn call
    that could refuse it. Calls during a backward pass (checkpointed recomputation) are not
    a forward and are not recorded."""

    def __init__(self):
        self.config, self.layers, self.checked = None, set(), None

    def record(self, module) -> None:
        if _in_backward():          # a checkpointed layer's recomputation, not a forward
            return
        config = getattr(module, "config", None)
        idx = getattr(module, "layer_idx", None)
        key = idx if isinstance(idx, int) else ("module", id(module))
        if config is not self.config or key in self.layers:     # another model, or a new
            self.config, self.layers = config, set()            # forward of this one
        self.layers.add(key)

    def check(self, logits) -> None:
        """Raise ``UnsupportedModelError`` unless a forward since the last check ran
        distattn's attention on every attention layer of its model (``guard.attention_layers``).
        The same logits tensor checked twice passes (two losses of one forward)."""
        if self.checked is not None and self.checked() is logits:
            return
        config, layers = self.config, self.layers
        self.config, self.layers = None, set()
        if not layers:
            raise UnsupportedModelError(
                "dtf.sp_loss: the model's forward never ran distattn's attention function, so "
                "every rank attended over its own tokens only and this loss would be silently "
                "wrong. Either the model is not set to the name dtf.register returned (pass "
                "attn_implementation=name to from_config, or call "
                "model.set_attn_implementation(name), and check "
                "model.config._attn_implementation), or its family computes attention in its "
                "own modules instead of through transformers' AttentionInterface (transformers "
                "then keeps its own attention and only warns); such a family cannot run "
                "distattn, and dtf.prepare(model) names it. " + _guard.WAY_OUT)
        expected = _guard.attention_layers(config) if config is not None else []
        if len(layers) < len(expected):
            missing = [i for i in expected if i not in layers]
            raise UnsupportedModelError(
                f"dtf.sp_loss: layers {missing} of model family {_guard._family(config)} "
                f"never ran distattn's attention function in the forward (layers "
                f"{sorted(i for i in layers if isinstance(i, int))} did): they compute "
                f"attention in their own modules, over each rank's own tokens only, and "
                f"this loss would be silently wrong. " + _guard.WAY_OUT)
        self.checked = weakref.ref(logits)


_REACHED = _Reached()


def _in_backward() -> bool:
    """Whether autograd is running a backward pass on this thread (torch's graph task id is
    -1 outside one; a torch without it: never)."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() >= 0
POSITIONS_CHECKED = "_distattn_positions_checked"


def _check_positions(name, position_ids, mesh, layout, local_len) -> None:
    """Without document boundaries the tokens must be one unpacked sequence sharded with the
    registered layout: position_ids must be each token's global index. A packed batch
    (positions restarting at 0), local positions 0..S_local-1 (position_ids not passed) or
    another layout would silently attend across documents or rotate with wrong positions.

    The local comparison is agreed over the mesh (``distattn.agree.agree_error``, one small
    collective), so every rank raises or none does; the verdict is kept on the tensor, so the
    layers of one forward (and a checkpointed recomputation) check it once."""
    if position_ids is None or getattr(position_ids, POSITIONS_CHECKED, False):
        return
    expected = local_positions(local_len * mesh.size, mesh, layout, position_ids.device)
    ok = position_ids.shape[-1] == local_len and bool((position_ids == expected).all())
    agree_error(mesh, None if ok else ValueError(
        f"attn_implementation={name!r} (distattn): the position_ids given to the model are "
        f"not the global positions of one sequence sharded with layout={layout!r}: "
        f"{_positions_diagnosis(position_ids, local_len)}"))
    setattr(position_ids, POSITIONS_CHECKED, True)


def _positions_diagnosis(position_ids, local_len) -> str:
    """What the wrong position ids most likely mean, and the fix."""
    how = (f"shard the batch with dtf.shard_batch(batch, mesh, layout=...) (the layout given "
           f"to dtf.register) and call the model with every model input it returns, "
           f"model(**{{k: v for k, v in local.items() if k != 'shift_labels'}})")
    row = position_ids.reshape(-1, position_ids.shape[-1])[0]
    if bool((row == torch.arange(local_len, device=row.device)).all()):
        return (f"they are 0..{local_len - 1}, as for a whole unsharded sequence (or a shard "
                f"passed without its positions). To train, {how}. To generate, use "
                f"dtf.generate(model, input_ids, mesh) instead of model.generate")
    if bool((row[1:] < row[:-1]).any()):
        return (f"they restart inside the row, as in a packed batch, which needs its document "
                f"boundaries ('distattn_cu_seqlens'): {how}")
    return f"another layout or another sequence length? {how}"


def _row_temperature(module, query, mesh, layout, cu_seqlens):
    """Llama 4's NoPE layers scale queries by a temperature of the token's row index, which
    the model computed from this rank's local indices: rescale to the global ones
    (``hf.temperature_ratio``), so the layer computes what it computes on one process."""
    if hf.temperature_tuning(module) is None:
        return query
    n = query.shape[2]
    seq_len = n * mesh.size if cu_seqlens is None else check_cu_seqlens(cu_seqlens)[-1]
    index = local_indices(seq_len, mesh, layout, cu_seqlens).to(query.device)
    return (query * hf.temperature_ratio(module, index).to(query.dtype)).to(query.dtype)


def _make_attention(name, mesh, layout, schedule, backend):
    def distattn_attention(module, query, key, value, attention_mask, scaling=None,
                           dropout=0.0, **kwargs):
        """transformers attention function: query [B, Hq, S_local, D], key/value [B, Hkv,
        S_local, D] (this rank's tokens, sharded with the registered layout) ->
        ([B, S_local, Hq, D], None). ``distattn_cu_seqlens`` (from ``shard_batch``) gives the
        global document boundaries of a packed batch."""
        cu_seqlens = kwargs.get(CU_SEQLENS_KEY)
        config = getattr(module, "config", None)
        if config is not None:      # the model guard (guard.py): cached, no communication
            verdict = _guard.check_config(config)
            global_len = (max(b - a for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:]))
                          if cu_seqlens is not None else query.shape[2] * mesh.size)
            _guard.check_length(verdict, global_len, f" (attn_implementation={name!r})")
        _refuse_unsupported(name, module, query, key, attention_mask, dropout, kwargs)
        _REACHED.record(module)
        if cu_seqlens is None:
            _check_positions(name, kwargs.get("position_ids"), mesh, layout, query.shape[2])
        query = _row_temperature(module, query, mesh, layout, cu_seqlens)
        is_causal = kwargs.get("is_causal")
        if is_causal is None:
            is_causal = getattr(module, "is_causal", True)
        out = _ckpt.remat_attention(
            module, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
            mesh=mesh, causal=bool(is_causal), softmax_scale=scaling, layout=layout,
            schedule=schedule, backend=backend, cu_seqlens=cu_seqlens,
            **attention_variant(module, kwargs))
        return out, None

    distattn_attention.mesh = mesh
    distattn_attention.layout = layout
    return distattn_attention


def _make_mask(name, mesh):
    def distattn_mask(*, kv_length=None, attention_mask=None, **kwargs):
        """transformers mask function (called with keywords only; the others differ between
        versions): the distributed attention applies causality itself, so no [S, S] mask is
        ever built. A padding mask is refused unless it masks nothing.
        Each rank sees only its shard of the mask, so the verdict is agreed over the mesh
        (one small collective per model call): every rank raises, or none does."""
        config = kwargs.get("config")
        if config is not None:      # the model guard, before this function's collective
            _guard.check_config(config)
        error = None
        if attention_mask is not None and not (
                isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2
                and attention_mask.shape[-1] == kv_length and bool(attention_mask.all())):
            error = ValueError(
                f"attn_implementation={name!r} (distattn) does not support padding masks "
                f"yet: the attention_mask passed to the model masks some tokens. Pass unpadded "
                f"sequences (attention_mask=None) sharded with dtf.shard_batch")
        agree_error(mesh, error)
        return None

    return distattn_mask


def register(mesh, layout: str = "zigzag", name: str = "distattn", schedule: str = "auto",
             backend: str = "auto", override: str | None = None) -> str:
    """Register ``name`` as a transformers attention implementation running
    ``distattn.dist_flash_attn`` over ``mesh`` for tokens sharded with ``layout``.

    Select it with ``from_config(..., attn_implementation=name)`` (or
    ``model.set_attn_implementation(name)``). The function honours the module's ``scaling``
    and ``is_causal``, sliding windows (Mistral, Qwen2, Gemma 2/3, gpt-oss), logit
    soft-capping (Gemma 2) and attention sinks (gpt-oss), passes GQA/MQA K/V unexpanded, and
    raises for what it cannot do: padding or custom attention masks, attention dropout > 0
    in training, ``output_attentions`` and KV-cache decoding. A mask function is
    registered under the same name so transformers never builds an [S, S] mask.

    ``override=KEY`` takes over one of transformers' own keys instead of adding ``name``:
    ``"sdpa"`` or ``"flash_attention_2"`` (``_3``, ``_4`` where transformers has them), for
    code that selects attention by those names. Every model in this process that uses KEY
    then runs distattn (for ``"sdpa"``: every model created without ``attn_implementation``)
    until ``unregister(KEY)`` restores transformers' functions. transformers checks that the
    flash_attn package is installed when a model is created with or switched to a flash key;
    where it is not (CPU), select the key with ``dtf.set_attn_implementation(model, KEY)``.

    The registration is global in transformers (by ``name``): use one name per mesh/layout.
    The input ids must be sharded with the same ``layout`` (``shard_batch``). Returns the
    registered key (``name``, or ``override``).
    """
    mesh = as_mesh(mesh)
    check_layout(layout)
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    _transformers()
    if override is not None:
        if name != "distattn":
            raise ValueError(f"pass name= or override=, not both (got name={name!r}, "
                             f"override={override!r}): override registers under "
                             f"transformers' own key {override!r}")
        keys = hf.overridable_keys()
        if override not in keys:
            raise ValueError(
                f"override={override!r} cannot be taken over: distattn overrides "
                f"{', '.join(map(repr, keys))} in this transformers ('eager' is never looked "
                f"up in transformers' AttentionInterface; 'flex_attention' and the paged keys "
                f"are not supported). To add a new implementation, pass name= instead")
        name = override
    elif name in _BUILTIN_NAMES:
        raise ValueError(f"name={name!r} would replace transformers' own {name!r} attention; "
                         f"pick another name (the default is 'distattn'), or pass "
                         f"override={name!r} to take that key over on purpose")
    _registry.install(name, _make_attention(name, mesh, layout, schedule, backend),
                      _make_mask(name, mesh), override=override is not None)
    return name


def unregister(name: str) -> None:
    """Undo ``register``: put transformers' own functions back under an overridden key
    (``override=``), or remove a name distattn added. Models created since keep the key in
    their config; they run transformers' function again (or, for a removed name, fail to
    find it). Raises ValueError for a name distattn did not register."""
    _registry.uninstall(name)


def set_attn_implementation(model, name: str):
    """Make ``model`` (and every sub-model) use the attention registered as ``name`` by
    ``register``, like ``model.set_attn_implementation(name)`` but without transformers'
    checks for the flash_attn package, which is never called: the way to select an
    overridden flash key (``register(..., override="flash_attention_2")``) on a machine
    without flash_attn. Runs the model guard first (``dtf.prepare``). Returns ``model``.

    Raises ValueError for a name ``register`` did not register, and for a flash key on a
    model with chunked attention layers (Llama 4): transformers' own mask builder refuses a
    flash key once the keys exceed the chunk, before distattn is called (use
    ``override="sdpa"`` or a new name there)."""
    if _registry.attention(name) is None:
        raise ValueError(f"attention {name!r} is not registered by dtf.register in this "
                         f"process: call dtf.register(mesh, layout=..., name={name!r}) (or "
                         f"override={name!r} for one of transformers' own keys) first")
    prepare(model)
    configs = {id(m.config): m.config for m in model.modules()
               if hasattr(getattr(m, "config", None), "_attn_implementation")}
    chunked = any("chunked_attention" in (getattr(c, "layer_types", None) or ())
                  for c in configs.values())
    if hf.flash_key(name) and chunked:
        raise ValueError(
            f"{type(model).__name__} has chunked attention layers, and transformers' mask "
            f"builder refuses a key containing 'flash' ({name!r}) once the keys exceed the "
            f"chunk, before distattn runs: register with override='sdpa' or a new name")
    for cfg in configs.values():      # the setter passes it on to the config's sub-configs
        cfg._attn_implementation = name
    return model


# ---------------------------------------------------------------------------------------------
# data and loss
# ---------------------------------------------------------------------------------------------
def _document_starts(pos: torch.Tensor) -> list:
    """Indices where a packed row's position_ids do not continue the previous token's
    (DataCollatorWithFlattening restarts them at 0 at every document)."""
    jumps = (pos[1:] != pos[:-1] + 1).nonzero().flatten() + 1
    return [0] + jumps.tolist()


# What DataCollatorWithFlattening adds with return_flash_attn_kwargs=True / return_seq_idx=True:
# the same document boundaries as its restarting position_ids (checked to agree, then used).
_FLATTENING_BOUNDARY_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k",
                             "seq_idx")


def _flattening_boundaries(batch: dict, bsz: int, seq_len: int):
    """The document boundaries (a tuple) that the collator's boundary keys give, or None
    when there are none; raises when they contradict one another."""
    found = {}
    for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
        if batch.get(key) is not None:
            cu = torch.as_tensor(batch[key]).flatten().tolist()
            if not cu or cu[-1] != seq_len:
                raise ValueError(f"{key} must end at the packed row's length {seq_len}, got "
                                 f"{cu}")
            found[key] = tuple(int(c) for c in cu)
    if batch.get("seq_idx") is not None:
        idx = torch.as_tensor(batch["seq_idx"])
        if idx.dim() != 2 or idx.shape[1] != seq_len:
            raise ValueError(f"seq_idx must be [batch, {seq_len}], got {tuple(idx.shape)}")
        row = idx[0]
        found["seq_idx"] = tuple([0] + ((row[1:] != row[:-1]).nonzero().flatten() + 1)
                                 .tolist() + [seq_len])
    if not found:
        return None
    if len(set(found.values())) > 1:
        raise ValueError(f"the collator's document boundaries disagree: {found}")
    cu = check_cu_seqlens(next(iter(found.values())))
    if len(cu) > 2 and bsz != 1:
        raise ValueError(f"the boundary keys describe a packed row of several documents, but "
                         f"the batch has {bsz} rows: pack every document into one row")
    for key in ("max_length_q", "max_length_k"):
        if batch.get(key) is not None and int(batch[key]) != max(
                b - a for a, b in zip(cu[:-1], cu[1:])):
            raise ValueError(f"{key}={int(batch[key])} is not the longest document of "
                             f"cu_seq_lens {list(cu)}")
    return cu


def _read_batch(batch: dict, mesh, layout: str):
    """The checks of ``shard_batch``: (input_ids, position_ids, next-token labels, cu_seqlens
    or None), raising on a batch it cannot shard exactly."""
    check_layout(layout)
    if not isinstance(batch, dict) or "input_ids" not in batch:
        raise ValueError("batch must be a dict with 'input_ids' [batch, seq_len]")
    unknown = set(batch) - {"input_ids", "labels", "attention_mask", "position_ids",
                            *_FLATTENING_BOUNDARY_KEYS}
    if unknown:
        raise ValueError(f"shard_batch does not know how to shard {sorted(unknown)}; it takes "
                         f"input_ids, labels, attention_mask (all ones), position_ids and the "
                         f"document boundaries DataCollatorWithFlattening adds "
                         f"({', '.join(_FLATTENING_BOUNDARY_KEYS)})")
    ids = batch["input_ids"]
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise ValueError(f"input_ids must be a 2-D tensor [batch, seq_len], got "
                         f"{getattr(ids, 'shape', type(ids).__name__)}")
    bsz, seq_len = ids.shape
    labels = batch.get("labels")
    if labels is None:
        labels = ids
    if labels.shape != ids.shape:
        raise ValueError(f"labels must have the shape of input_ids {tuple(ids.shape)}, got "
                         f"{tuple(labels.shape)}")
    mask = batch.get("attention_mask")
    if mask is not None:
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask must have the shape of input_ids "
                             f"{tuple(ids.shape)}, got {tuple(mask.shape)}")
        if not bool(mask.all()):
            raise ValueError("attention_mask masks some tokens: padding is not supported by "
                             "the distributed attention; pass unpadded sequences, or pack "
                             "them into one row with position_ids restarting per document")
    pos = batch.get("position_ids")
    cu = None
    if pos is not None:
        if pos.dim() != 2 or pos.shape[1] != seq_len or pos.shape[0] not in (1, bsz):
            raise ValueError(f"position_ids must be [batch or 1, {seq_len}], got "
                             f"{tuple(pos.shape)}")
        starts = [_document_starts(row) for row in pos]
        if any(len(s) > 1 for s in starts):
            if bsz != 1 or pos.shape[0] != 1:
                raise ValueError(
                    f"position_ids restart inside a row (a packed batch), but the batch has "
                    f"{bsz} rows: pack every document into one row (batch 1), as "
                    f"DataCollatorWithFlattening does")
            cu = check_cu_seqlens(starts[0] + [seq_len])
    given = _flattening_boundaries(batch, bsz, seq_len)
    if given is not None:
        if pos is not None and (cu or (0, seq_len)) != given:
            raise ValueError(f"the document boundaries of position_ids ({list(cu or (0, seq_len))}"
                             f") and of the collator's boundary keys ({list(given)}) differ")
        cu = given if len(given) > 2 else cu
    if cu is None and layout == "packed":
        raise ValueError("layout='packed' places documents: pass a packed row (position_ids "
                         "restarting at every document)")
    multiple = None if layout == "packed" else seq_multiple(layout, mesh.ring_degree,
                                                            mesh.ulysses_degree)
    if cu is None and seq_len % multiple:
        if bsz != 1:
            raise ValueError(
                f"input_ids has seq_len={seq_len}, but layout={layout!r} over ring_degree="
                f"{mesh.ring_degree} x ulysses_degree={mesh.ulysses_degree} needs a multiple "
                f"of {multiple} for a batch of {bsz} rows: pad or crop the sequences to a "
                f"multiple of {multiple}, or pass one row at a time (a single row takes any "
                f"length)")
        cu = (0, seq_len)       # one document: the layout adds inert padding slots
    if pos is None:
        pos = torch.arange(seq_len, device=ids.device).unsqueeze(0)
    # The next token's label, never across a document end.
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    for start in (cu or (0,))[1:-1]:
        shifted[:, start - 1] = IGNORE_INDEX
    return ids, pos, shifted, cu


def shard_batch(batch: dict, mesh, layout: str = "zigzag") -> dict:
    """This rank's part of a full batch, ready for a causal LM.

    ``batch``: ``input_ids`` [B, S] (the whole sequences, the same on every rank of the SP
    group), optionally ``labels`` [B, S] (default: ``input_ids``; -100 = ignore), an
    ``attention_mask`` that must be all ones (padding is not supported) and ``position_ids``
    [B or 1, S] (default: 0..S-1).

    *Packed batches*: ``position_ids`` that restart (at 0, as transformers'
    ``DataCollatorWithFlattening`` makes them) mark document boundaries; so do the keys that
    collator adds with ``return_flash_attn_kwargs=True`` (``cu_seq_lens_q/k``,
    ``max_length_q/k``) or ``return_seq_idx=True`` (``seq_idx``), which must agree with the
    position ids where both are given (they are consumed: the result carries the boundaries
    as ``distattn_cu_seqlens``). Such a batch must be
    one row (B = 1; any length S); labels may hold -100 at document starts. The result then
    also holds ``distattn_cu_seqlens`` (the global boundaries, a tuple), which the registered
    attention uses so that no token attends across documents, and no label crosses a
    document end. A single row takes any length S (as one document, with inert padding slots
    where the layout needs them); a batch of several rows needs S to be a multiple of what
    the mesh and layout need.

    Returns ``{"input_ids", "position_ids", "shift_labels"}`` (+ ``distattn_cu_seqlens``),
    each [B, S_local]: this rank's tokens, their positions (for RoPE), and the label of the
    *next* token of the same document, computed on the full sequence before sharding (so the
    prediction across a shard boundary is kept; -100 for a document's last token and for
    padding slots). Every key but ``shift_labels`` is a model input:
    ``model(**{k: v for k, v in local.items() if k != "shift_labels"})``. Every rank of the
    mesh calls it: the ranks agree on the batch's shapes, the layout and the boundaries (one
    small host collective, ``distattn.agree``), so a rank holding another batch or layout
    raises on every rank instead of training on other tokens.
    """
    mesh = as_mesh(mesh)
    try:
        ids, pos, shifted, cu = _read_batch(batch, mesh, layout)
    except Exception as exc:      # raised on every rank of the mesh
        agree_preparation(mesh, "dtf.shard_batch", {}, exc)
    agree_preparation(mesh, "dtf.shard_batch", dict(
        input_ids=ids, position_ids=pos, labels=shifted, layout=layout, cu_seqlens=cu))
    bsz, seq_len = ids.shape
    part = lambda t: take_shard(t, mesh, 1, layout, cu).contiguous()
    shift_labels = part(shifted)
    if cu is not None:
        padding = local_indices(seq_len, mesh, layout, cu) < 0
        shift_labels[:, padding.to(shift_labels.device)] = IGNORE_INDEX
    local = {
        "input_ids": part(ids),
        "position_ids": part(pos.expand(bsz, -1)),
        "shift_labels": shift_labels,
    }
    if cu is not None:
        local[CU_SEQLENS_KEY] = cu
    return local


def sp_loss(logits: torch.Tensor, shift_labels: torch.Tensor, mesh) -> torch.Tensor:
    """The single-device token-mean next-token cross entropy, from sharded logits.

    ``logits`` [B, S_local, V] (any float dtype; the loss is computed in float32) and
    ``shift_labels`` [B, S_local] from ``shard_batch`` (-100 = ignore). Returns a float32
    scalar: the mean over every labelled token of the global batch, bit-identical on every
    rank of the SP group (0 if no token is labelled). Its gradient on this rank is only this
    rank's share (local loss sum / global token count), so **summing a parameter's gradient
    over the SP group gives the single-device gradient**. One all-reduce of two numbers per
    mesh subgroup; every rank of the mesh must call it.

    With DDP/FSDP spanning the SP ranks too (the usual setup: every rank is a data-parallel
    rank, SP ranks of one replica see the same sequences), the wrapper *averages* gradients
    over all ``dp * sp`` ranks; backpropagate ``loss * mesh.size`` to turn that average into
    the mean over data-parallel replicas of the summed SP gradients.

    Before any communication it raises ``UnsupportedModelError`` unless the model's latest
    forward ran distattn's attention function on every decoder layer: a model whose attention
    never reaches distattn (its family computes attention in its own modules, or the model is
    not set to the registered ``attn_implementation``) would otherwise train silently on each
    rank's tokens alone. Call it once per forward (the same logits twice is fine).
    """
    mesh = as_mesh(mesh)
    if logits.dim() != 3:
        raise ValueError(f"logits must be [batch, seq_local, vocab], got {tuple(logits.shape)}")
    if shift_labels.shape != logits.shape[:2]:
        raise ValueError(f"shift_labels {tuple(shift_labels.shape)} must match logits' "
                         f"[batch, seq_local] {tuple(logits.shape[:2])}")
    _REACHED.check(logits)      # the model's attention ran through distattn (no communication)
    local_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                shift_labels.reshape(-1).to(logits.device),
                                ignore_index=IGNORE_INDEX, reduction="sum")
    count = (shift_labels != IGNORE_INDEX).sum()
    stats = torch.stack([local_sum.detach().double(), count.to(local_sum.device).double()])
    sp_all_reduce(stats, mesh)
    total, n = stats[0].float(), stats[1].clamp(min=1).float()
    # value: global sum / global count (identical everywhere); gradient: local part only.
    return total / n + (local_sum - local_sum.detach()) / n


def checkpoint_layers(model) -> "torch.nn.Module":
    """Enable rematerialization-aware activation checkpointing on every decoder layer of a
    transformers model (every ``GradientCheckpointingLayer``; see
    ``distattn.integrations.checkpoint``).

    Like ``model.gradient_checkpointing_enable()`` it applies in training mode only, but the
    recomputation in backward reuses each layer's saved attention output and lse, so the
    distributed attention forward and its communication run once per step. Extra memory over
    plain checkpointing: one attention output and one float32 lse per layer. Layers whose
    attention is not the registered distattn function are checkpointed plainly. Returns
    ``model``.
    """
    _transformers()
    from transformers.modeling_layers import GradientCheckpointingLayer

    prepare(model)      # the model guard: refuse what SP cannot train exactly
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no GradientCheckpointingLayer (decoder "
                         f"layers); wrap layers with "
                         f"distattn.integrations.checkpoint.checkpoint_module instead")
    for layer in layers:
        slot = _ckpt.install_slot(layer)
        layer._gradient_checkpointing_func = _RematCheckpoint(slot)
        layer.gradient_checkpointing = True
    return model


class _RematCheckpoint:
    """The per-layer ``_gradient_checkpointing_func`` transformers calls as
    ``func(partial(forward, layer, **kwargs), *args)``."""

    def __init__(self, slot):
        self.slot = slot

    def __call__(self, function, *args, **kwargs):
        return _ckpt.checkpoint_with_remat(function, *args, slot=self.slot, **kwargs)

