"""SPMesh: the sequence-parallel group as an object the caller passes around.

The SP group has ``ulysses_degree * ring_degree`` ranks. Each rank has a Ulysses coordinate
``u`` and a ring coordinate ``r``:

- ``placement="ulysses_inner"``: group rank ``g`` has ``u = g % U``, ``r = g // U``. Each
  Ulysses group is ``U`` consecutive ranks (one node, so the all-to-all rides NVLink) and the
  ring runs across them.
- ``placement="ring_inner"``: ``r = g % R``, ``u = g // R``.

A degree of 1 has no process group (nothing to communicate); a degree equal to the SP size
reuses the SP group itself. Subgroups are created with local synchronisation, so only the
members of the SP group have to call ``build`` (other SP groups of a larger job build their own
meshes independently). There are no module-level groups anywhere in distattn.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist

PLACEMENTS = ("ulysses_inner", "ring_inner")


def _require_initialized():
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialised: call torch.distributed.init_process_group "
            "(e.g. under torchrun) before building an SPMesh or calling dist_flash_attn")


def _coords(g: int, u_deg: int, r_deg: int, placement: str) -> tuple[int, int]:
    """(u, r) of SP-group rank g."""
    if placement == "ulysses_inner":
        return g % u_deg, g // u_deg
    return g // r_deg, g % r_deg


def _group_rank(u: int, r: int, u_deg: int, r_deg: int, placement: str) -> int:
    return r * u_deg + u if placement == "ulysses_inner" else u * r_deg + r


@dataclass(frozen=True, eq=False)
class SPMesh:
    """A sequence-parallel mesh. Build it with ``SPMesh.build`` or ``SPMesh.from_device_mesh``.

    Attributes: ``ulysses_degree``/``ring_degree`` (U, R), this rank's ``ulysses_rank`` and
    ``ring_rank``, the ``ulysses_group``/``ring_group`` (None where the degree is 1) and the
    global ranks of their members in coordinate order (``ulysses_ranks``, ``ring_ranks``).
    """
    ulysses_degree: int
    ring_degree: int
    ulysses_rank: int
    ring_rank: int
    ulysses_group: Optional[dist.ProcessGroup]
    ring_group: Optional[dist.ProcessGroup]
    ulysses_ranks: tuple
    ring_ranks: tuple
    placement: str = "ulysses_inner"

    @property
    def size(self) -> int:
        return self.ulysses_degree * self.ring_degree

    @property
    def ring_prev(self) -> int:
        """Global rank this rank receives ring traffic from."""
        return self.ring_ranks[(self.ring_rank - 1) % self.ring_degree]

    @property
    def ring_next(self) -> int:
        """Global rank this rank sends ring traffic to."""
        return self.ring_ranks[(self.ring_rank + 1) % self.ring_degree]

    # -- constructors --------------------------------------------------------------------------
    @classmethod
    def build(cls, ulysses_degree: int = 1, ring_degree: Optional[int] = None, group=None,
              placement: str = "ulysses_inner") -> "SPMesh":
        """Split ``group`` (default: the default process group) into a ``ulysses_degree x
        ring_degree`` mesh. ``ring_degree=None`` means ``group size // ulysses_degree``.
        Every member of ``group`` must call this, in the same order as other collectives."""
        _require_initialized()
        group = group if group is not None else dist.group.WORLD
        size = dist.get_world_size(group)
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        if not isinstance(ulysses_degree, int) or ulysses_degree < 1:
            raise ValueError(f"ulysses_degree must be a positive int, got {ulysses_degree!r}")
        if ring_degree is None:
            if size % ulysses_degree:
                raise ValueError(
                    f"ulysses_degree={ulysses_degree} does not divide the group size {size}; "
                    f"pick a divisor of {size}")
            ring_degree = size // ulysses_degree
        if not isinstance(ring_degree, int) or ring_degree < 1:
            raise ValueError(f"ring_degree must be a positive int, got {ring_degree!r}")
        if ulysses_degree * ring_degree != size:
            raise ValueError(
                f"ulysses_degree * ring_degree must equal the group size: {ulysses_degree} * "
                f"{ring_degree} != {size}; choose degrees whose product is {size}")
        global_ranks = dist.get_process_group_ranks(group)
        g = dist.get_rank(group)
        u, r = _coords(g, ulysses_degree, ring_degree, placement)
        U, R = ulysses_degree, ring_degree
        u_ranks = tuple(global_ranks[_group_rank(i, r, U, R, placement)] for i in range(U))
        r_ranks = tuple(global_ranks[_group_rank(u, i, U, R, placement)] for i in range(R))
        return cls(U, R, u, r, cls._subgroup(group, size, u_ranks),
                   cls._subgroup(group, size, r_ranks), u_ranks, r_ranks, placement)

    @staticmethod
    def _subgroup(group, size: int, ranks: tuple):
        if len(ranks) == 1:
            return None
        if len(ranks) == size:
            return group
        return dist.new_group(ranks=list(ranks), use_local_synchronization=True)

    @classmethod
    def from_group(cls, group=None) -> "SPMesh":
        """A pure ring over ``group`` (default: the default group); creates no new groups."""
        return cls.build(ulysses_degree=1, group=group)

    @classmethod
    def from_device_mesh(cls, device_mesh, ulysses_dim: str = "sp_u",
                         ring_dim: str = "sp_r") -> "SPMesh":
        """Use two named dimensions of a ``torch.distributed.device_mesh.DeviceMesh``. The
        placement follows the dimension order: the later (faster-varying) one is inner."""
        _require_initialized()
        names = tuple(device_mesh.mesh_dim_names or ())
        for arg, dim in (("ulysses_dim", ulysses_dim), ("ring_dim", ring_dim)):
            if dim not in names:
                raise ValueError(f"{arg}={dim!r} is not a dimension of the device mesh "
                                 f"(its dimensions are {names})")
        if ulysses_dim == ring_dim:
            raise ValueError("ulysses_dim and ring_dim must name different mesh dimensions")

        def side(dim):
            degree = device_mesh.size(names.index(dim))
            grp = device_mesh.get_group(dim)
            ranks = tuple(dist.get_process_group_ranks(grp))
            return degree, device_mesh.get_local_rank(dim), (grp if degree > 1 else None), ranks

        U, u, u_group, u_ranks = side(ulysses_dim)
        R, r, r_group, r_ranks = side(ring_dim)
        placement = ("ulysses_inner" if names.index(ulysses_dim) > names.index(ring_dim)
                     else "ring_inner")
        return cls(U, R, u, r, u_group, r_group, u_ranks, r_ranks, placement)

    def __repr__(self) -> str:
        return (f"SPMesh(ulysses={self.ulysses_degree}, ring={self.ring_degree}, "
                f"placement={self.placement!r}, u={self.ulysses_rank}, r={self.ring_rank})")


def as_mesh(mesh) -> SPMesh:
    """Accept an SPMesh, a ProcessGroup (pure ring over it) or None (pure ring over the
    default group)."""
    if isinstance(mesh, SPMesh):
        return mesh
    if mesh is None or isinstance(mesh, dist.ProcessGroup):
        return SPMesh.from_group(mesh)
    raise TypeError(f"mesh must be an SPMesh, a torch.distributed ProcessGroup or None, "
                    f"got {type(mesh).__name__}")
