"""distattn: exact attention over sequences split across the ranks of a sequence-parallel group.

Public API (DESIGN.md section 1): ``SPMesh``, ``shard``, ``unshard``, ``positions``,
``dist_flash_attn``.
"""
__version__ = "0.1.0"
