"""Inference over a sequence-parallel prompt: a sharded KV cache, prefill, chunks and decode.

docs/INFERENCE.md explains the design; this is the short version.

**Cache placement.** Every rank of the SP group keeps the K/V of *its own tokens*, with all
K/V heads, for every layer. A token's K/V never exist anywhere else, so the cache holds each
token exactly once and each rank holds about 1/P of it:

- tokens that arrive *sharded* (a prompt, or a chunk of one) stay with the rank that computed
  them: the ``layout`` share of the chunk (``distattn.shard``'s rule, after padding the chunk
  to the length the layout needs; padding slots are never stored);
- tokens that arrive *replicated* (decoding: every rank runs the model on the same new token)
  go, one by one, to the rank that holds the fewest tokens (ties: the lowest mesh index
  ``r * U + u``).

Every rank knows how many tokens every rank holds (``counts``): both rules are deterministic
functions of the lengths, evaluated identically everywhere, with no communication.

**Steps.** Tokens enter the cache in steps. ``begin_sharded(n)`` or ``begin_replicated(n)``
opens one; the model then calls ``attend(layer, q, k, v)`` once per layer; after the last
layer the step closes and ``seq_len`` grows by n. Inside a step the n new tokens attend,
causally, to every cached token and to each other:

- ``pass_kv`` (sharded): the new tokens attend to themselves with ``dist_flash_attn`` (the
  core's ring / Ulysses / USP, exactly as in training) and to the cached tokens, whose K/V
  are all-gathered in a few pieces (at most ``CACHE_PIECES`` per layer, each at least the
  chunk's local length: the transient memory is the larger of the chunk's own K/V and
  1/CACHE_PIECES of the cache). The queries stay put; the K/V move.
- ``pass_q`` (sharded): the new queries are all-gathered; every rank attends all of them to
  its own tokens (cached and new); the partial (out, lse) go back to the owners of the
  queries (all-to-all) and merge exactly. The K/V stay put; the queries move.
- replicated (decoding): every rank already has all new queries; each attends them to its own
  tokens and the partial (out, lse) merge across the group (all-gather). The messages are
  ``B * n * Hq * (D + 1)`` numbers, whatever the context length.

``choose_strategy`` picks pass-KV or pass-Q for a sharded step from the number of new and
cached tokens (the one that sends fewer bytes); an empty cache (a prompt) is always pass-KV.

Collectives run over the mesh's Ulysses group and then its ring group (its only group of all
ranks is reserved for ``distattn.agree``); merges use ``distattn.merge.merge_`` in a fixed
order, so every rank computes bit-identical replicated outputs. ``attend`` checks its
arguments before any communication and agrees on them across ranks like ``dist_flash_attn``
(``distattn.agree``). Everything here is inference only (no autograd).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .agree import check_agreement, fail_everywhere, mark_failed
from .attention import DTYPES, dist_flash_attn
from .attention import _check_sinks as check_sinks
from .attention import _check_softcap as check_softcap
from .attention import _check_window as check_window
from .comm import all_to_all
from .kernels import BACKENDS, Mask, accumulation_dtype, get_backend
from .layout import _all_gather, local_indices, seq_multiple
from .merge import merge_, new_accumulators
from .packing import unpack
from .mesh import as_mesh
from .segments import check_chunk_origin, check_chunk_size
from .sinks import fold_sinks_
from .ulysses import check_heads

STRATEGIES = ("auto", "pass_kv", "pass_q")
LAYOUTS = ("zigzag", "contiguous", "stripe")
# pass-KV all-gathers the cached K/V of a layer in at most this many pieces per rank
CACHE_PIECES = 8


# ---------------------------------------------------------------------------------------------
# the pass-KV / pass-Q rule
# ---------------------------------------------------------------------------------------------
def choose_strategy(n_new: int, n_cached: int, hq: int, hkv: int, head_dim: int,
                    elem_bytes: int, acc_bytes: int) -> str:
    """"pass_kv" or "pass_q" for a sharded step of ``n_new`` tokens over ``n_cached`` cached
    ones: the strategy whose messages are smaller. Per rank, both send a fraction (P-1)/P of:

    - pass-KV: the K and V of every token, cached and new: ``(n_cached + n_new) * 2 * Hkv * D``
      elements of ``elem_bytes``;
    - pass-Q: the new queries, ``n_new * Hq * D`` elements of ``elem_bytes``, and their partial
      results coming back, ``n_new * Hq * (D + 1)`` numbers of ``acc_bytes`` (out and lse).

    So pass-Q wins when ``n_new / (n_new + n_cached)`` is below
    ``2 Hkv D e / (Hq (D e + (D + 1) a))`` (about Hkv/Hq in fp32): few new tokens over a long
    cache (a follow-up turn), or GQA with few K/V heads. An empty cache is always pass-KV
    (the plain ring prefill). Ties go to pass-KV, whose compute is the core's ring."""
    if n_cached == 0:
        return "pass_kv"
    kv_bytes = (n_cached + n_new) * 2 * hkv * head_dim * elem_bytes
    q_bytes = n_new * hq * (head_dim * elem_bytes + (head_dim + 1) * acc_bytes)
    return "pass_q" if q_bytes < kv_bytes else "pass_kv"


# ---------------------------------------------------------------------------------------------
# collectives over the whole mesh
# ---------------------------------------------------------------------------------------------
class MeshCollectives:
    """The collectives inference needs over all P ranks of a mesh, run on its two subgroups.

    ``bytes_sent`` counts the payload this rank sends (an all-gather sends its tensor to each
    of the other ranks of the group, an all-to-all sends all but its own part), so benchmarks
    can report the communication per step. Every rank of the mesh must make the same calls.
    """

    def __init__(self, mesh):
        self.mesh = mesh
        self.bytes_sent = 0

    def _groups(self):
        m = self.mesh
        return (("ulysses", m.ulysses_group, m.ulysses_degree),
                ("ring", m.ring_group, m.ring_degree))

    def gather(self, x: torch.Tensor, which: str) -> torch.Tensor:
        """[world, *x.shape]: ``x`` of every rank of the ``which`` ("ulysses" or "ring")
        group, in group-rank order."""
        _, group, world = next(g for g in self._groups() if g[0] == which)
        self.bytes_sent += x.numel() * x.element_size() * (world - 1)
        return torch.stack(_all_gather(x.contiguous(), group, world))

    def gather_all(self, x: torch.Tensor) -> torch.Tensor:
        """[R, U, *x.shape]: ``x`` of rank (u, r) at [r, u], for every rank of the mesh."""
        return self.gather(self.gather(x, "ulysses"), "ring")

    def exchange(self, x: torch.Tensor, which: str) -> torch.Tensor:
        """All-to-all over the ``which`` group: ``x`` is [world, ...] with part i for group rank
        i; returns [world, ...] with part i from group rank i."""
        _, group, world = next(g for g in self._groups() if g[0] == which)
        self.bytes_sent += x.numel() * x.element_size() * (world - 1) // world
        return all_to_all(x.contiguous(), group, world, scatter_dim=0, gather_dim=0,
                          what=f"inference all-to-all of pass-Q partial results ({which})")


@contextmanager
def count_sent_bytes():
    """Measure what this process sends through torch.distributed inside the ``with`` block
    (for benchmarks and tests): yields ``{"calls": n, "bytes": b}``, filled as collectives
    run. Counted: all-gather (the input, to every other rank of the group), all-to-all (the
    parts for other ranks), all-reduce and broadcast (the tensor), ``send`` and the sends of
    ``batch_isend_irecv`` (a bare ``isend`` is not seen). The
    functions of ``torch.distributed`` are wrapped for the duration of the block only."""
    stats = {"calls": 0, "bytes": 0}
    nbytes = lambda t: t.numel() * t.element_size()
    others = lambda group: dist.get_world_size(group) - 1
    isend = dist.isend
    sent = {
        "all_gather": lambda out, t, group=None, **_: nbytes(t) * others(group),
        "all_gather_into_tensor": lambda out, t, group=None, **_: nbytes(t) * others(group),
        "all_to_all_single": lambda out, t, *a, group=None, **_:
            nbytes(t) * others(group) // (others(group) + 1),
        "all_reduce": lambda t, *a, **_: nbytes(t),
        "broadcast": lambda t, *a, **_: nbytes(t),
        "send": lambda t, *a, **_: nbytes(t),
        # (isend itself stays unwrapped: P2POp insists on the real function)
        "batch_isend_irecv": lambda ops: sum(nbytes(op.tensor) for op in ops
                                             if op.op is isend),
    }
    originals = {name: getattr(dist, name) for name in sent}

    def wrapped(name):
        def call(*args, **kwargs):
            stats["calls"] += 1
            stats["bytes"] += sent[name](*args, **kwargs)
            return originals[name](*args, **kwargs)
        return call

    for name in sent:
        setattr(dist, name, wrapped(name))
    try:
        yield stats
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


# ---------------------------------------------------------------------------------------------
# small helpers: packed partial results, per-layer buffers, token runs
# ---------------------------------------------------------------------------------------------
def _pack(out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """(out [B, S, H, D], lse [B, H, S]) -> one [B, S, H, D+1] tensor (lse last), so a partial
    result travels in one message."""
    return torch.cat([out, lse.transpose(1, 2).unsqueeze(-1).to(out.dtype)], dim=-1)


def _merge_stack(parts: torch.Tensor) -> torch.Tensor:
    """Merge packed partials [N, B, S, H, D+1] over disjoint key sets, in index order, with
    ``merge_``; returns the packed result [B, S, H, D+1]."""
    acc = parts[0].clone()
    out, lse = acc[..., :-1], acc[..., -1].transpose(1, 2)   # views: merge_ writes into acc
    for p in parts[1:]:
        merge_(out, lse, p[..., :-1], p[..., -1].transpose(1, 2))
    return acc


def _runs(offsets: list[int]) -> list[tuple[int, int, int]]:
    """Maximal runs of consecutive values in ascending ``offsets``, as (index of the run's
    first element, its value, length)."""
    runs = []
    for i, o in enumerate(offsets):
        if runs and o == runs[-1][1] + runs[-1][2]:
            first, start, length = runs[-1]
            runs[-1] = (first, start, length + 1)
        else:
            runs.append((i, o, 1))
    return runs


class _LayerKV:
    """This rank's K/V of one layer: a growable buffer of which the first ``length`` tokens
    are used, in the order they were stored: [2, B, capacity, Hkv, D] (K at 0, V at 1), or
    with V's head dim Dv != D (MLA) [1, B, capacity, Hkv, D + Dv] (``packing``: K then V on
    the last dim, no padding). ``unpack(view, dims)`` gives K and V."""

    def __init__(self):
        self.buf = None
        self.length = 0
        self.dims = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        n = k.shape[1]
        dims = (k.shape[-1], v.shape[-1])
        if self.dims is not None and dims != self.dims:
            raise ValueError(f"k/v head dims {dims} differ from the cache's {self.dims}")
        self.dims = dims
        if self.buf is None or self.length + n > self.buf.shape[2]:
            need = self.length + n
            # grow by a quarter: a decode step copies the shard only now and then
            cap = need if self.buf is None else max(need, self.buf.shape[2] * 5 // 4 + 1)
            b, _, h, _ = k.shape
            shape = (2, b, cap, h, dims[0]) if dims[0] == dims[1] else (1, b, cap, h, sum(dims))
            new = torch.empty(shape, dtype=k.dtype, device=k.device)
            if self.buf is not None:
                new[:, :, :self.length] = self.buf[:, :, :self.length]
            self.buf = new
        if n:
            bk, bv = unpack(self.buf[:, :, self.length:self.length + n], dims)
            bk.copy_(k)
            bv.copy_(v)
        self.length += n

    def view(self) -> torch.Tensor:
        return self.buf[:, :, :self.length]

    def nbytes(self, used: bool = False) -> int:
        if self.buf is None:
            return 0
        per_token = self.buf[:, :, :1].numel() * self.buf.element_size()
        return per_token * (self.length if used else self.buf.shape[2])


@dataclass
class Step:
    """One open step (see the module docstring). Offsets are token indices within the step
    (global position = ``start + offset``); slots >= ``n_new`` of a sharded step are padding.

    - ``kind``: "pass_kv", "pass_q" or "replicated";
    - ``local_slots``: the length of dimension 1 of the q/k/v this rank passes to ``attend``;
    - ``keep``: indices (into this rank's q/k/v) of the tokens this rank stores;
    - ``own_offsets``: their offsets, ascending;
    - ``counts_before``: tokens per rank [R][U] before the step;
    - sharded steps only: ``slot_offsets`` [R, U, local_slots], the offsets of every rank's
      slots, and ``slots``, this rank's row of it.
    """
    kind: str
    start: int
    n_new: int
    local_slots: int
    keep: torch.Tensor
    own_offsets: list
    counts_before: list
    slot_offsets: torch.Tensor | None = None
    slots: torch.Tensor | None = None
    done: set = field(default_factory=set)
    window_keys: dict = field(default_factory=dict)   # window left -> local keys it shows

    @property
    def positions(self) -> torch.Tensor:
        """Global positions of this rank's q/k/v tokens (padding slots included), e.g. for
        RoPE position ids: sharded steps, ``start + slot offset``; replicated, all new ones."""
        if self.slots is None:
            return torch.arange(self.start, self.start + self.n_new)
        return self.start + self.slots

    def shard(self, x: torch.Tensor, dim: int = 1, pad_value=0) -> torch.Tensor:
        """This rank's slots of the step's full input ``x`` (the ``n_new`` new tokens on
        ``dim``, the same on every rank), padding slots filled with ``pad_value``. For a
        replicated step that is ``x`` itself."""
        dim = dim % x.dim()
        if x.shape[dim] != self.n_new:
            raise ValueError(f"x has {x.shape[dim]} tokens on dim {dim}, the step has "
                             f"{self.n_new}")
        if self.slots is None:
            return x
        shape = list(x.shape)
        shape[dim] = self.slot_offsets.numel() - self.n_new
        padded = torch.cat([x, torch.full(shape, pad_value, dtype=x.dtype, device=x.device)],
                           dim=dim)
        return padded.index_select(dim, self.slots.to(x.device))


@dataclass
class _Call:
    """One ``attend`` call's settings: softmax scale, window (and its left reach when it hides
    something), softcap (0: off), sinks, and the layer and backend."""
    scale: float
    window: tuple | None
    left: int | None
    softcap: float
    sinks: torch.Tensor | None
    layer: int = 0
    backend: object = None


# ---------------------------------------------------------------------------------------------
# the cache
# ---------------------------------------------------------------------------------------------
class ShardedKVCache:
    """The K/V cache of a ``num_layers`` model, sharded over ``mesh`` (see the module
    docstring for placement and steps).

    ``layout``: how sharded steps split their tokens ("zigzag", "contiguous" or "stripe"; the
    same meaning as in ``distattn.shard``). ``backend``: the block-attention backend of the
    local attention and of ``dist_flash_attn`` ("auto", "torch", "reference", "cuda").

    Usage, per step (every rank of the mesh, in the same order)::

        step = cache.begin_sharded(n_new)         # a prompt or a chunk: step.shard(ids),
                                                  # step.positions are this rank's tokens
        for layer in range(num_layers):
            out = cache.attend(layer, q, k, v)    # q [B, step.local_slots, Hq, D], k/v Hkv
        step = cache.begin_replicated(1)          # decoding: every rank, the same token
        ...

    State: ``seq_len`` (tokens cached), ``counts`` (tokens per rank, [R][U]), ``work``
    (queries this rank computed and steps it opened, sharded and replicated),
    ``local_positions`` (global positions of this rank's tokens, in storage order),
    ``comm.bytes_sent``. Tensors are fixed by the first ``attend`` (batch, heads, head_dim,
    dtype, device); later calls must match.
    """

    def __init__(self, mesh, num_layers: int, *, layout: str = "zigzag",
                 backend: str = "auto"):
        self.mesh = as_mesh(mesh)
        if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1:
            raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS} (the layouts of one sequence; "
                             f"'packed' places documents), got {layout!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.num_layers = num_layers
        self.layout = layout
        self.backend = backend
        self.comm = MeshCollectives(self.mesh)
        self.seq_len = 0
        self.counts = [[0] * self.mesh.ulysses_degree for _ in range(self.mesh.ring_degree)]
        self.step: Step | None = None
        # Work this rank did, per kind of step: queries computed and steps opened (a
        # caller's check that a prompt was prefilled sharded once and never re-fed).
        self.work = {"sharded_queries": 0, "sharded_steps": 0, "replicated_queries": 0,
                     "replicated_steps": 0}
        self._layers = [_LayerKV() for _ in range(num_layers)]
        self._positions: list[torch.Tensor] = []
        self._meta = None       # (B, Hq, Hkv, D, dtype, device) after the first attend
        self._broken = None     # why the cache is unusable (a step failed half-way)

    # -- introspection -------------------------------------------------------------------------
    @property
    def local_len(self) -> int:
        """Tokens this rank holds (in every layer, once a step is complete)."""
        m = self.mesh
        return self.counts[m.ring_rank][m.ulysses_rank]

    @property
    def local_positions(self) -> torch.Tensor:
        """Global positions of this rank's tokens, in the order they are stored (int64)."""
        if len(self._positions) != 1:    # steps append pieces; join them on the first read
            self._positions = [torch.cat(self._positions) if self._positions
                               else torch.zeros(0, dtype=torch.long)]
        return self._positions[0]

    def nbytes(self, used: bool = False) -> int:
        """Bytes of this rank's K/V buffers, all layers: allocated (buffers grow by a quarter
        when full), or with ``used=True`` only the tokens held."""
        return sum(layer.nbytes(used) for layer in self._layers)

    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (K, V) of ``layer``, [B, tokens, Hkv, D] each, in storage order."""
        store = self._layers[layer]
        return tuple(unpack(store.view(), store.dims))

    # -- opening steps ----------------------------------------------------------------------------
    def _check_can_begin(self, n_new) -> None:
        if self._broken:
            raise RuntimeError(f"this ShardedKVCache is unusable: {self._broken}; build a new "
                               f"one")
        if self.step is not None:
            missing = sorted(set(range(self.num_layers)) - self.step.done)
            raise RuntimeError(f"a step is still open (layers {missing} have not called "
                               f"attend); finish it before beginning another")
        if not isinstance(n_new, int) or isinstance(n_new, bool) or n_new < 1:
            raise ValueError(f"n_new must be a positive int (the number of new tokens), got "
                             f"{n_new!r}")

    def begin_sharded(self, n_new: int, strategy: str = "auto") -> Step:
        """Open a step of ``n_new`` tokens that arrive sharded over the mesh by the cache's
        layout: this rank computes the q/k/v of ``step.local_slots`` slots (``step.shard``
        picks them from the full input, ``step.positions`` are their global positions).
        ``strategy``: "pass_kv", "pass_q" or "auto" (``choose_strategy``). The first step of
        an empty cache (the prompt) needs at least as many tokens as the mesh has ranks."""
        self._check_can_begin(n_new)
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        P = self.mesh.size
        if self.seq_len == 0 and n_new < P:
            raise ValueError(
                f"the prompt has {n_new} tokens, fewer than the {P} ranks of the mesh: "
                f"sequence parallelism needs at least as many tokens as ranks. Use a longer "
                f"prompt or a smaller mesh")
        if strategy == "auto":
            strategy = self._auto_strategy(n_new)
        slot_offsets = self._chunk_slots(n_new)
        m = self.mesh
        mine = slot_offsets[m.ring_rank, m.ulysses_rank]
        keep = torch.nonzero(mine < n_new).flatten()
        before = [row[:] for row in self.counts]
        for r in range(m.ring_degree):
            for u in range(m.ulysses_degree):
                self.counts[r][u] += int((slot_offsets[r, u] < n_new).sum())
        step = Step(strategy, self.seq_len, n_new, mine.numel(), keep, mine[keep].tolist(),
                    before, slot_offsets, mine)
        return self._open(step)

    def begin_replicated(self, n_new: int = 1) -> Step:
        """Open a step of ``n_new`` tokens that every rank holds in full (decoding): each rank
        passes the q/k/v of all of them; the outputs come back on every rank, identical."""
        self._check_can_begin(n_new)
        before = [row[:] for row in self.counts]
        flat = [c for row in self.counts for c in row]          # mesh order r * U + u
        owners = []
        for _ in range(n_new):
            g = min(range(len(flat)), key=lambda i: (flat[i], i))
            flat[g] += 1
            owners.append(g)
        U = self.mesh.ulysses_degree
        self.counts = [flat[r * U:(r + 1) * U] for r in range(self.mesh.ring_degree)]
        me = self.mesh.ring_rank * U + self.mesh.ulysses_rank
        own = [i for i, g in enumerate(owners) if g == me]
        step = Step("replicated", self.seq_len, n_new, n_new, torch.tensor(own, dtype=torch.long),
                    own, before)
        return self._open(step)

    def _open(self, step: Step) -> Step:
        kind = "replicated" if step.kind == "replicated" else "sharded"
        self.work[f"{kind}_queries"] += step.n_new if kind == "replicated" else len(step.keep)
        self.work[f"{kind}_steps"] += 1
        self._positions.append(step.start + torch.tensor(step.own_offsets, dtype=torch.long))
        self.step = step
        return step

    def _auto_strategy(self, n_new: int) -> str:
        if self.seq_len == 0 or self._meta is None:
            return "pass_kv"
        _, hq, hkv, d, dtype, _ = self._meta
        elem = torch.finfo(dtype).bits // 8
        acc = torch.finfo(accumulation_dtype(dtype)).bits // 8
        return choose_strategy(n_new, self.seq_len, hq, hkv, d, elem, acc)

    def _chunk_slots(self, n_new: int) -> torch.Tensor:
        """[R, U, n_pad / P] offsets of every rank's slots for a chunk of ``n_new`` tokens:
        the chunk is padded at its end to the length the layout needs, then sharded like
        ``distattn.shard`` does. Padding sits after every real token of the chunk, so under
        causal attention no real token sees it; its K/V are never stored."""
        m = self.mesh
        multiple = seq_multiple(self.layout, m.ring_degree, m.ulysses_degree)
        n_pad = math.ceil(n_new / multiple) * multiple
        return torch.stack([
            torch.stack([local_indices(n_pad, dataclasses.replace(m, ring_rank=r,
                                                                  ulysses_rank=u), self.layout)
                         for u in range(m.ulysses_degree)])
            for r in range(m.ring_degree)])

    # -- attention ---------------------------------------------------------------------------------
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
               softmax_scale: float | None = None, window=None, softcap: float | None = None,
               sinks: torch.Tensor | None = None, chunk_size: int | None = None,
               chunk_origin: str = "row") -> torch.Tensor:
        """Store this layer's new K/V and return the new tokens' attention output.

        q [B, step.local_slots, Hq, D]; k, v [B, step.local_slots, Hkv, D] (Hq % Hkv == 0):
        the step's tokens as this rank holds them (sharded: its slots, padding included;
        replicated: all new tokens). Returns out [B, step.local_slots, Hq, D] in q's dtype:
        causal softmax attention of each new token over every cached token and the new
        tokens up to itself (padding slots: zeros). Every rank of the mesh must call it for
        the same layer. Arguments are checked before any communication.

        Variants, as in ``dist_flash_attn``: ``window=(left, right)`` (a query at position p
        sees keys from p - left; with causal attention ``right`` changes nothing),
        ``softcap``, and ``sinks`` [Hq] (one extra logit per head, attached to no value).
        A window is supported where it is exact without per-token masks: on the prompt (a
        sharded step of an empty cache) and on one-token replicated steps (decoding); on
        other steps it raises NotImplementedError unless it hides nothing there.
        ``chunk_size`` (chunked attention, as in ``dist_flash_attn``) is accepted where it
        hides nothing: while the cache plus the step's tokens fit in the first chunk. A step
        that would cross a chunk boundary raises NotImplementedError (on every rank, before
        any communication): chunked decoding is not implemented."""
        name = f"ShardedKVCache.attend (layer {layer})"
        try:
            step = self._check_attend(layer, q, k, v)
            call = self._check_variant(step, q, softmax_scale, window, softcap, sinks)
            self._check_chunks(step, chunk_size, chunk_origin)
            call.backend = get_backend(self.backend, q, k, v, softcap=call.softcap > 0)
            call.layer = layer
        except Exception as exc:   # raises it on every rank, at once
            fail_everywhere(self.mesh, name, exc)
        # Ranks must agree on what they send, and that no rank failed (see distattn.agree).
        check_agreement(self.mesh, name, dict(
            kind=step.kind, n_new=step.n_new, q=q, k=k, v=v, scale=call.scale,
            window=call.window, softcap=call.softcap, sinks=call.sinks))
        try:
            with torch.no_grad():
                if step.kind == "pass_kv":
                    out = self._attend_pass_kv(q, k, v, call)
                elif step.kind == "pass_q":
                    out = self._attend_pass_q(q, k, v, call)
                else:
                    out = self._attend_replicated(q, k, v, call)
        except BaseException as exc:
            self._broken = f"layer {layer} of a {step.kind} step failed ({exc!r})"
            if self.mesh.size > 1:
                mark_failed(self.mesh, name, exc)
            raise
        step.done.add(layer)
        if len(step.done) == self.num_layers:
            self.seq_len += step.n_new
            self.step = None
        return out

    @staticmethod
    def _check_chunks(step, chunk_size, chunk_origin) -> None:
        chunk_size = check_chunk_size(chunk_size)
        check_chunk_origin(chunk_origin)     # one sequence: both origins agree
        total = step.start + step.n_new
        if chunk_size is not None and total > chunk_size:
            raise NotImplementedError(
                f"chunked attention (chunk_size={chunk_size}) over {total} tokens is not "
                f"supported by ShardedKVCache: the cache runs it only while every token fits "
                f"in the first chunk. Keep prompt + generated tokens <= {chunk_size}, or "
                f"generate with one process")

    def _check_variant(self, step, q, softmax_scale, window, softcap, sinks) -> "_Call":
        scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
        if (not isinstance(scale, (int, float)) or isinstance(scale, bool)
                or not math.isfinite(scale) or scale <= 0):
            raise ValueError(f"softmax_scale must be a positive finite float or None, got "
                             f"{softmax_scale!r}")
        window = check_window(window)
        left = None if window is None or window[0] < 0 else window[0]
        last = step.start + step.n_new - 1           # the step's last query position
        if left is not None and last <= left:
            left = window = None                     # every query sees every earlier token
        if left is not None and step.start > 0 and not (step.kind == "replicated"
                                                        and step.n_new == 1):
            raise NotImplementedError(
                f"a sliding window (left={left}) on a {step.kind} step of {step.n_new} tokens "
                f"over {step.start} cached ones is not supported: windows run on the prompt "
                f"and on one-token decode steps. Prefill the prompt in one step, or use a "
                f"window of at least {last} tokens")
        return _Call(float(scale), window, left, check_softcap(softcap) or 0.0,
                     check_sinks(sinks, q))
    def _check_attend(self, layer, q, k, v) -> Step:
        if self._broken:
            raise RuntimeError(f"this ShardedKVCache is unusable: {self._broken}")
        step = self.step
        if step is None:
            raise RuntimeError("no step is open: call begin_sharded or begin_replicated first")
        if not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be an int in [0, {self.num_layers}), got {layer!r}")
        if layer in step.done:
            raise ValueError(f"layer {layer} already attended in this step")
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                raise ValueError(f"{name} must be a 4-D tensor [batch, tokens, heads, head_dim]"
                                 f", got {getattr(t, 'shape', type(t).__name__)}")
            if t.dtype not in DTYPES:
                raise TypeError(f"{name} has dtype {t.dtype}; use float16, bfloat16, float32 "
                                f"or float64")
        if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
            raise TypeError("q, k and v must share one dtype and one device")
        (b, n, hq, d), (bk, nk, hkv, dk) = q.shape, k.shape
        if k.shape[:-1] != v.shape[:-1] or (bk, nk, dk) != (b, n, d):
            raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} "
                             f"must agree on batch, tokens and head_dim (k and v entirely, "
                             f"but for V's head dim, which may differ: MLA)")
        if hkv == 0 or hq % hkv:
            raise ValueError(f"q heads ({hq}) must be a multiple of k/v heads ({hkv})")
        if n != step.local_slots:
            raise ValueError(
                f"this {step.kind} step expects {step.local_slots} tokens per rank on dim 1, "
                f"got {n}" + (" (use step.shard to pick this rank's slots)"
                              if step.slot_offsets is not None else ""))
        meta = (b, hq, hkv, d, q.dtype, q.device)
        if self._meta is not None and meta != self._meta:
            raise ValueError(f"(batch, Hq, Hkv, head_dim, dtype, device) = {meta[:4]}, "
                             f"{meta[4]}, {meta[5]} differ from the cache's {self._meta[:4]}, "
                             f"{self._meta[4]}, {self._meta[5]}")
        if step.kind == "pass_kv" and self.mesh.ulysses_degree > 1:
            check_heads(hq, hkv, self.mesh.ulysses_degree)
        self._meta = meta
        return step

    def _attend_local(self, q_all, c_old, step, call):
        """Partial (out, lse) of the queries ``q_all`` (the step's new tokens in order, on
        every rank) over this rank's tokens: the cached ones (all visible) and its new ones
        (visible up to the query's own offset). With a window (one query, decoding) only
        the tokens at positions from ``start - left`` on are read."""
        store = self._layers[call.layer]
        kv, dims = store.view(), store.dims
        out, lse = new_accumulators(q_all, accumulation_dtype(q_all.dtype), dims[1])
        fold = functools.partial(call.backend.forward_into, out_acc=out, lse_acc=lse,
                                 scale=call.scale, softcap=call.softcap)
        if call.left is not None:
            if call.left not in step.window_keys:   # the same for every layer of the step
                lowest = step.start - call.left
                step.window_keys[call.left] = torch.nonzero(
                    self.local_positions >= lowest).flatten().to(kv.device)
            seen = step.window_keys[call.left]
            if seen.numel():
                keys = kv.index_select(2, seen)
                fold(q_all, *unpack(keys, dims), mask=Mask.none())
            return out, lse
        if c_old:
            fold(q_all, *unpack(kv[:, :, :c_old], dims), mask=Mask.none())
        for first, offset, length in _runs(step.own_offsets):
            rows = slice(c_old + first, c_old + first + length)
            # key j of the run is token `offset + j`: query i sees it iff offset + j <= i
            fold(q_all, *unpack(kv[:, :, rows], dims), mask=Mask.causal(-offset))
        return out, lse

    def _store(self, k, v, call) -> int:
        """Append this rank's share of the new K/V; returns the layer's length before."""
        store = self._layers[call.layer]
        c_old = store.length
        keep = self.step.keep.to(k.device)
        store.append(k.index_select(1, keep), v.index_select(1, keep))
        return c_old

    @staticmethod
    def _fold_sinks(packed, call) -> None:
        """Fold the sink logits into a packed final result, once (the merge is exact with
        them at any point; they must just not be counted twice)."""
        if call.sinks is not None:
            fold_sinks_(packed[..., :-1], packed[..., -1].transpose(1, 2), call.sinks)

    def _attend_replicated(self, q, k, v, call):
        c_old = self._store(k, v, call)
        packed = _pack(*self._attend_local(q, c_old, self.step, call))
        for which in ("ulysses", "ring"):   # merge over the Ulysses group, then the ring
            if self._degree(which) > 1:
                packed = _merge_stack(self.comm.gather(packed, which))
        self._fold_sinks(packed, call)
        return packed[..., :-1].to(q.dtype)

    def _attend_pass_q(self, q, k, v, call):
        step, m = self.step, self.mesh
        R, U, b, n_loc = m.ring_degree, m.ulysses_degree, q.shape[0], q.shape[1]
        # every rank gets all new queries, in offset order (padding slots dropped)
        slots = step.slot_offsets.reshape(-1)
        order = torch.argsort(slots)[:step.n_new].to(q.device)
        gathered = self.comm.gather_all(q)                      # [R, U, B, n_loc, Hq, D]
        q_all = gathered.permute(2, 0, 1, 3, 4, 5).reshape(b, R * U * n_loc, *q.shape[2:])
        q_all = q_all.index_select(1, order)
        c_old = self._store(k, v, call)
        packed = _pack(*self._attend_local(q_all, c_old, step, call))
        # rows for every rank's slots; padding slots get an empty partial (out 0, lse -inf)
        empty = torch.zeros_like(packed[:, :1])
        empty[..., -1] = float("-inf")
        rows = slots.clamp(max=step.n_new).to(q.device)
        send = torch.cat([packed, empty], dim=1).index_select(1, rows)
        send = send.reshape(b, R, U, n_loc, *send.shape[2:]).permute(1, 2, 0, 3, 4, 5)
        # send[r, u] holds the rows of rank (u, r). To the owners: over the ring first (each
        # rank then merges the R partials of its ring rank's rows), then over the Ulysses group.
        if R > 1:
            parts = self.comm.exchange(send, "ring")            # [R (from), U, B, n_loc, ...]
            mine = _merge_stack(parts.flatten(1, 2)).unflatten(0, (U, b))
        else:
            mine = send[0]                                      # [U, B, n_loc, Hq, D+1]
        if U > 1:
            mine = _merge_stack(self.comm.exchange(mine, "ulysses"))
        else:
            mine = mine[0]
        self._fold_sinks(mine, call)
        return mine[..., :-1].to(q.dtype)

    def _attend_pass_kv(self, q, k, v, call):
        step = self.step
        # the new tokens among themselves (and the sinks): the core's causal ring / USP
        out, lse = dist_flash_attn(q, k, v, mesh=self.mesh, causal=True, layout=self.layout,
                                   softmax_scale=call.scale, backend=self.backend,
                                   return_lse=True, window=call.window,
                                   softcap=call.softcap or None, sinks=call.sinks)
        c_old = self._store(k, v, call)
        if step.start > 0:
            acc = accumulation_dtype(q.dtype)
            out, lse = out.to(acc), lse.to(acc).contiguous()
            self._attend_cached_pieces(q, c_old, step.counts_before, out, lse, call)
        out = out.to(q.dtype)
        out[:, step.slots.to(q.device) >= step.n_new] = 0      # padding slots: no result
        return out

    def _attend_cached_pieces(self, q, c_old, counts, out, lse, call):
        """Fold the attention of ``q`` over every rank's cached tokens (``counts`` [R][U];
        this rank's are the first ``c_old`` of the layer) into (out, lse): the cached K/V are
        all-gathered in at most ``CACHE_PIECES`` pieces per rank, each at least ``q``'s local
        length (shorter shards padded, the padding cut off again using ``counts``). The
        gathered K/V of one piece are the transient memory: the larger of the new chunk's
        K/V and 1/CACHE_PIECES of the cache."""
        store = self._layers[call.layer]
        kv = store.view()[:, :, :c_old]      # [2, B, c_old, Hkv, D] (or packed: MLA)
        longest = max(max(row) for row in counts)
        piece = longest if self.mesh.size == 1 else max(q.shape[1],
                                                         -(-longest // CACHE_PIECES))
        for start in range(0, longest, piece):
            mine = kv[:, :, start:start + piece]
            if mine.shape[2] < piece:
                pad = torch.zeros(*mine.shape[:2], piece - mine.shape[2], *mine.shape[3:],
                                  dtype=mine.dtype, device=mine.device)
                mine = torch.cat([mine, pad], dim=2)
            gathered = self.comm.gather_all(mine)               # [R, U, 2, B, piece, Hkv, D]
            parts = [gathered[r, u, :, :, :min(piece, c - start)]
                     for r, row in enumerate(counts) for u, c in enumerate(row) if c > start]
            keys = torch.cat(parts, dim=2)
            call.backend.forward_into(q, *unpack(keys, store.dims), out, lse, scale=call.scale,
                                      mask=Mask.none(), softcap=call.softcap)

    def _degree(self, which: str) -> int:
        return self.mesh.ulysses_degree if which == "ulysses" else self.mesh.ring_degree
