"""`Frames`: a ragged set of finished systems on the host (numpy).

Per-atom arrays of all frames are concatenated; ``offsets (F + 1,)`` marks
where each frame's atoms start, so frame ``f`` owns atoms
``offsets[f]:offsets[f+1]``. This is the layout the sinks store (and the zarr
store on disk), and it converts to a :class:`~nvalchemi_jax.Batch` or to ASE
``Atoms`` without a Python loop over atoms.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

ATOM_FIELDS = ("positions", "velocities", "forces", "atomic_numbers", "masses", "fixed", "tags", "charges")
FRAME_FIELDS = ("cell", "pbc", "energy", "stress", "sample_id", "status", "failure", "step")


@dataclasses.dataclass
class Frames:
    """Ragged frames. Per atom ``(A, ...)``: positions Å, velocities Å/fs, forces eV/Å,
    atomic_numbers, masses amu, fixed, tags, charges. Per frame ``(F, ...)``: cell Å,
    pbc, energy eV, stress eV/Å³, sample_id, status, failure (reason code, 0 = none),
    step (the system's own step count). ``offsets (F + 1,) int64``."""

    positions: np.ndarray
    velocities: np.ndarray
    forces: np.ndarray
    atomic_numbers: np.ndarray
    masses: np.ndarray
    fixed: np.ndarray
    tags: np.ndarray
    charges: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray
    energy: np.ndarray
    stress: np.ndarray
    sample_id: np.ndarray
    status: np.ndarray
    failure: np.ndarray
    step: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.sample_id)

    @property
    def n_atoms(self) -> np.ndarray:
        return np.diff(self.offsets)

    @classmethod
    def empty(cls, dtype=np.float32) -> "Frames":
        z = lambda *shape, dt=dtype: np.zeros(shape, dt)
        return cls(positions=z(0, 3), velocities=z(0, 3), forces=z(0, 3), atomic_numbers=z(0, dt=np.int32),
                   masses=z(0), fixed=z(0, dt=bool), tags=z(0, dt=np.int32), charges=z(0),
                   cell=z(0, 3, 3), pbc=z(0, 3, dt=bool), energy=z(0), stress=z(0, 3, 3),
                   sample_id=z(0, dt=np.int64), status=z(0, dt=np.int32), failure=z(0, dt=np.int32),
                   step=z(0, dt=np.int64), offsets=np.zeros(1, np.int64))

    @classmethod
    def from_state(cls, state, batch, systems) -> "Frames":
        """The systems selected by ``systems (S,) bool`` (host mask), copied to the host in slot order."""
        systems = np.asarray(systems, bool)
        slots = np.flatnonzero(systems)
        # Everything needed in one device_get (the copies run together; numpy passes through).
        state_f = ("positions", "velocities", "forces", "cell", "energy", "stress", "status", "failure", "step")
        batch_f = ("atomic_numbers", "masses", "fixed", "tags", "charges", "pbc", "sample_id", "system_index")
        state, batch_h = jax.device_get(({f: getattr(state, f) for f in state_f},
                                         {f: getattr(batch, f) for f in batch_f}))
        system_index = np.asarray(batch_h["system_index"])
        # The chosen systems' atoms in index order, then grouped by slot (a stable sort of
        # just those atoms, skipped when they already are: no sort of the whole batch).
        atoms = np.flatnonzero(np.append(systems, False)[system_index])
        owner = system_index[atoms]
        if np.any(owner[1:] < owner[:-1]):
            order = np.argsort(owner, kind="stable")
            atoms, owner = atoms[order], owner[order]
        counts = np.bincount(owner, minlength=len(systems))[slots]
        # Snapshots of a whole batch select one contiguous run of atoms: slicing it is
        # ~20x faster than fancy indexing (hundreds of thousands of atoms per frame set).
        if len(atoms) and atoms[-1] - atoms[0] + 1 == len(atoms) and np.all(np.diff(atoms) == 1):
            atoms = slice(int(atoms[0]), int(atoms[-1]) + 1)
        # A contiguous run stays a view: the host arrays here are fresh copies of device
        # data (or read-only views of them) that nothing writes to (a snapshot of 262,144
        # atoms spent half its host time copying them again).
        take_atoms = lambda x: np.asarray(x)[atoms]
        take_frames = lambda x: np.asarray(x)[slots]
        s, b = state, batch_h
        return cls(
            positions=take_atoms(s["positions"]), velocities=take_atoms(s["velocities"]),
            forces=take_atoms(s["forces"]), atomic_numbers=take_atoms(b["atomic_numbers"]),
            masses=take_atoms(b["masses"]), fixed=take_atoms(b["fixed"]), tags=take_atoms(b["tags"]),
            charges=take_atoms(b["charges"]), cell=take_frames(s["cell"]), pbc=take_frames(b["pbc"]),
            energy=take_frames(s["energy"]), stress=take_frames(s["stress"]),
            sample_id=take_frames(b["sample_id"]).astype(np.int64), status=take_frames(s["status"]),
            failure=take_frames(s["failure"]), step=take_frames(s["step"]).astype(np.int64),
            offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))

    @staticmethod
    def concatenate(parts: list["Frames"]) -> "Frames":
        parts = [p for p in parts if len(p)] or parts[:1]
        if not parts:
            return Frames.empty()
        if len(parts) == 1:
            return parts[0]
        fields = {f: np.concatenate([getattr(p, f) for p in parts]) for f in ATOM_FIELDS + FRAME_FIELDS}
        starts = np.cumsum([0] + [p.offsets[-1] for p in parts[:-1]])
        offsets = np.concatenate([[0]] + [p.offsets[1:] + s for p, s in zip(parts, starts)])
        return Frames(**fields, offsets=offsets.astype(np.int64))

    def select(self, frames: slice | np.ndarray) -> "Frames":
        """A subset of frames (a slice or an index/bool array), in the given order."""
        index = np.arange(len(self))[frames]
        if len(index) == len(self) and np.array_equal(index, np.arange(len(self))):
            return self                                   # everything, in order (sinks' usual case)
        if len(index) and np.all(np.diff(index) == 1):    # one run of frames: slice, don't gather
            first, last = int(index[0]), int(index[-1])
            atoms = slice(int(self.offsets[first]), int(self.offsets[last + 1]))
            fields = {f: np.array(getattr(self, f)[atoms]) for f in ATOM_FIELDS}
            fields.update({f: np.array(getattr(self, f)[first:last + 1]) for f in FRAME_FIELDS})
            return Frames(**fields, offsets=self.offsets[first:last + 2] - self.offsets[first])
        lo, hi = self.offsets[index], self.offsets[index + 1]
        counts = hi - lo
        # Atom indices of the chosen frames without a Python loop: repeat starts, add ramps.
        atoms = np.repeat(lo - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts) + np.arange(counts.sum())
        fields = {f: getattr(self, f)[atoms] for f in ATOM_FIELDS}
        fields.update({f: getattr(self, f)[index] for f in FRAME_FIELDS})
        return Frames(**fields, offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))

    def to_batch(self, capacity=None):
        """A :class:`~nvalchemi_jax.Batch` of these frames (their final positions, velocities,
        cell), built with array operations only (no loop over frames). Frames came out of a
        validated run, so only the capacity and unique sample ids are checked."""
        import jax.numpy as jnp

        from nvalchemi_jax.batch import Batch, default_float_dtype
        from nvalchemi_jax.capacity import Capacity

        n_frames, n_atoms = len(self), int(self.offsets[-1])
        capacity = capacity or Capacity.for_systems(self.n_atoms.tolist())
        if n_frames > capacity.num_systems or n_atoms > capacity.num_atoms:
            raise ValueError(f"{n_frames} frames of {n_atoms} atoms do not fit {capacity}")
        if len(np.unique(self.sample_id)) != n_frames:
            raise ValueError("Frames.to_batch: sample ids repeat (e.g. several snapshots of one "
                             "sample); select one frame per sample first")
        fdt = default_float_dtype()
        pad_atoms = lambda x, fill, dt: np.concatenate(
            [np.asarray(x, dt), np.full((capacity.num_atoms - n_atoms,) + x.shape[1:], fill, dt)])
        pad_frames = lambda x, fill, dt: np.concatenate(
            [np.asarray(x, dt), np.full((capacity.num_systems - n_frames,) + x.shape[1:], fill, dt)])
        system_index = np.repeat(np.arange(n_frames, dtype=np.int32), self.n_atoms)
        return Batch(
            positions=jnp.asarray(pad_atoms(self.positions, 0, fdt)),
            velocities=jnp.asarray(pad_atoms(self.velocities, 0, fdt)),
            atomic_numbers=jnp.asarray(pad_atoms(self.atomic_numbers, 0, np.int32)),
            masses=jnp.asarray(pad_atoms(self.masses, 1, fdt)),
            system_index=jnp.asarray(pad_atoms(system_index, capacity.num_systems, np.int32)),
            atom_mask=jnp.asarray(pad_atoms(np.ones(n_atoms, bool), False, bool)),
            fixed=jnp.asarray(pad_atoms(self.fixed, False, bool)),
            tags=jnp.asarray(pad_atoms(self.tags, 0, np.int32)),
            charges=jnp.asarray(pad_atoms(self.charges, 0, fdt)),
            cell=jnp.asarray(pad_frames(self.cell, 0, fdt)), pbc=jnp.asarray(pad_frames(self.pbc, False, bool)),
            n_atoms=jnp.asarray(pad_frames(self.n_atoms, 0, np.int32)),
            system_mask=jnp.asarray(pad_frames(np.ones(n_frames, bool), False, bool)),
            sample_id=jnp.asarray(pad_frames(self.sample_id, -1, np.int32)), capacity=capacity)

    def to_atoms(self) -> list:
        """ASE ``Atoms`` per frame with energy, forces and stress attached; ``info`` holds
        sample_id, status, failure and step. (Frames may repeat a sample, e.g. snapshots.)"""
        from ase import Atoms, units as ase_units
        from ase.calculators.singlepoint import SinglePointCalculator
        from ase.constraints import FixAtoms
        from ase.stress import full_3x3_to_voigt_6_stress

        out = []
        for f in range(len(self)):
            sl = slice(self.offsets[f], self.offsets[f + 1])
            atoms = Atoms(numbers=self.atomic_numbers[sl], positions=self.positions[sl], cell=self.cell[f],
                          pbc=self.pbc[f], masses=self.masses[sl], tags=self.tags[sl],
                          charges=self.charges[sl], velocities=self.velocities[sl] / ase_units.fs)
            if self.fixed[sl].any():
                atoms.set_constraint(FixAtoms(indices=np.flatnonzero(self.fixed[sl])))
            atoms.calc = SinglePointCalculator(
                atoms, energy=float(self.energy[f]), free_energy=float(self.energy[f]),
                forces=np.asarray(self.forces[sl], float),
                stress=full_3x3_to_voigt_6_stress(np.asarray(self.stress[f], float)))
            atoms.info.update(sample_id=int(self.sample_id[f]), status=int(self.status[f]),
                              failure=int(self.failure[f]), step=int(self.step[f]))
            out.append(atoms)
        return out
