"""distattn: exact attention over sequences split across the ranks of a sequence-parallel group.

Public API (README.md; architecture in docs/DESIGN.md)::

    mesh = distattn.SPMesh.build(ulysses_degree=2, ring_degree=2)
    local = distattn.shard(x, mesh, dim=1, layout="zigzag")
    out = distattn.dist_flash_attn(q, k, v, mesh=mesh, causal=True, layout="zigzag")
    full = distattn.unshard(out, mesh, dim=1, layout="zigzag")
    pos = distattn.positions(seq_len, mesh, layout="zigzag")
    plan = distattn.plan_for(costmodel.cluster(64), seq_len, heads, head_dim)  # docs/STRATEGY.md
"""
from .attention import dist_flash_attn
from .layout import positions, shard, unshard
from .mesh import SPMesh
from .planner import plan_for

__version__ = "0.1.0"
__all__ = ["SPMesh", "dist_flash_attn", "plan_for", "positions", "shard", "unshard"]
