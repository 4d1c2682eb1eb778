"""yunchang's process-group globals over a distattn ``SPMesh``.

``set_seq_parallel_pg(sp_ulysses_degree, sp_ring_degree, rank, world_size,
use_ulysses_low=True)`` builds one SPMesh over the default group (``use_ulysses_low``: Ulysses
ranks adjacent, distattn's ``ulysses_inner``; else ``ring_inner``) and publishes its groups as
``PROCESS_GROUP.ULYSSES_PG`` / ``PROCESS_GROUP.RING_PG``. The sequence-parallel group must be
the whole world (ulysses x ring == world_size); data parallelism beside it is not provided."""
from __future__ import annotations

from ...mesh import SPMesh


class _ProcessGroups:
    ULYSSES_PG = None
    RING_PG = None
    MESH = None          # distattn's SPMesh behind the two groups


PROCESS_GROUP = _ProcessGroups()


def set_seq_parallel_pg(sp_ulysses_degree, sp_ring_degree, rank, world_size,
                        use_ulysses_low=True):
    if sp_ulysses_degree * sp_ring_degree != world_size:
        raise ValueError(f"set_seq_parallel_pg: sp_ulysses_degree x sp_ring_degree = "
                         f"{sp_ulysses_degree * sp_ring_degree} must equal world_size="
                         f"{world_size} in distattn's yunchang adapter (no data-parallel "
                         f"replicas beside the SP group); build distattn.SPMesh per replica "
                         f"instead")
    mesh = SPMesh.build(ulysses_degree=sp_ulysses_degree, ring_degree=sp_ring_degree,
                        placement="ulysses_inner" if use_ulysses_low else "ring_inner")
    PROCESS_GROUP.MESH = mesh
    PROCESS_GROUP.ULYSSES_PG = mesh.ulysses_group
    PROCESS_GROUP.RING_PG = mesh.ring_group
