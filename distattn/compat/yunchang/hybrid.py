"""yunchang's attention modules over ``distattn.dist_flash_attn`` (USP: Ulysses inside, ring
across, on the mesh ``set_seq_parallel_pg`` built). Inputs are this rank's shard as
``EXTRACT_FUNC_DICT[ring_impl_type]`` cuts it: q [B, S/W, H, D], k/v [B, S/W, Hkv, D];
``forward`` returns out [B, S/W, H, D]. ``window_size`` is a global window, softcap honoured,
non-causal allowed for every impl; dropout and alibi raise (see ring_flash_attn._core).
``scatter_idx=2, gather_idx=1`` (yunchang's defaults, [B, S, H, D] inputs) only."""
from __future__ import annotations

import torch

from ...mesh import SPMesh
from ..ring_flash_attn._core import attend
from .comm import IMPL_LAYOUT
from .globals import PROCESS_GROUP


def _check_layout_args(ring_impl_type, scatter_idx, gather_idx):
    if ring_impl_type not in IMPL_LAYOUT:
        raise ValueError(f"ring_impl_type must be one of {sorted(IMPL_LAYOUT)}, got "
                         f"{ring_impl_type!r}")
    if (scatter_idx, gather_idx) != (2, 1):
        raise ValueError(f"scatter_idx={scatter_idx}, gather_idx={gather_idx}: distattn's "
                         f"yunchang adapter takes [B, S, H, D] inputs (scatter_idx=2, "
                         f"gather_idx=1)")


class LongContextAttention(torch.nn.Module):
    def __init__(self, scatter_idx=2, gather_idx=1, ring_impl_type="basic", use_pack_qkv=False,
                 use_sync=False, attn_type=None, attn_processor=None):
        super().__init__()
        _check_layout_args(ring_impl_type, scatter_idx, gather_idx)
        if attn_processor is not None:
            raise ValueError("attn_processor is not supported by distattn's yunchang adapter")
        self.layout = IMPL_LAYOUT[ring_impl_type]

    def _mesh(self):
        if PROCESS_GROUP.MESH is None:
            raise RuntimeError("call set_seq_parallel_pg(...) before LongContextAttention")
        return PROCESS_GROUP.MESH

    def forward(self, query, key, value, dropout_p=0.0, softmax_scale=None, causal=False,
                window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                return_attn_probs=False, *args):
        return attend(query, key, value, where=type(self).__name__, layout=self.layout,
                      dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
                      window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
                      group=self._mesh())


class LongContextAttentionQKVPacked(LongContextAttention):
    """qkv [B, S/W, 3, H, D] -> out [B, S/W, H, D]."""

    def forward(self, qkv, dropout_p=0.0, softmax_scale=None, causal=False,
                window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                return_attn_probs=False, *args):
        q, k, v = qkv.unbind(2)
        return super().forward(q, k, v, dropout_p, softmax_scale, causal, window_size,
                               softcap, alibi_slopes, deterministic, return_attn_probs)


class UlyssesAttention(torch.nn.Module):
    """Pure Ulysses over ``sequence_process_group`` (default: the default group); the shard
    is contiguous. The mesh is built on the first call (a collective on the group)."""

    def __init__(self, sequence_process_group=None, scatter_idx=2, gather_idx=1,
                 use_sync=False, attn_type=None):
        super().__init__()
        _check_layout_args("basic", scatter_idx, gather_idx)
        self.group = sequence_process_group
        self.mesh = None

    def forward(self, query, key, value, dropout_p=0.0, softmax_scale=None, causal=False,
                window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                return_attn_probs=False, *args):
        if self.mesh is None:
            import torch.distributed as dist
            size = dist.get_world_size(self.group)
            self.mesh = SPMesh.build(ulysses_degree=size, ring_degree=1, group=self.group)
        return attend(query, key, value, where="UlyssesAttention", layout="contiguous",
                      dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
                      window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
                      group=self.mesh)
