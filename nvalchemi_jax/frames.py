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
        system_index = np.asarray(batch.system_index)
        atom_order = np.argsort(system_index, kind="stable")
        bounds = np.searchsorted(system_index[atom_order], np.arange(batch.num_systems + 1))
        atoms = np.concatenate([atom_order[bounds[s]:bounds[s + 1]] for s in slots]) if len(slots) \
            else np.zeros(0, np.int64)
        counts = bounds[slots + 1] - bounds[slots]
        take_atoms = lambda x: np.asarray(x)[atoms]
        take_frames = lambda x: np.asarray(x)[slots]
        return cls(
            positions=take_atoms(state.positions), velocities=take_atoms(state.velocities),
            forces=take_atoms(state.forces), atomic_numbers=take_atoms(batch.atomic_numbers),
            masses=take_atoms(batch.masses), fixed=take_atoms(batch.fixed), tags=take_atoms(batch.tags),
            charges=take_atoms(batch.charges), cell=take_frames(state.cell), pbc=take_frames(batch.pbc),
            energy=take_frames(state.energy), stress=take_frames(state.stress),
            sample_id=take_frames(batch.sample_id).astype(np.int64), status=take_frames(state.status),
            failure=take_frames(state.failure), step=take_frames(state.step).astype(np.int64),
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
        lo, hi = self.offsets[index], self.offsets[index + 1]
        counts = hi - lo
        # Atom indices of the chosen frames without a Python loop: repeat starts, add ramps.
        atoms = np.repeat(lo - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts) + np.arange(counts.sum())
        fields = {f: getattr(self, f)[atoms] for f in ATOM_FIELDS}
        fields.update({f: getattr(self, f)[index] for f in FRAME_FIELDS})
        return Frames(**fields, offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))

    def to_batch(self, capacity=None, min_distance=None):
        """A :class:`~nvalchemi_jax.Batch` of these frames (their final positions, velocities, cell)."""
        from nvalchemi_jax.batch import Batch

        split = lambda x: np.split(x, self.offsets[1:-1])
        return Batch.from_arrays(
            positions=split(self.positions), atomic_numbers=split(self.atomic_numbers), cell=list(self.cell),
            pbc=list(self.pbc), velocities=split(self.velocities), masses=split(self.masses),
            fixed=split(self.fixed), tags=split(self.tags), charges=split(self.charges),
            sample_ids=self.sample_id.tolist(), capacity=capacity, min_distance=min_distance)

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
