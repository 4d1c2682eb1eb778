"""Tensors that travel together in one buffer: K with V, q with out and dout.

``pack(*ts)`` stacks tensors of one shape on a new leading dim ([n, ...]); when their last
dims differ (MLA: V's head dim is not q/k's) it concatenates them on the last dim instead
and adds a leading dim of 1 ([1, ..., sum of last dims]), so indexing the dims in between
(``buf[:, :, a:b]`` for sequence slots) means the same in both forms. ``unpack(buf, dims)``
returns views of the parts (``dims``: their last dims, in order); in-place updates of a
view update the buffer. Nothing is padded: every element is a real one.
"""
from __future__ import annotations

import torch


def pack(*ts: torch.Tensor) -> torch.Tensor:
    if all(t.shape == ts[0].shape for t in ts):
        return torch.stack(ts)
    return torch.cat(ts, dim=-1).unsqueeze(0)


def unpack(buf: torch.Tensor, dims) -> list:
    if buf.shape[0] == len(dims) and (len(dims) == 1 or len(set(dims)) == 1):
        return list(buf.unbind(0))
    parts, at = [], 0
    for d in dims:
        parts.append(buf[0, ..., at:at + d])
        at += d
    return parts
