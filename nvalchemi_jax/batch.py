"""`Batch`: many atomic systems of different sizes in one padded pytree.

Atoms of every system share flat per-atom arrays of length ``N =
capacity.num_atoms``; ``system_index`` says which system each atom belongs to,
and padding atoms point past the last system (``system_index == S``) so
segment sums over systems drop them. Per-system arrays have length ``S =
capacity.num_systems``; empty slots have ``system_mask == False`` and
``sample_id == -1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from nvalchemi_jax import _validation
from nvalchemi_jax._elements import STANDARD_ATOMIC_MASSES
from nvalchemi_jax.capacity import Capacity
from nvalchemi_jax import segments


def default_float_dtype() -> np.dtype:
    """float64 when JAX's x64 mode is on, float32 otherwise."""
    return np.dtype(jnp.zeros((), dtype=float).dtype)


# What padding atoms and empty system slots hold (``system_index`` of padding is ``S``).
PADDING = {"positions": 0.0, "velocities": 0.0, "atomic_numbers": 0, "masses": 1.0, "atom_mask": False,
           "fixed": False, "tags": 0, "charges": 0.0,
           "cell": 0.0, "pbc": False, "n_atoms": 0, "system_mask": False, "sample_id": -1}
ATOM_FIELDS = ("positions", "velocities", "atomic_numbers", "masses", "fixed", "tags", "charges")


@struct.dataclass
class Batch:
    """A padded batch of atomic systems (see the module docstring for the layout).

    Per atom (``N``): ``positions (N, 3)`` Å, ``velocities (N, 3)`` Å/fs,
    ``atomic_numbers (N,) int32``, ``masses (N,)`` amu (1 on padding),
    ``system_index (N,) int32``, ``atom_mask (N,) bool``, ``fixed (N,) bool``
    (from ASE ``FixAtoms``), ``tags (N,) int32`` (categories; ASE tags),
    ``charges (N,)`` e.
    Per system (``S``): ``cell (S, 3, 3)`` Å with lattice vectors as rows,
    ``pbc (S, 3) bool``, ``n_atoms (S,) int32``, ``system_mask (S,) bool``,
    ``sample_id (S,) int32`` (-1 for an empty slot).

    Build one with :meth:`from_atoms` or :meth:`from_arrays`; go back with
    :meth:`to_atoms`.

    Example::

        >>> from ase.build import bulk
        >>> batch = Batch.from_atoms([bulk("Ar", "fcc", a=5.26, cubic=True) * (2, 2, 2),
        ...                           bulk("Ar", "fcc", a=5.26, cubic=True)])
        >>> batch.n_atoms[:2]
        Array([32,  4], dtype=int32)
    """

    positions: jax.Array
    velocities: jax.Array
    atomic_numbers: jax.Array
    masses: jax.Array
    system_index: jax.Array
    atom_mask: jax.Array
    fixed: jax.Array
    tags: jax.Array
    charges: jax.Array
    cell: jax.Array
    pbc: jax.Array
    n_atoms: jax.Array
    system_mask: jax.Array
    sample_id: jax.Array
    capacity: Capacity = struct.field(pytree_node=False)

    @property
    def num_systems(self) -> int:
        """Slots for systems (the static ``S``), not the number filled."""
        return self.capacity.num_systems

    @property
    def num_atoms(self) -> int:
        """Slots for atoms (the static ``N``), not the number filled."""
        return self.capacity.num_atoms

    @property
    def dtype(self) -> np.dtype:
        return self.positions.dtype

    # ------------------------------------------------------------------ build
    @classmethod
    def from_arrays(
        cls,
        positions: Sequence[Any],
        atomic_numbers: Sequence[Any],
        cell: Sequence[Any] | None = None,
        pbc: Sequence[Any] | None = None,
        velocities: Sequence[Any] | None = None,
        masses: Sequence[Any] | None = None,
        fixed: Sequence[Any] | None = None,
        tags: Sequence[Any] | None = None,
        charges: Sequence[Any] | None = None,
        sample_ids: Sequence[int] | None = None,
        capacity: Capacity | None = None,
        min_distance: float | None = 0.5,
        on_close_atoms: str = "error",
        _stacklevel: int = 3,
    ) -> "Batch":
        """Build a batch from per-system arrays (one list entry per system).

        positions: list of ``(n_i, 3)`` Å. atomic_numbers: list of ``(n_i,)`` ints.
        cell: list of ``(3, 3)`` Å (rows are lattice vectors), default zeros.
        pbc: list of ``(3,)`` bools (or one bool per system), default all False.
        velocities: list of ``(n_i, 3)`` Å/fs, default zeros.
        masses: list of ``(n_i,)`` amu, default standard atomic weights.
        fixed / tags / charges: optional per-atom lists (default False / 0 / 0).
        sample_ids: one int per system, default ``0 .. len-1``.
        capacity: default just large enough (see :meth:`Capacity.for_systems`).
        min_distance: atoms of one system closer than this (Å, periodic images
        included) trigger ``on_close_atoms`` ("error", "warn" or "ignore");
        ``None`` skips the check.

        Everything is validated on the host; errors name the field, the system
        index and its sample id.
        """
        if on_close_atoms not in ("error", "warn", "ignore"):
            raise ValueError(f"on_close_atoms must be 'error', 'warn' or 'ignore', got {on_close_atoms!r}")
        if min_distance is not None and not min_distance > 0:
            raise ValueError(f"min_distance must be > 0 Å or None, got {min_distance}")
        if capacity is not None and not isinstance(capacity, Capacity):
            raise TypeError(f"capacity must be a Capacity, got {type(capacity).__name__}")
        systems = _validation.validate_systems(
            positions=positions, atomic_numbers=atomic_numbers, cell=cell, pbc=pbc,
            velocities=velocities, masses=masses, fixed=fixed, tags=tags, charges=charges,
            sample_ids=sample_ids,
        )
        sizes = _validation.sizes_of(systems).tolist()
        if capacity is None:
            capacity = Capacity.for_systems(sizes)
        _validation.check_fits(sizes, _validation.sample_ids_of(systems), capacity)
        batch = cls._pack(systems, capacity)
        if min_distance is not None and on_close_atoms != "ignore":
            _validation.check_close_atoms(batch, min_distance, on_close_atoms, _stacklevel)
        return batch

    @classmethod
    def _pack(cls, systems: list[dict], capacity: Capacity) -> "Batch":
        n_cap, s_cap = capacity.num_atoms, capacity.num_systems
        fdt = default_float_dtype()
        pad = lambda field, shape, dtype: np.full(shape, PADDING[field], dtype)
        positions = pad("positions", (n_cap, 3), fdt)
        velocities = pad("velocities", (n_cap, 3), fdt)
        atomic_numbers = pad("atomic_numbers", n_cap, np.int32)
        masses = pad("masses", n_cap, fdt)
        system_index = np.full(n_cap, s_cap, np.int32)
        atom_mask = pad("atom_mask", n_cap, bool)
        fixed = pad("fixed", n_cap, bool)
        tags = pad("tags", n_cap, np.int32)
        charges = pad("charges", n_cap, fdt)
        cell = pad("cell", (s_cap, 3, 3), fdt)
        pbc = pad("pbc", (s_cap, 3), bool)
        n_atoms = pad("n_atoms", s_cap, np.int32)
        system_mask = pad("system_mask", s_cap, bool)
        sample_id = pad("sample_id", s_cap, np.int32)
        # Whole-field concatenations (a per-system loop of slice assignments was the
        # slowest part of building a batch of 10,000 small systems).
        sizes = _validation.sizes_of(systems)
        total, count = int(sizes.sum()), len(systems)
        columns = isinstance(systems, _validation.Columns)   # already joined: one copy per field
        systems = systems or [_NO_SYSTEM]             # an all-padding batch: nothing to copy
        atoms = (lambda key: systems.atoms[key]) if columns else \
            (lambda key: np.concatenate([s[key] for s in systems]))
        for array, key in ((positions, "positions"), (velocities, "velocities"),
                           (atomic_numbers, "atomic_numbers"), (masses, "masses"), (fixed, "fixed"),
                           (tags, "tags"), (charges, "charges")):
            array[:total] = atoms(key)
        system_index[:total] = np.repeat(np.arange(count, dtype=np.int32), sizes)
        atom_mask[:total] = True
        cell[:count], pbc[:count] = _validation.cells_of(systems)
        n_atoms[:count] = sizes
        system_mask[:count] = True
        sample_id[:count] = _validation.sample_ids_of(systems) if count else []
        return cls(
            positions=jnp.asarray(positions), velocities=jnp.asarray(velocities),
            atomic_numbers=jnp.asarray(atomic_numbers), masses=jnp.asarray(masses),
            system_index=jnp.asarray(system_index), atom_mask=jnp.asarray(atom_mask),
            fixed=jnp.asarray(fixed), tags=jnp.asarray(tags), charges=jnp.asarray(charges),
            cell=jnp.asarray(cell), pbc=jnp.asarray(pbc), n_atoms=jnp.asarray(n_atoms),
            system_mask=jnp.asarray(system_mask), sample_id=jnp.asarray(sample_id),
            capacity=capacity,
        )

    @classmethod
    def from_atoms(
        cls,
        atoms_list: Sequence[Any],
        capacity: Capacity | None = None,
        sample_ids: Sequence[int] | None = None,
        min_distance: float | None = 0.5,
        on_close_atoms: str = "error",
    ) -> "Batch":
        """Build a batch from a list of ASE ``Atoms`` (one ``Atoms`` is accepted too).

        Keeps positions, velocities (ASE's Å/(ASE time) converted to Å/fs), cell,
        pbc, masses (ASE's, which default to standard atomic weights), tags,
        initial charges and ``FixAtoms`` constraints (as ``fixed``). Other
        constraints raise, since dropping them silently would change the physics.
        """
        from ase import Atoms, units as ase_units
        from ase.constraints import FixAtoms

        if isinstance(atoms_list, Atoms):
            atoms_list = [atoms_list]
        atoms_list = list(atoms_list)
        if not atoms_list:
            raise ValueError("Batch.from_atoms: the list of structures is empty")
        fields: dict[str, list] = {k: [] for k in (
            "positions", "atomic_numbers", "cell", "pbc", "velocities", "masses",
            "fixed", "tags", "charges")}
        ids = list(range(len(atoms_list))) if sample_ids is None else list(sample_ids)
        for i, atoms in enumerate(atoms_list):
            if not isinstance(atoms, Atoms):
                raise TypeError(f"Batch.from_atoms: system {i} is a {type(atoms).__name__}, "
                                "expected ase.Atoms")
            fixed = np.zeros(len(atoms), bool)
            for constraint in atoms.constraints:
                if isinstance(constraint, FixAtoms):
                    fixed[constraint.index] = True
                else:
                    sid = ids[i] if i < len(ids) else "?"
                    raise ValueError(
                        f"system {i} (sample_id {sid}): constraint "
                        f"{type(constraint).__name__} is not supported (only FixAtoms)")
            fields["positions"].append(atoms.get_positions())
            fields["atomic_numbers"].append(atoms.get_atomic_numbers())
            fields["cell"].append(np.asarray(atoms.get_cell()))
            fields["pbc"].append(atoms.get_pbc())
            # ASE velocities are Å per ASE time unit; ours are Å/fs.
            fields["velocities"].append(atoms.get_velocities() * ase_units.fs)
            fields["masses"].append(atoms.get_masses())
            fields["fixed"].append(fixed)
            fields["tags"].append(atoms.get_tags())
            fields["charges"].append(atoms.get_initial_charges())
        return cls.from_arrays(**fields, sample_ids=ids, capacity=capacity,
                               min_distance=min_distance, on_close_atoms=on_close_atoms,
                               _stacklevel=4)

    # ------------------------------------------------------------------ views
    def system_slices(self) -> list[np.ndarray]:
        """Host-side atom indices of every filled system, in slot order."""
        system_index = np.asarray(self.system_index)
        mask = np.asarray(self.system_mask)
        order = np.argsort(system_index, kind="stable")
        bounds = np.searchsorted(system_index[order], np.arange(self.num_systems + 1))
        return [order[bounds[s]:bounds[s + 1]] for s in range(self.num_systems) if mask[s]]

    def to_atoms(
        self,
        positions: Any = None,
        velocities: Any = None,
        cell: Any = None,
        energy: Any = None,
        forces: Any = None,
        stress: Any = None,
    ) -> list:
        """Convert filled systems back to ASE ``Atoms`` (in slot order).

        Arrays default to the batch's own; pass a state's ``positions``,
        ``velocities`` and ``cell`` and a model's ``energy (S,)``, ``forces
        (N, 3)`` and ``stress (S, 3, 3)`` to attach results, readable with
        ``atoms.get_potential_energy()`` etc. ``info["sample_id"]`` keeps the id.
        """
        from ase import Atoms, units as ase_units
        from ase.calculators.singlepoint import SinglePointCalculator
        from ase.constraints import FixAtoms
        from ase.stress import full_3x3_to_voigt_6_stress

        host = lambda x, default: np.asarray(default if x is None else x, dtype=float)
        pos = host(positions, self.positions)
        vel = host(velocities, self.velocities)
        cel = host(cell, self.cell)
        numbers = np.asarray(self.atomic_numbers)
        masses = np.asarray(self.masses, dtype=float)
        fixed = np.asarray(self.fixed)
        tags = np.asarray(self.tags)
        charges = np.asarray(self.charges, dtype=float)
        pbc = np.asarray(self.pbc)
        sample_id = np.asarray(self.sample_id)
        filled = np.flatnonzero(np.asarray(self.system_mask))
        e = None if energy is None else np.asarray(energy, dtype=float)
        f = None if forces is None else np.asarray(forces, dtype=float)
        st = None if stress is None else np.asarray(stress, dtype=float)
        out = []
        for s, idx in zip(filled, self.system_slices()):
            atoms = Atoms(numbers=numbers[idx], positions=pos[idx], cell=cel[s], pbc=pbc[s],
                          masses=masses[idx], tags=tags[idx], charges=charges[idx])
            atoms.set_velocities(vel[idx] / ase_units.fs)
            if fixed[idx].any():
                atoms.set_constraint(FixAtoms(indices=np.flatnonzero(fixed[idx])))
            atoms.info["sample_id"] = int(sample_id[s])
            results = {}
            if e is not None:
                results["energy"] = results["free_energy"] = float(e[s])
            if f is not None:
                results["forces"] = f[idx]
            if st is not None:
                results["stress"] = full_3x3_to_voigt_6_stress(st[s])
            if results:
                atoms.calc = SinglePointCalculator(atoms, **results)
            out.append(atoms)
        return out


_NO_SYSTEM = {"positions": np.zeros((0, 3)), "velocities": np.zeros((0, 3)),
              "atomic_numbers": np.zeros(0, np.int32), "masses": np.zeros(0), "fixed": np.zeros(0, bool),
              "tags": np.zeros(0, np.int32), "charges": np.zeros(0), "cell": np.zeros((3, 3)),
              "pbc": np.zeros(3, bool), "sample_id": -1}


def gather_systems(values: jax.Array, system_index: jax.Array, fill: Any = 0) -> jax.Array:
    """Per-system ``values (S, ...)`` broadcast to atoms ``(N, ...)``; padding atoms get ``fill``."""
    return jnp.take(values, system_index, axis=0, mode="fill", fill_value=fill)


def sum_systems(values: jax.Array, batch: Batch) -> jax.Array:
    """Per-atom ``values (N, ...)`` summed per system ``(S, ...)``; padding atoms are dropped."""
    return segments.segment_sum(values, batch.system_index, batch.num_systems)
