"""`SizeAwareSampler`: packs samples of a dataset into a fixed capacity, and refills it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from nvalchemi_jax import _validation
from nvalchemi_jax.batch import Batch
from nvalchemi_jax.capacity import Capacity


def _system_fields(item: Any) -> dict:
    """One dataset item (ASE ``Atoms`` or a dict of arrays) as ``Batch.from_arrays`` fields."""
    if isinstance(item, dict):
        return item
    from ase import Atoms, units as ase_units
    from ase.constraints import FixAtoms

    if not isinstance(item, Atoms):
        raise TypeError(f"dataset items must be ase.Atoms or dicts of arrays, got {type(item).__name__}")
    fixed = np.zeros(len(item), bool)
    for c in item.constraints:
        if not isinstance(c, FixAtoms):
            raise ValueError(f"constraint {type(c).__name__} is not supported (only FixAtoms)")
        fixed[c.index] = True
    return dict(positions=item.get_positions(), atomic_numbers=item.get_atomic_numbers(),
                cell=np.asarray(item.get_cell()), pbc=item.get_pbc(),
                velocities=item.get_velocities() * ase_units.fs, masses=item.get_masses(),
                fixed=fixed, tags=item.get_tags(), charges=item.get_initial_charges())


class SizeAwareSampler:
    """Hands out samples of ``dataset`` that fit the free room of a batch.

    dataset: anything with ``__len__`` and ``__getitem__`` returning ASE ``Atoms`` or a
        dict of ``Batch.from_arrays`` fields for one system (``positions``,
        ``atomic_numbers``, optional ``cell``, ``pbc``, ...). A list of ``Atoms`` works as is.
    capacity: the :class:`Capacity` to fill; or give ``max_atoms`` / ``max_systems``.
    sizes: atoms per sample, if known cheaply; else ``dataset.n_atoms(i)`` if the
        dataset has it, else ``len(dataset[i])``.
    lookahead: how many upcoming samples (at least as many as there are free
        slots) are scanned for ones that fit (first fit in dataset order within
        that window, so order is kept roughly and big samples are not starved).

    The sample id of a system is its dataset index. Example::

        sampler = SizeAwareSampler(structures, Capacity(512, 60_000))
        result = (relax + md).run(sampler=sampler, sinks=[ZarrData("out.zarr")])
    """

    def __init__(self, dataset: Sequence[Any], capacity: Capacity | None = None, max_atoms: int | None = None,
                 max_systems: int | None = None, sizes: Sequence[int] | None = None, lookahead: int = 256):
        self.dataset = dataset
        n = len(dataset)
        if sizes is None:
            sizes = [dataset.n_atoms(i) for i in range(n)] if hasattr(dataset, "n_atoms") \
                else [len(dataset[i]) if not isinstance(dataset[i], dict)
                      else len(dataset[i]["atomic_numbers"]) for i in range(n)]
        self.sizes = np.asarray(sizes, np.int64)
        if len(self.sizes) != n:
            raise ValueError(f"sizes has {len(self.sizes)} entries for a dataset of {n}")
        if capacity is None:
            if max_atoms is None or max_systems is None:
                raise ValueError("SizeAwareSampler needs a capacity, or both max_atoms and max_systems")
            capacity = Capacity(int(max_systems), int(max_atoms))
        self.capacity = capacity
        too_big = np.flatnonzero(self.sizes > capacity.num_atoms)
        if too_big.size:
            i = int(too_big[0])
            raise ValueError(f"sample {i} has {int(self.sizes[i])} atoms, more than capacity.num_atoms = "
                             f"{capacity.num_atoms}")
        if np.any(self.sizes < 1):
            raise ValueError(f"sample {int(np.flatnonzero(self.sizes < 1)[0])} has no atoms")
        self.lookahead = int(lookahead)
        self._pending = list(range(n))     # dataset indices not yet handed out, in order
        self.handed_out = 0
        self._ready: dict[int, dict] = {}  # validated samples, from prefetch()

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def exhausted(self) -> bool:
        return not self._pending

    @property
    def remaining(self) -> int:
        return len(self._pending)

    def take(self, free_systems: int, free_atoms: int) -> list[int]:
        """Dataset indices of samples that fit ``free_systems`` slots and ``free_atoms`` atoms."""
        chosen, kept = [], []
        # The window is never narrower than the free slots: a large batch refilled
        # after many systems finished must be able to take that many in one go.
        width = max(self.lookahead, free_systems)
        window = self._pending[:width]
        for i in window:
            size = int(self.sizes[i])
            if len(chosen) < free_systems and size <= free_atoms:
                chosen.append(i)
                free_atoms -= size
            else:
                kept.append(i)
        self._pending = kept + self._pending[width:]
        self.handed_out += len(chosen)
        return chosen

    def take_all(self) -> list[int]:
        """Every pending dataset index, in order (for runs that hold the whole dataset)."""
        chosen, self._pending = self._pending, []
        self.handed_out += len(chosen)
        return chosen

    def give_back(self, indices: list[int]) -> None:
        """Return samples that were taken but never started to the front of the queue."""
        indices = [int(i) for i in indices]
        self._pending = indices + self._pending
        self.handed_out -= len(indices)

    def prefetch(self, count: int) -> None:
        """Read and validate the next ``count`` pending samples ahead of :meth:`systems`
        (the inflight loop calls this while the device runs a chunk, so the work
        overlaps). A sample that fails validation is left for :meth:`systems` to report."""
        todo = [i for i in self._pending[:max(int(count), 0)] if i not in self._ready]
        if not todo:
            return
        try:
            validated = self._validate(todo)
        except (ValueError, TypeError):
            return
        self._ready.update(zip(todo, validated))

    def systems(self, indices: list[int]) -> list[dict]:
        """Validated per-system fields of the given samples (sample id = dataset index)."""
        if not indices:
            return []
        if not any(i in self._ready for i in indices):
            # Validated together and kept as whole columns: packing 10,000 of them then
            # copies each field once instead of joining 10,000 arrays.
            return self._validate(list(indices))
        missing = [i for i in indices if i not in self._ready]
        if missing:
            self._ready.update(zip(missing, self._validate(missing)))
        return [self._ready.pop(i) for i in indices]

    def _validate(self, indices: list[int]) -> list[dict]:
        fields = [_system_fields(self.dataset[i]) for i in indices]
        keys = ("positions", "atomic_numbers", "cell", "pbc", "velocities", "masses", "fixed", "tags", "charges")
        columns = {k: ([f.get(k) for f in fields] if any(k in f for f in fields) else None) for k in keys}
        if columns["pbc"] is not None:
            columns["pbc"] = [np.zeros(3, bool) if p is None else p for p in columns["pbc"]]
        for k in ("velocities", "masses", "cell"):
            if columns[k] is not None and any(v is None for v in columns[k]):
                raise ValueError(f"field '{k}' is given for some samples but not others")
        return _validation.validate_systems(**columns, sample_ids=list(indices))

    def initial_batch(self, min_distance: float | None = 0.5) -> Batch:
        """The first batch: as many samples as fit, packed into the capacity."""
        indices = self.take(self.capacity.num_systems, self.capacity.num_atoms)
        systems = self.systems(indices)
        batch = Batch._pack(systems, self.capacity)
        if min_distance is not None:
            _validation.check_close_atoms(batch, min_distance, "error")
        return batch

    def state_dict(self) -> dict:
        """The cursor, for checkpoints."""
        return {"pending": list(self._pending), "handed_out": self.handed_out}

    def load_state_dict(self, state: dict) -> None:
        self._pending = list(state["pending"])
        self.handed_out = int(state["handed_out"])
        self._ready = {}
