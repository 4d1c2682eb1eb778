"""Packed documents: ``cu_seqlens``, the global document boundaries of one packed row.

``cu_seqlens = [0, 300, 1000, 1021]`` says: three documents, tokens [0, 300), [300, 1000) and
[1000, 1021); the last entry is the true global length (any length: layouts pad what they need
with inert slots). ``[0, S]`` is one document of length S. A query sees a key only inside its
own document. Every rank passes the same list.
"""
from __future__ import annotations

import bisect
import operator
from typing import Optional, Sequence

import torch


def check_cu_seqlens(cu_seqlens, arg: str = "cu_seqlens") -> Optional[tuple]:
    """Validate and normalise to a tuple of Python ints (None stays None). Raises ValueError
    naming ``arg`` and the fix."""
    if cu_seqlens is None:
        return None
    if isinstance(cu_seqlens, torch.Tensor):
        if cu_seqlens.dim() != 1 or cu_seqlens.dtype.is_floating_point or \
                cu_seqlens.dtype == torch.bool:
            raise ValueError(f"{arg} must be a 1-D integer tensor or a list of ints, got a "
                             f"{cu_seqlens.dtype} tensor of shape {tuple(cu_seqlens.shape)}")
        cu_seqlens = cu_seqlens.tolist()
    if not isinstance(cu_seqlens, Sequence) or isinstance(cu_seqlens, (str, bytes)):
        raise ValueError(f"{arg} must be a list of ints like [0, 300, 1000], got "
                         f"{type(cu_seqlens).__name__}")
    values = tuple(cu_seqlens)
    if len(values) >= 2 and set(map(type, values)) == {int} and values[0] == 0 and \
            all(map(operator.lt, values, values[1:])):
        return values             # the common case, checked at C speed (10k documents)
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in values):
        raise ValueError(f"{arg} must hold ints, got {list(values)[:8]}")
    if len(values) < 2:
        raise ValueError(f"{arg} needs at least two entries [0, length], got {list(values)}")
    if values[0] != 0:
        raise ValueError(f"{arg} must start at 0 (the first document's first token), got "
                         f"{values[0]}")
    for i in range(1, len(values)):
        if values[i] <= values[i - 1]:
            raise ValueError(
                f"{arg} must be strictly increasing (every document has at least one token), "
                f"but entry {i} is {values[i]} after {values[i - 1]}; drop empty documents")
    return values


def document_of(cu: tuple, token: int) -> int:
    """Index of the document holding global token ``token``."""
    return bisect.bisect_right(cu, token) - 1


def document_lengths(cu: tuple) -> list[int]:
    return [b - a for a, b in zip(cu[:-1], cu[1:])]
