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

Timeout: every group a mesh communicates on carries the mesh's ``timeout`` (by default the
timeout of the process group it was built from, the one ``init_process_group(timeout=...)``
set), so a rank that never arrives makes the others raise after that long instead of torch's
default of 30 minutes for new groups.

Control group: a mesh from ``build``, ``from_group`` or ``from_device_mesh`` also owns a group
over all its ranks that only ``distattn.agree`` uses (gloo where available: CPU tensors, no
device synchronisation). Being its own, its small collectives can never pair up with another
collective of a rank that is out of step.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Optional

import torch
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


def group_timeout(group) -> Optional[timedelta]:
    """The timeout ``group``'s backend was created with; None where torch does not say."""
    for device in ("cpu", "cuda"):
        try:
            return group._get_backend(torch.device(device)).options._timeout
        except (RuntimeError, AttributeError):  # no backend for this device, or no options
            continue
    return None


def _resolve_timeout(timeout, parent) -> Optional[timedelta]:
    """``timeout`` checked, or the timeout of the ``parent`` group (warning where unknown)."""
    if timeout is not None:
        if not isinstance(timeout, timedelta) or timeout <= timedelta(0):
            raise ValueError(f"timeout must be a positive datetime.timedelta or None (the "
                             f"process group's own timeout), got {timeout!r}")
        return timeout
    inherited = group_timeout(parent)
    if inherited is None:
        warnings.warn("distattn could not read the timeout of the process group; its groups get "
                      "torch's default timeout. Pass SPMesh.build(timeout=timedelta(...)) to "
                      "bound how long a rank waits for the others", stacklevel=3)
    return inherited


def _group_with_timeout(ranks: tuple, existing, timeout):
    """``existing`` (a group over ``ranks``, or None) when it already has ``timeout``, else a
    new group over ``ranks`` with it; None for a single rank. Only members call this."""
    if len(ranks) == 1:
        return None
    if existing is not None and (timeout is None or group_timeout(existing) == timeout):
        return existing
    return dist.new_group(ranks=list(ranks), timeout=timeout, use_local_synchronization=True)


def _control_group(ranks: tuple, timeout):
    """A new group over ``ranks`` for ``distattn.agree`` only (None for a single rank)."""
    if len(ranks) == 1:
        return None
    backend = "gloo" if dist.is_gloo_available() else None
    return dist.new_group(ranks=list(ranks), timeout=timeout, backend=backend,
                          use_local_synchronization=True)


@dataclass(eq=False)
class MeshState:
    """What ``distattn.agree`` keeps for one mesh (the caller's object, never a global).

    ``agreed``: the digest of the fields last agreed per call name (for
    ``DISTATTN_CHECK=0``); ``digests``: a cache of field digests by their cheap key;
    ``failed``: why the mesh's collectives became unusable (a wait failed, or a rank failed
    mid-call), or None while it is healthy."""
    agreed: dict = field(default_factory=dict)
    digests: dict = field(default_factory=dict)
    failed: Optional[str] = None


@dataclass(frozen=True, eq=False)
class SPMesh:
    """A sequence-parallel mesh. Build it with ``SPMesh.build`` or ``SPMesh.from_device_mesh``.

    Attributes: ``ulysses_degree``/``ring_degree`` (U, R), this rank's ``ulysses_rank`` and
    ``ring_rank``, the ``ulysses_group``/``ring_group`` (None where the degree is 1) and the
    global ranks of their members in coordinate order (``ulysses_ranks``, ``ring_ranks``),
    ``control_group`` over all ranks of the mesh (``distattn.agree``'s only), ``timeout``
    (carried by every one of these groups; None: torch's default) and ``state`` (what
    ``distattn.agree`` keeps for the mesh: see ``MeshState``).
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
    control_group: Optional[dist.ProcessGroup] = None
    timeout: Optional[timedelta] = None
    state: "MeshState" = field(default_factory=lambda: MeshState(), repr=False)

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
              placement: str = "ulysses_inner",
              timeout: Optional[timedelta] = None, plan=None) -> "SPMesh":
        """Split ``group`` (default: the default process group) into a ``ulysses_degree x
        ring_degree`` mesh. ``ring_degree=None`` means ``group size // ulysses_degree``.
        ``timeout`` bounds every wait of distattn's communication on this mesh (default: the
        timeout of ``group``); where it differs from ``group``'s, the mesh gets its own
        groups. Every member of ``group`` must call this, in the same order as other
        collectives; it creates up to three groups (Ulysses, ring, control).
        ``plan``: a ``distattn.plan_for`` plan; its degrees and placement are used (the
        degree and placement arguments must then be left at their defaults)."""
        if plan is not None:
            if (ulysses_degree, ring_degree, placement) != (1, None, "ulysses_inner"):
                raise ValueError("plan= gives the degrees and placement: leave ulysses_degree, "
                                 "ring_degree and placement at their defaults")
            ulysses_degree, ring_degree = plan.ulysses_degree, plan.ring_degree
            placement = plan.placement
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
        timeout = _resolve_timeout(timeout, group)
        global_ranks = tuple(dist.get_process_group_ranks(group))
        g = dist.get_rank(group)
        u, r = _coords(g, ulysses_degree, ring_degree, placement)
        U, R = ulysses_degree, ring_degree
        u_ranks = tuple(global_ranks[_group_rank(i, r, U, R, placement)] for i in range(U))
        r_ranks = tuple(global_ranks[_group_rank(u, i, U, R, placement)] for i in range(R))

        def subgroup(ranks):   # a degree equal to the SP size reuses the SP group
            return _group_with_timeout(ranks, group if len(ranks) == size else None, timeout)

        return cls(U, R, u, r, subgroup(u_ranks), subgroup(r_ranks), u_ranks, r_ranks,
                   placement, _control_group(global_ranks, timeout), timeout)

    @classmethod
    def from_group(cls, group=None, timeout: Optional[timedelta] = None) -> "SPMesh":
        """A pure ring over ``group`` (default: the default group). Creates its control
        group, and a ring group only where ``timeout`` differs from ``group``'s."""
        return cls.build(ulysses_degree=1, group=group, timeout=timeout)

    @classmethod
    def _ring_over(cls, group) -> "SPMesh":
        """A pure ring over ``group`` (None: the default group) that creates no group, for a
        call given a group instead of a mesh (``as_mesh``): ``group`` is its control group
        too, and as a new mesh per call it agrees on every call (``distattn.agree``)."""
        _require_initialized()
        group = group if group is not None else dist.group.WORLD
        ranks = tuple(dist.get_process_group_ranks(group))
        g = dist.get_rank(group)
        ring = group if len(ranks) > 1 else None
        return cls(1, len(ranks), 0, g, None, ring, (ranks[g],), ranks, "ulysses_inner", ring,
                   group_timeout(group))

    @classmethod
    def from_device_mesh(cls, device_mesh, ulysses_dim: str = "sp_u", ring_dim: str = "sp_r",
                         timeout: Optional[timedelta] = None, *, sp_dim: Optional[str] = None,
                         ulysses_degree: int = 1,
                         placement: str = "ulysses_inner") -> "SPMesh":
        """The SP mesh of a ``torch.distributed.device_mesh.DeviceMesh``, in one of two ways:

        - two named dimensions, ``ulysses_dim`` and ``ring_dim`` (e.g. a (dp, sp_r, sp_u)
          mesh). The placement follows the dimension order: the later (faster-varying) one is
          inner.
        - one named SP dimension, ``sp_dim`` (e.g. a plain (dp, sp) mesh: ``sp_dim="sp"``),
          split into ``ulysses_degree x (size // ulysses_degree)`` with ``placement`` as in
          ``build`` (``ulysses_degree=1``: a pure ring). When ``sp_dim`` is not given and the
          mesh has neither default two-dimension name but one dimension named "sp" or "cp",
          that one is taken.

        ``timeout`` (default: the default process group's) bounds every wait; the device
        mesh's groups are used where they carry it (DeviceMesh creates its groups with
        torch's default), else groups over the same ranks are created with it. The control
        group spans the SP sub-mesh that holds this rank. Only the members of one SP group
        synchronise (the other replicas' calls are independent)."""
        _require_initialized()
        names = tuple(device_mesh.mesh_dim_names or ())
        two_named = ulysses_dim in names and ring_dim in names
        if sp_dim is None and not two_named and (ulysses_dim, ring_dim) == ("sp_u", "sp_r"):
            single = [n for n in names if n in ("sp", "cp")]
            sp_dim = single[0] if len(single) == 1 else None
        if sp_dim is not None:
            if sp_dim not in names:
                raise ValueError(f"sp_dim={sp_dim!r} is not a dimension of the device mesh "
                                 f"(its dimensions are {names})")
            return cls.build(ulysses_degree=ulysses_degree,
                             group=device_mesh.get_group(sp_dim), placement=placement,
                             timeout=_resolve_timeout(timeout, dist.group.WORLD))
        for arg, dim in (("ulysses_dim", ulysses_dim), ("ring_dim", ring_dim)):
            if dim not in names:
                raise ValueError(
                    f"{arg}={dim!r} is not a dimension of the device mesh (its dimensions "
                    f"are {names}): name its two SP dimensions with ulysses_dim= and "
                    f"ring_dim=, or its one SP dimension with sp_dim= (split by "
                    f"ulysses_degree=)")
        if ulysses_dim == ring_dim:
            raise ValueError("ulysses_dim and ring_dim must name different mesh dimensions")

        timeout = _resolve_timeout(timeout, dist.group.WORLD)

        def side(dim):
            degree = device_mesh.size(names.index(dim))
            grp = device_mesh.get_group(dim)
            ranks = tuple(dist.get_process_group_ranks(grp))
            return (degree, device_mesh.get_local_rank(dim),
                    _group_with_timeout(ranks, grp, timeout), ranks)

        U, u, u_group, u_ranks = side(ulysses_dim)
        R, r, r_group, r_ranks = side(ring_dim)
        placement = ("ulysses_inner" if names.index(ulysses_dim) > names.index(ring_dim)
                     else "ring_inner")
        control = _control_group(_sub_mesh_ranks(device_mesh, ulysses_dim, ring_dim), timeout)
        return cls(U, R, u, r, u_group, r_group, u_ranks, r_ranks, placement, control,
                   timeout)

    def __repr__(self) -> str:
        return (f"SPMesh(ulysses={self.ulysses_degree}, ring={self.ring_degree}, "
                f"placement={self.placement!r}, u={self.ulysses_rank}, r={self.ring_rank})")


def _sub_mesh_ranks(device_mesh, *dims: str) -> tuple:
    """Global ranks of the sub-mesh spanned by ``dims`` that contains this rank (the other
    dimensions fixed at this rank's coordinates), sorted."""
    names = tuple(device_mesh.mesh_dim_names)
    coord = device_mesh.get_coordinate()
    index = tuple(slice(None) if name in dims else coord[i] for i, name in enumerate(names))
    return tuple(sorted(device_mesh.mesh[index].flatten().tolist()))


def as_mesh(mesh) -> SPMesh:
    """Accept an SPMesh, a ProcessGroup (pure ring over it) or None (pure ring over the
    default group). Creates no group: for repeated calls build an SPMesh once instead."""
    if isinstance(mesh, SPMesh):
        return mesh
    if mesh is None or isinstance(mesh, dist.ProcessGroup):
        return SPMesh._ring_over(mesh)
    raise TypeError(f"mesh must be an SPMesh, a torch.distributed ProcessGroup or None, "
                    f"got {type(mesh).__name__}")
