"""Sequence layouts: which global tokens each rank holds (docs/DESIGN.md, "Layouts").

The global sequence (true length S; with ``cu_seqlens``, several packed documents) is first
split over the R ring ranks by the layout into *ring parts* of equal length ``part_len``; each
ring part is then split contiguously over the U Ulysses ranks. Slots a layout needs beyond the
real tokens are *padding*: ``shard`` fills them with zeros, ``unshard`` drops them, and the
attention never reads them (they see nothing and nothing sees them).

- ``contiguous``: ring rank r holds tokens [r*n, (r+1)*n) of the row;
- ``zigzag``: the row is cut into 2R chunks; ring rank r holds chunks r and 2R-1-r (early and
  late tokens together balance causal work);
- ``stripe``: token t lives on ring rank t mod R (rank r holds r, r+R, r+2R, ...);
- ``doc_contiguous`` / ``doc_zigzag`` (per-document; the layouts the data pipelines of
  ring-flash-attention's varlen functions, Transformer Engine THD and Megatron produce): every
  document is split over all R ring ranks on its own, in R contiguous parts (``doc_contiguous``)
  or in 2R chunks of which rank r holds r and 2R-1-r (``doc_zigzag``); a rank's part is its
  pieces of every document, in document order. A document whose length does not divide by R
  (2R) is padded at the end of its own pieces: each piece is ceil(L/R) (ceil(L/2R)) slots, the
  slots past the document's end are inert padding. So when every length divides, the local
  ``cu_seqlens`` of each rank is the global one divided by R (2R chunks: also by R). Without
  ``cu_seqlens`` they are ``contiguous`` / ``zigzag`` (one document);
- ``packed`` (needs ``cu_seqlens``; data-dependent): long documents are split zigzag-wise over
  every ring rank (each padded to a multiple of 2R), short documents stay whole on one rank,
  assigned to balance causal work. Whole documents never travel around the ring.

Documents only cut the masks of the first three layouts; ``packed`` also places tokens by them.
Without ``cu_seqlens`` the length must split evenly (no padding), as before; ``cu_seqlens=[0,
S]`` accepts any S.

A ring part is described by ``Segment`` runs: local slots [start, start+length) hold global
tokens g0, g0+stride, ..., all of one document. Masks between ring parts are derived from
segments (``distattn.segments``), so every layout and document set gets the same algebra.
"""
from __future__ import annotations

import functools
import heapq
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from .agree import check_agreement, failure_marks
from .comm import wait_all
from .documents import check_cu_seqlens, document_lengths, document_of
from .mesh import SPMesh, as_mesh

LAYOUTS = ("contiguous", "zigzag", "stripe", "packed", "doc_contiguous", "doc_zigzag")
# The per-document layouts and the one-sequence layout each equals for one document.
DOC_LAYOUTS = {"doc_contiguous": "contiguous", "doc_zigzag": "zigzag"}
# The busiest rank's causal work over the mean that ``packed`` accepts before it splits more
# documents, and likewise for tokens per rank (padding included).
PACKED_WORK_TOLERANCE = 1.03
PACKED_TOKEN_TOLERANCE = 1.05


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


@dataclass(frozen=True)
class Segment:
    """Local slots [start, start + length) of a ring part hold global tokens g0 + stride*i of
    document ``doc``."""
    start: int
    length: int
    g0: int
    stride: int
    doc: int

    @property
    def stop(self) -> int:
        return self.start + self.length


@dataclass(frozen=True)
class RingLayout:
    """Where every global token lives: ``parts[r]`` are ring rank r's segments (sorted by local
    start); every ring part has ``part_len`` slots, a multiple of the Ulysses degree."""
    layout: str
    seq_len: int
    ring_degree: int
    ulysses_degree: int
    cu_seqlens: Optional[tuple]
    part_len: int
    parts: tuple

    def __hash__(self) -> int:
        """Cheap and computed once (plans are cached by layout): the fields that fix the
        parts, not the parts themselves; equality still compares every field."""
        h = self.__dict__.get("_hash")
        if h is None:
            h = hash((self.layout, self.seq_len, self.ring_degree, self.ulysses_degree,
                      self.cu_seqlens, self.part_len, len(self.parts)))
            object.__setattr__(self, "_hash", h)
        return h

    @property
    def local_len(self) -> int:
        """Slots per rank: a ring part split over the Ulysses ranks."""
        return self.part_len // self.ulysses_degree

    def indices(self, ring_rank: int) -> torch.Tensor:
        """Global token of every slot of ring rank ``ring_rank``'s part (int64, CPU; -1 for
        padding)."""
        idx = torch.full((self.part_len,), -1, dtype=torch.int64)
        for s in self.parts[ring_rank]:
            idx[s.start:s.stop] = s.g0 + s.stride * torch.arange(s.length)
        return idx

    def local_indices(self, mesh: SPMesh) -> torch.Tensor:
        n = self.local_len
        return self.indices(mesh.ring_rank)[mesh.ulysses_rank * n:(mesh.ulysses_rank + 1) * n]

    def positions(self, ring_rank: int) -> torch.Tensor:
        """Position of every slot's token within its document (global index without
        documents); 0 for padding."""
        pos = torch.zeros(self.part_len, dtype=torch.int64)
        starts = self.cu_seqlens or (0,)
        for s in self.parts[ring_rank]:
            pos[s.start:s.stop] = s.g0 - starts[s.doc] + s.stride * torch.arange(s.length)
        return pos

    @property
    def has_padding(self) -> bool:
        return self.part_len * self.ring_degree != self.seq_len


# ---------------------------------------------------------------------------------------------
# building layouts
# ---------------------------------------------------------------------------------------------
def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def cut_by_documents(start: int, length: int, g0: int, stride: int, cu: tuple) -> list:
    """The run of ``length`` tokens g0, g0+stride, ... at local ``start``, cut where documents
    change."""
    segs, i = [], 0
    while i < length:
        g = g0 + stride * i
        doc = document_of(cu, g)
        end = cu[doc + 1]                       # first token of the next document
        n = min(length - i, -(-(end - g) // stride))
        segs.append(Segment(start + i, n, g, stride, doc))
        i += n
    return segs


def _runs_to_parts(runs_per_rank, cu) -> tuple:
    """[(start, length, g0, stride)] per rank -> segments per rank."""
    return tuple(tuple(seg for run in runs if run[1] > 0 for seg in cut_by_documents(*run, cu))
                 for runs in runs_per_rank)


def _regular_parts(layout: str, S: int, R: int, U: int, cu: tuple):
    """(part_len, runs per rank) of contiguous, zigzag and stripe for any length S."""
    if layout == "contiguous":
        n = _round_up(-(-S // R), U)
        return n, [[(0, max(0, min(n, S - r * n)), r * n, 1)] for r in range(R)]
    if layout == "zigzag":
        c = -(-S // (2 * R))
        chunk = lambda i: max(0, min(c, S - i * c))
        return _round_up(2 * c, U), [[(0, chunk(r), r * c, 1),
                                      (c, chunk(2 * R - 1 - r), (2 * R - 1 - r) * c, 1)]
                                     for r in range(R)]
    # stripe
    return _round_up(-(-S // R), U), [[(0, len(range(r, S, R)), r, R)] for r in range(R)]


def _packed_parts(S: int, R: int, U: int, cu: tuple):
    """(part_len, runs per rank) of the data-dependent ``packed`` layout."""
    lens = document_lengths(cu)
    work = [L * (L + 1) // 2 for L in lens]
    by_size = sorted(range(len(lens)), key=lambda d: (-lens[d], d))
    split_plan = functools.partial(_assign_whole, lens, work, by_size, R)
    # The fewest split documents (largest first) that balance work and tokens; "all split"
    # always balances work. Balance is not monotone in the number split (whole documents
    # pack unevenly), so small counts are tried one by one, larger ones by bisection.
    k = next((k for k in range(min(len(lens), 32) + 1) if split_plan(k)[0]), None)
    if k is None:
        lo, hi = 33, len(lens)
        while lo < hi:
            mid = (lo + hi) // 2
            if split_plan(mid)[0]:
                hi = mid
            else:
                lo = mid + 1
        k = lo
    _, owner = split_plan(k)
    split = sorted(by_size[:k])
    runs = [[] for _ in range(R)]
    pos = 0
    for d in split:                                  # the travelling region: same size on all
        c = -(-lens[d] // (2 * R))
        for r in range(R):
            for j, chunk in enumerate((r, 2 * R - 1 - r)):
                g = cu[d] + chunk * c
                runs[r].append((pos + j * c, max(0, min(c, cu[d + 1] - g)), g, 1))
        pos += 2 * c
    used = [pos] * R
    for d in sorted(owner):                          # whole documents, in global order
        r = owner[d]
        runs[r].append((used[r], lens[d], cu[d], 1))
        used[r] += lens[d]
    return _round_up(max(used), U), runs


def _per_document_parts(layout: str, R: int, U: int, cu: tuple):
    """(part_len, runs per rank) of ``doc_contiguous`` / ``doc_zigzag``: each document cut on
    its own into R pieces (or 2R chunks, rank r taking r and 2R-1-r) of ceil(L/R) (ceil(L/2R))
    slots, padded at the document's end; a rank's pieces follow each other in document order."""
    runs = [[] for _ in range(R)]
    pos = 0
    for d, L in enumerate(document_lengths(cu)):
        if layout == "doc_contiguous":
            n = -(-L // R)
            for r in range(R):
                runs[r].append((pos, max(0, min(n, L - r * n)), cu[d] + r * n, 1))
            pos += n
        else:
            c = -(-L // (2 * R))
            for r in range(R):
                for j, chunk in enumerate((r, 2 * R - 1 - r)):
                    runs[r].append((pos + j * c, max(0, min(c, L - chunk * c)),
                                    cu[d] + chunk * c, 1))
            pos += 2 * c
    return _round_up(pos, U), runs


def _assign_whole(lens, work, by_size, R, k):
    """Split the k largest documents; give the others whole to ranks, largest first, each to
    the rank with the least causal work (then fewest tokens). Returns (balanced, owner)."""
    split = by_size[:k]
    split_tokens = sum(2 * -(-lens[d] // (2 * R)) for d in split)
    split_work = sum(work[d] for d in split) / R
    heap = [(split_work, split_tokens, r) for r in range(R)]
    owner = {}
    for d in by_size[k:]:
        w, t, r = heapq.heappop(heap)
        owner[d] = r
        heapq.heappush(heap, (w + work[d], t + lens[d], r))
    loads = [(w, t) for w, t, _ in heap]
    mean_w = sum(w for w, _ in loads) / R
    mean_t = sum(t for _, t in loads) / R
    balanced = (max(w for w, _ in loads) <= PACKED_WORK_TOLERANCE * mean_w and
                max(t for _, t in loads) <= PACKED_TOKEN_TOLERANCE * mean_t)
    return balanced, owner


def seq_multiple(layout: str, ring_degree: int, ulysses_degree: int) -> int:
    """Without ``cu_seqlens`` the global length must be a multiple of this: each ring part
    (S/R tokens; two equal chunks for zigzag) must split evenly over U ranks."""
    check_layout(layout)
    if layout == "packed":
        raise ValueError("layout='packed' places documents and needs cu_seqlens")
    layout = DOC_LAYOUTS.get(layout, layout)      # one document: the one-sequence layout
    per_part = math.lcm(2, ulysses_degree) if layout == "zigzag" else ulysses_degree
    return ring_degree * per_part


def check_seq_len(seq_len: int, layout: str, ring_degree: int, ulysses_degree: int,
                  arg: str = "seq_len") -> None:
    m = seq_multiple(layout, ring_degree, ulysses_degree)
    if seq_len % m:
        raise ValueError(
            f"{arg}={seq_len} cannot be split by layout={layout!r} over ring_degree="
            f"{ring_degree} x ulysses_degree={ulysses_degree} without padding: it must be a "
            f"multiple of {m}. Pass cu_seqlens=[0, {seq_len}] to accept any length (inert "
            f"padding slots are added), or pad the sequence yourself")


@functools.lru_cache(maxsize=64)
def _ring_layout(layout: str, seq_len: int, R: int, U: int, cu: Optional[tuple]) -> RingLayout:
    docs = cu if cu is not None else (0, seq_len)
    if layout == "packed":
        part_len, runs = _packed_parts(seq_len, R, U, docs)
    elif layout in DOC_LAYOUTS:
        part_len, runs = _per_document_parts(layout, R, U, docs)
    else:
        part_len, runs = _regular_parts(layout, seq_len, R, U, docs)
    return RingLayout(layout, seq_len, R, U, cu, part_len, _runs_to_parts(runs, docs))


def ring_layout(layout: str, seq_len: int, ring_degree: int, ulysses_degree: int,
                cu_seqlens=None) -> RingLayout:
    """The layout of a global sequence of ``seq_len`` tokens (pure; cached)."""
    check_layout(layout)
    cu = check_cu_seqlens(cu_seqlens)
    if cu is None:
        check_seq_len(seq_len, layout, ring_degree, ulysses_degree)
    elif cu[-1] != seq_len:
        raise ValueError(f"cu_seqlens ends at {cu[-1]}, but the sequence has {seq_len} tokens; "
                         f"the last entry of cu_seqlens is the true global length")
    return _ring_layout(layout, seq_len, ring_degree, ulysses_degree, cu)


def layout_for(mesh: SPMesh, layout: str, cu_seqlens) -> Optional[RingLayout]:
    """The layout of the documents in ``cu_seqlens`` over ``mesh``, or None without them."""
    cu = check_cu_seqlens(cu_seqlens)
    if cu is None:
        return None
    return ring_layout(layout, cu[-1], mesh.ring_degree, mesh.ulysses_degree, cu)


# ---------------------------------------------------------------------------------------------
# the public functions
# ---------------------------------------------------------------------------------------------
def ring_part_indices(seq_len: int, ring_degree: int, ring_rank: int, layout: str,
                      cu_seqlens=None) -> torch.Tensor:
    """Global token indices held by ring rank ``ring_rank``, in local order (int64, CPU; -1
    marks a padding slot)."""
    return ring_layout(layout, seq_len, ring_degree, 1, cu_seqlens).indices(ring_rank)


def local_indices(seq_len: int, mesh: SPMesh, layout: str, cu_seqlens=None) -> torch.Tensor:
    """Global token indices held by this rank (int64, CPU; -1 marks a padding slot)."""
    return ring_layout(layout, seq_len, mesh.ring_degree, mesh.ulysses_degree,
                       cu_seqlens).local_indices(mesh)


def _check_length(x: torch.Tensor, dim: int, cu: Optional[tuple]) -> None:
    if cu is not None and x.shape[dim] != cu[-1]:
        raise ValueError(f"cu_seqlens ends at {cu[-1]} but x has {x.shape[dim]} tokens along "
                         f"dim {dim}; the last entry of cu_seqlens must be the sequence length")


def agree_preparation(mesh: SPMesh, call: str, fields: dict, error=None) -> None:
    """The agreement of ``shard``/``unshard``/``positions`` (see ``distattn.agree``): every rank
    raises the same error, or none does. A mesh built by hand without groups (index arithmetic
    only) has nothing to agree over and skips it."""
    if mesh.control_group is None and mesh.size > 1:
        if error is not None:
            raise error
        return
    check_agreement(mesh, call, fields, error=error)
    if error is not None:
        raise error


def take_shard(x: torch.Tensor, mesh: SPMesh, dim: int, layout: str, cu) -> torch.Tensor:
    """``shard`` without its checks and agreement: ``dim`` non-negative, ``cu`` checked
    (``check_cu_seqlens``) and ending at ``x.shape[dim]``. For callers that agreed already."""
    idx = local_indices(x.shape[dim], mesh, layout, cu)
    if idx.numel() and not bool((idx < 0).any()):
        if layout == "contiguous":
            return x.narrow(dim, int(idx[0]), idx.numel())
        return x.index_select(dim, idx.to(x.device))
    # Padding slots read one zero appended to the sequence.
    zero = torch.zeros_like(x.narrow(dim, 0, 1))
    idx = torch.where(idx < 0, x.shape[dim], idx)
    return torch.cat([x, zero], dim=dim).index_select(dim, idx.to(x.device))


def shard(x: torch.Tensor, mesh=None, dim: int = 1, layout: str = "contiguous",
          cu_seqlens=None) -> torch.Tensor:
    """This rank's part of the full tensor ``x`` (the same on every rank) along ``dim``.
    Padding slots that the layout needs are zeros. Pure indexing, differentiable; every rank
    of the mesh calls it: the ranks agree on ``x``'s shape and dtype, ``dim``, ``layout`` and
    ``cu_seqlens`` (one small host collective, ``distattn.agree``), so a rank sharding
    differently raises on every rank instead of training on other tokens."""
    mesh = as_mesh(mesh)
    try:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a tensor, got {type(x).__name__}")
        dim = dim % x.dim()
        cu = check_cu_seqlens(cu_seqlens)
        check_layout(layout)
        _check_length(x, dim, cu)
        ring_layout(layout, x.shape[dim], mesh.ring_degree, mesh.ulysses_degree, cu)
    except Exception as exc:
        agree_preparation(mesh, "distattn.shard", {}, exc)
    agree_preparation(mesh, "distattn.shard", dict(x=x, dim=dim, layout=layout, cu_seqlens=cu))
    return take_shard(x, mesh, dim, layout, cu)


def _all_gather(t: torch.Tensor, group, n: int) -> list[torch.Tensor]:
    if n == 1:
        return [t]
    parts = [torch.empty_like(t) for _ in range(n)]
    work = dist.all_gather(parts, t, group=group, async_op=True)
    wait_all([work], lambda: f"the all-gather of distattn.unshard ({tuple(t.shape)}) over "
                             f"ranks {dist.get_process_group_ranks(group)}")
    return parts


def unshard(local: torch.Tensor, mesh=None, dim: int = 1, layout: str = "contiguous",
            cu_seqlens=None) -> torch.Tensor:
    """Inverse of ``shard``: the full tensor on every rank (all-gather, then reorder; padding
    slots dropped). Every rank of the mesh calls it; the ranks first agree on the local
    shape and dtype, ``dim``, ``layout`` and ``cu_seqlens`` (``distattn.agree``), so a
    disagreement raises on every rank before any data moves. Not differentiable: the result
    carries no autograd history."""
    mesh = as_mesh(mesh)
    try:
        if not isinstance(local, torch.Tensor):
            raise TypeError(f"local must be a tensor, got {type(local).__name__}")
        dim = dim % local.dim()
        cu = check_cu_seqlens(cu_seqlens)
        check_layout(layout)
        part_len = local.shape[dim] * mesh.ulysses_degree
        if cu is None:
            seq_len = part_len * mesh.ring_degree
            check_seq_len(seq_len, layout, mesh.ring_degree, mesh.ulysses_degree,
                          arg="full length")
        else:
            seq_len = cu[-1]
        lay = ring_layout(layout, seq_len, mesh.ring_degree, mesh.ulysses_degree, cu)
        if lay.part_len != part_len:
            raise ValueError(
                f"local has {local.shape[dim]} tokens along dim {dim}, but layout={layout!r} "
                f"with these cu_seqlens gives every rank {lay.local_len}; pass the cu_seqlens "
                f"and layout that shard used")
    except Exception as exc:
        agree_preparation(mesh, "distattn.unshard", {}, exc)
    agree_preparation(mesh, "distattn.unshard", dict(local=local, dim=dim, layout=layout, cu_seqlens=cu))
    with failure_marks(mesh, "distattn.unshard"):
        return gather_full(local.detach(), mesh, dim, lay, seq_len)


def gather_full(local: torch.Tensor, mesh: SPMesh, dim: int, lay: RingLayout,
                seq_len: int) -> torch.Tensor:
    """``unshard`` without its checks and agreement (for callers that agreed already): every
    rank's ``local`` gathered over the mesh and put in global order along ``dim`` (padding
    slots dropped). Not differentiable."""
    local = local.contiguous()
    # Ulysses pieces concatenate (in u order) into this ring rank's part ...
    part = torch.cat(_all_gather(local, mesh.ulysses_group, mesh.ulysses_degree), dim=dim)
    # ... and the ring parts scatter their real slots back to global positions.
    parts = _all_gather(part.contiguous(), mesh.ring_group, mesh.ring_degree)
    shape = list(part.shape)
    shape[dim] = seq_len
    full = torch.empty(shape, dtype=local.dtype, device=local.device)
    for r, p in enumerate(parts):
        idx = lay.indices(r)
        real = (idx >= 0).nonzero().flatten()
        full.index_copy_(dim, idx[real].to(local.device), p.index_select(dim, real.to(p.device)))
    return full


def local_positions(seq_len: int, mesh: SPMesh, layout: str, device=None,
                    cu_seqlens=None) -> torch.Tensor:
    """``positions`` without its agreement, for callers that agreed already."""
    lay = ring_layout(layout, seq_len, mesh.ring_degree, mesh.ulysses_degree, cu_seqlens)
    n = lay.local_len
    return lay.positions(mesh.ring_rank)[mesh.ulysses_rank * n:
                                         (mesh.ulysses_rank + 1) * n].to(device)


def positions(seq_len: int, mesh=None, layout: str = "contiguous", device=None,
              cu_seqlens=None) -> torch.Tensor:
    """Position of each local token (int64): its global index, or with ``cu_seqlens`` its
    index within its document (RoPE position ids). Padding slots get 0. Every rank of the
    mesh calls it; the ranks agree on ``seq_len``, ``layout`` and ``cu_seqlens``
    (``distattn.agree``)."""
    mesh = as_mesh(mesh)
    try:
        cu = check_cu_seqlens(cu_seqlens)
        check_layout(layout)
        ring_layout(layout, seq_len, mesh.ring_degree, mesh.ulysses_degree, cu)
    except Exception as exc:
        agree_preparation(mesh, "distattn.positions", {}, exc)
    agree_preparation(mesh, "distattn.positions", dict(seq_len=seq_len, layout=layout, cu_seqlens=cu))
    return local_positions(seq_len, mesh, layout, device, cu)
