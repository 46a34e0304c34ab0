"""An ASE calculator around any nvalchemi_jax model, so ASE's own dynamics and
optimizers (and anything else that takes a calculator) can drive our models."""

from __future__ import annotations

import jax
import numpy as np
from ase.calculators.calculator import Calculator as _AseCalculator
from ase.calculators.calculator import all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from nvalchemi_jax import neighbors
from nvalchemi_jax.batch import Batch
from nvalchemi_jax.models.base import compute


@jax.jit
def _evaluate(model, nl, positions, cell, batch):
    nl = neighbors.build(nl.spec, positions, cell, batch)
    out = compute(model, positions, cell, batch, nl, forces=True, stress=True)
    return out, nl


class Calculator(_AseCalculator):
    """ASE calculator: energy, free_energy, forces and (for fully periodic cells) stress.

    The neighbor list is rebuilt on every call (ASE moves atoms arbitrarily
    between calls); its capacity is chosen on the first call and grown if a
    later structure needs more, recompiling only then. Precision follows JAX's
    x64 mode: enable it (``jax.config.update("jax_enable_x64", True)``) for
    float64 results.

    Example::

        from ase.build import bulk
        atoms = bulk("Ar", "fcc", a=5.26, cubic=True) * (3, 3, 3)
        atoms.calc = Calculator(LennardJones(sigma=3.40, epsilon=0.0104, cutoff=8.5))
        atoms.get_potential_energy()
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, model, method: str = "auto", **kwargs):
        super().__init__(**kwargs)
        self.model = model
        self.method = method
        self._nl = None
        self._key = None

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        batch = Batch.from_arrays(
            positions=[atoms.get_positions()], atomic_numbers=[atoms.get_atomic_numbers()],
            cell=[np.asarray(atoms.get_cell())], pbc=[atoms.get_pbc()], min_distance=None)
        if hasattr(self.model, "check"):
            self.model.check(batch)
        key = (len(atoms), tuple(atoms.get_pbc()))
        if self._nl is None or key != self._key:
            _, self._nl = neighbors.allocate(batch, cutoff=self.model.cutoff, skin=0.0,
                                             method=self.method)
            self._key = key
        out, nl = _evaluate(self.model, self._nl, batch.positions, batch.cell, batch)
        while bool(nl.overflow):  # the structure changed enough to need a bigger list
            spec = neighbors.grow(nl)
            self._nl = neighbors.build(spec, batch.positions, batch.cell, batch)
            out, nl = _evaluate(self.model, self._nl, batch.positions, batch.cell, batch)
        n = len(atoms)
        energy = float(out.energy[0])
        self.results["energy"] = self.results["free_energy"] = energy
        self.results["forces"] = np.asarray(out.forces[:n], dtype=float)
        if atoms.cell.rank == 3 and all(atoms.get_pbc()):
            self.results["stress"] = full_3x3_to_voigt_6_stress(np.asarray(out.stress[0], dtype=float))
