"""Our models inside ASE: the calculator agrees with ASE's own LJ and drives ASE's optimizers."""

import numpy as np
import pytest
from ase.build import bulk, molecule
from ase.calculators.lj import LennardJones as AseLJ
from ase.constraints import FixAtoms
from ase.optimize import BFGS

from nvalchemi_jax.ase import Calculator
from nvalchemi_jax.models import LennardJones

SIGMA, EPSILON, CUTOFF = 3.40, 0.0104, 8.5


def argon(repeats=(3, 3, 3), seed=0):
    atoms = bulk("Ar", "fcc", a=5.26, cubic=True) * repeats
    atoms.rattle(0.05, seed=seed)
    return atoms


def compare(atoms):
    ours = atoms.copy()
    ours.calc = Calculator(LennardJones(sigma=SIGMA, epsilon=EPSILON, cutoff=CUTOFF, shift=True))
    ref = atoms.copy()
    ref.calc = AseLJ(sigma=SIGMA, epsilon=EPSILON, rc=CUTOFF, smooth=False)
    return ours, ref


def test_matches_ase_lj_float64(x64):
    ours, ref = compare(argon())
    assert ours.get_potential_energy() == pytest.approx(ref.get_potential_energy(), rel=1e-10)
    np.testing.assert_allclose(ours.get_forces(), ref.get_forces(), atol=1e-10)
    np.testing.assert_allclose(ours.get_stress(), ref.get_stress(), atol=1e-12)
    assert ours.get_potential_energy(force_consistent=True) == ours.get_potential_energy()


def test_matches_ase_lj_float32():
    ours, ref = compare(argon())
    scale = np.abs(ref.get_forces()).max()
    assert ours.get_potential_energy() == pytest.approx(ref.get_potential_energy(), rel=2e-5)
    np.testing.assert_allclose(ours.get_forces(), ref.get_forces(), atol=2e-4 * scale)


def test_cluster_has_no_stress(x64):
    cluster = argon((2, 2, 2))
    cluster.pbc = False
    ours, ref = compare(cluster)
    assert ours.get_potential_energy() == pytest.approx(ref.get_potential_energy(), rel=1e-10)
    assert "stress" not in ours.calc.results


def test_drives_ase_optimizer_and_size_changes(x64):
    atoms = argon((2, 2, 2))
    atoms.set_constraint(FixAtoms(indices=[0]))   # constraints are ASE's business
    atoms.calc = Calculator(LennardJones(sigma=SIGMA, epsilon=EPSILON, cutoff=CUTOFF, shift=True))
    start = atoms.positions[0].copy()
    BFGS(atoms, logfile=None).run(fmax=1e-3, steps=200)
    assert np.abs(atoms.get_forces()).max() < 1e-3
    np.testing.assert_array_equal(atoms.positions[0], start)
    # A different structure on the same calculator gets a new neighbor list.
    bigger = argon((3, 3, 3))
    bigger.calc = atoms.calc
    ref = bigger.copy()
    ref.calc = AseLJ(sigma=SIGMA, epsilon=EPSILON, rc=CUTOFF, smooth=False)
    assert bigger.get_potential_energy() == pytest.approx(ref.get_potential_energy(), rel=1e-10)


def test_compressed_structure_grows_neighbor_list(x64):
    atoms = argon((3, 3, 3))
    calc = Calculator(LennardJones(sigma=SIGMA, epsilon=EPSILON, cutoff=CUTOFF, shift=True))
    atoms.calc = calc
    atoms.get_potential_energy()
    atoms.set_cell(atoms.cell * 0.8, scale_atoms=True)   # denser: more neighbors than allocated
    ref = atoms.copy()
    ref.calc = AseLJ(sigma=SIGMA, epsilon=EPSILON, rc=CUTOFF, smooth=False)
    assert atoms.get_potential_energy() == pytest.approx(ref.get_potential_energy(), rel=1e-10)


def test_missing_species_raises():
    water = molecule("H2O")
    water.calc = Calculator(LennardJones.mixed(species=(18,), sigma=[SIGMA], epsilon=[EPSILON],
                                               cutoff=CUTOFF))
    with pytest.raises(ValueError, match=r"atomic numbers \[1, 8\]"):
        water.get_potential_energy()
