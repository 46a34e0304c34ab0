"""Batch / Capacity layer: building from ASE and from arrays, padding layout,
round trips back to ASE, host-side validation and precision handling."""

from __future__ import annotations

import dataclasses
import re
import warnings

import ase.units
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, fcc111, molecule
from ase.constraints import FixAtoms, FixBondLength, FixCartesian
from ase.data import atomic_masses
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

from nvalchemi_jax import BufferConfig, Batch, Capacity, units
from nvalchemi_jax.batch import gather_systems, sum_systems

# ASE 3.29 deprecates MaxwellBoltzmannDistribution in favour of thermalize_momenta.
pytestmark = pytest.mark.filterwarnings("ignore:Use thermalize_momenta:DeprecationWarning")

F32 = dict(rtol=1e-6, atol=1e-5)     # positions/cells of ~10 Å stored as float32
# The close-atoms check builds (and jit-compiles) a neighbor list for every new
# shape, ~1-3 s each on CPU; tests that are not about it skip it to stay fast.
NO_CHECK = dict(min_distance=None)


# --------------------------------------------------------------------------- helpers
def make_structures(seed: int = 0) -> list[Atoms]:
    """Three systems of different sizes: periodic bulk, a molecule, a slab with FixAtoms."""
    rng = np.random.default_rng(seed)
    cu = bulk("Cu", "fcc", a=3.61, cubic=True) * (2, 1, 1)           # 8 atoms, pbc TTT
    cu.rattle(0.02, seed=seed)
    cu.set_tags([0, 1, 2, 3, 0, 1, 2, 3])
    MaxwellBoltzmannDistribution(cu, temperature_K=300.0, rng=rng)

    water = molecule("H2O")                                           # 3 atoms, pbc FFF
    water.set_initial_charges([-0.8, 0.4, 0.4])
    MaxwellBoltzmannDistribution(water, temperature_K=500.0, rng=rng)

    slab = fcc111("Al", size=(2, 2, 2), vacuum=5.0)                   # 8 atoms, pbc TTF
    slab.set_constraint(FixAtoms(mask=slab.get_tags() == 2))          # bottom layer
    MaxwellBoltzmannDistribution(slab, temperature_K=200.0, rng=rng)
    return [cu, water, slab]


def slices(batch: Batch) -> list[np.ndarray]:
    return batch.system_slices()


def host(x, dtype=float):
    return np.asarray(x, dtype=dtype)


def raises(exc, *parts):
    """pytest.raises whose match requires every (literal) substring, in any order."""
    pattern = "(?s)^" + "".join(f"(?=.*{re.escape(p)})" for p in parts)
    return pytest.raises(exc, match=pattern)


def warns(*parts):
    pattern = "(?s)^" + "".join(f"(?=.*{re.escape(p)})" for p in parts)
    return pytest.warns(UserWarning, match=pattern)


# --------------------------------------------------------------------------- from_atoms
def test_from_atoms_fields():
    atoms_list = make_structures()
    batch = Batch.from_atoms(atoms_list)
    assert [len(idx) for idx in slices(batch)] == [8, 3, 8]
    np.testing.assert_array_equal(host(batch.n_atoms[:3], int), [8, 3, 8])
    for s, (atoms, idx) in enumerate(zip(atoms_list, slices(batch))):
        np.testing.assert_allclose(host(batch.positions[idx]), atoms.positions, **F32)
        np.testing.assert_allclose(host(batch.cell[s]), atoms.cell[:], **F32)
        np.testing.assert_array_equal(host(batch.pbc[s], bool), atoms.pbc)
        np.testing.assert_array_equal(host(batch.atomic_numbers[idx], int), atoms.numbers)
        # default masses are the standard atomic weights ASE uses
        np.testing.assert_allclose(host(batch.masses[idx]), atomic_masses[atoms.numbers], rtol=1e-6)
        np.testing.assert_array_equal(host(batch.tags[idx], int), atoms.get_tags())
        np.testing.assert_allclose(host(batch.charges[idx]), atoms.get_initial_charges(), rtol=1e-6)
        # ASE velocities are Å per ASE time unit; ours are Å/fs = ASE value * ase.units.fs
        v_ase = atoms.get_velocities()
        assert np.abs(v_ase).max() > 0
        np.testing.assert_allclose(host(batch.velocities[idx]), v_ase * ase.units.fs,
                                   rtol=1e-5, atol=1e-9)
        # ... and independently: KE = 1/2 m v² with v converted to internal units
        v_internal = host(batch.velocities[idx]) * units.FS_PER_INTERNAL_TIME
        ke = 0.5 * np.sum(host(batch.masses[idx])[:, None] * v_internal**2)
        assert ke == pytest.approx(atoms.get_kinetic_energy(), rel=1e-5)
    # water has charges, the others none; only the slab has fixed atoms
    fixed = host(batch.fixed, bool)
    cu_idx, w_idx, slab_idx = slices(batch)
    assert not fixed[cu_idx].any() and not fixed[w_idx].any()
    np.testing.assert_array_equal(fixed[slab_idx], atoms_list[2].get_tags() == 2)
    assert fixed[slab_idx].sum() == 4
    # velocities at 300 K are a few 1e-3 Å/fs
    assert 1e-4 < np.abs(host(batch.velocities[cu_idx])).mean() < 1e-2


def test_from_atoms_custom_masses_kept():
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
    masses = atoms.get_masses()
    masses[0] = 65.0
    atoms.set_masses(masses)
    batch = Batch.from_atoms(atoms, **NO_CHECK)
    np.testing.assert_allclose(host(batch.masses[:4]), masses, rtol=1e-6)


def test_padding_layout_with_explicit_capacity():
    atoms_list = make_structures()
    capacity = Capacity(num_systems=5, num_atoms=64, max_neighbors=40)
    batch = Batch.from_atoms(atoms_list, capacity=capacity, sample_ids=[10, 3, 7], **NO_CHECK)
    assert batch.capacity is capacity
    assert batch.num_systems == 5 and batch.num_atoms == 64
    assert batch.positions.shape == (64, 3) and batch.velocities.shape == (64, 3)
    for name in ("atomic_numbers", "masses", "system_index", "atom_mask", "fixed", "tags", "charges"):
        assert getattr(batch, name).shape == (64,), name
    assert batch.cell.shape == (5, 3, 3) and batch.pbc.shape == (5, 3)
    for name in ("n_atoms", "system_mask", "sample_id"):
        assert getattr(batch, name).shape == (5,), name

    n = 19
    system_index = host(batch.system_index, int)
    np.testing.assert_array_equal(system_index[:n], np.repeat([0, 1, 2], [8, 3, 8]))
    np.testing.assert_array_equal(system_index[n:], 5)             # padding points past S
    np.testing.assert_array_equal(host(batch.atom_mask, bool), np.arange(64) < n)
    np.testing.assert_array_equal(host(batch.system_mask, bool), [True] * 3 + [False] * 2)
    np.testing.assert_array_equal(host(batch.sample_id, int), [10, 3, 7, -1, -1])
    np.testing.assert_array_equal(host(batch.n_atoms, int), [8, 3, 8, 0, 0])
    np.testing.assert_array_equal(host(batch.masses[n:]), 1.0)     # no division by zero
    np.testing.assert_array_equal(host(batch.positions[n:]), 0.0)
    np.testing.assert_array_equal(host(batch.velocities[n:]), 0.0)
    np.testing.assert_array_equal(host(batch.atomic_numbers[n:], int), 0)
    assert not host(batch.fixed[n:], bool).any()
    np.testing.assert_array_equal(host(batch.cell[3:]), 0.0)
    assert not host(batch.pbc[3:], bool).any()

    # per-system reductions drop the padding
    total_mass = host(sum_systems(batch.masses, batch))
    expected = [a.get_masses().sum() for a in atoms_list] + [0.0, 0.0]
    np.testing.assert_allclose(total_mass, expected, rtol=1e-6)
    gathered = host(gather_systems(batch.sample_id, batch.system_index, fill=-7), int)
    np.testing.assert_array_equal(gathered[:n], np.repeat([10, 3, 7], [8, 3, 8]))
    np.testing.assert_array_equal(gathered[n:], -7)


def test_automatic_capacity_and_headroom():
    atoms_list = make_structures()
    batch = Batch.from_atoms(atoms_list, **NO_CHECK)
    assert batch.capacity == Capacity.for_systems([8, 3, 8])
    assert batch.capacity == Capacity(num_systems=3, num_atoms=32)
    np.testing.assert_array_equal(host(batch.sample_id, int), [0, 1, 2])
    assert host(batch.system_mask, bool).all()

    capacity = Capacity.for_systems([8, 3, 8], headroom=1.0, max_neighbors=32)
    assert capacity == Capacity(num_systems=6, num_atoms=64, max_neighbors=32)
    batch = Batch.from_atoms(atoms_list, capacity=capacity, **NO_CHECK)
    assert batch.capacity == capacity
    np.testing.assert_array_equal(host(batch.system_mask, bool), [True] * 3 + [False] * 3)
    np.testing.assert_array_equal(host(batch.sample_id, int), [0, 1, 2, -1, -1, -1])
    assert host(batch.atom_mask, bool).sum() == 19


def test_single_atoms_accepted():
    atoms = bulk("Ar", "fcc", a=5.26, cubic=True)
    batch = Batch.from_atoms(atoms, **NO_CHECK)
    assert batch.capacity == Capacity(num_systems=1, num_atoms=32)
    np.testing.assert_array_equal(host(batch.n_atoms, int), [4])
    np.testing.assert_allclose(host(batch.positions[:4]), atoms.positions, **F32)
    assert len(batch.to_atoms()) == 1


@pytest.mark.parametrize("constraint, name", [
    (FixBondLength(0, 1), "FixBondLength"),
    (FixCartesian(0, mask=(True, False, False)), "FixCartesian"),
])
def test_other_constraints_raise(constraint, name):
    atoms_list = make_structures()
    atoms_list[1].set_constraint(constraint)
    with raises(ValueError, "system 1 (sample_id 21)", name, "only FixAtoms"):
        Batch.from_atoms(atoms_list, sample_ids=[20, 21, 22])


def test_from_atoms_rejects_non_atoms():
    with raises(TypeError, "system 1", "expected ase.Atoms"):
        Batch.from_atoms([bulk("Ar", "fcc", a=5.26), np.zeros((3, 3))])


# --------------------------------------------------------------------------- to_atoms
def test_to_atoms_round_trip():
    atoms_list = make_structures()
    batch = Batch.from_atoms(atoms_list, capacity=Capacity(5, 64), sample_ids=[10, 3, 7], **NO_CHECK)
    back = batch.to_atoms()
    assert len(back) == 3                                       # empty slots are skipped
    for orig, new, sid in zip(atoms_list, back, [10, 3, 7]):
        assert new.info["sample_id"] == sid
        np.testing.assert_allclose(new.positions, orig.positions, **F32)
        np.testing.assert_allclose(new.cell[:], orig.cell[:], **F32)
        np.testing.assert_array_equal(new.pbc, orig.pbc)
        np.testing.assert_array_equal(new.numbers, orig.numbers)
        np.testing.assert_allclose(new.get_masses(), orig.get_masses(), rtol=1e-6)
        np.testing.assert_allclose(new.get_velocities(), orig.get_velocities(), rtol=1e-5, atol=1e-8)
        np.testing.assert_array_equal(new.get_tags(), orig.get_tags())
        np.testing.assert_allclose(new.get_initial_charges(), orig.get_initial_charges(), rtol=1e-6)
        assert new.calc is None
    assert back[0].constraints == [] and back[1].constraints == []
    (fix,) = back[2].constraints
    assert isinstance(fix, FixAtoms)
    np.testing.assert_array_equal(np.sort(fix.index), np.flatnonzero(atoms_list[2].get_tags() == 2))
    # a second round trip reproduces the batch
    again = Batch.from_atoms(back, capacity=batch.capacity, sample_ids=[10, 3, 7], **NO_CHECK)
    for name in ("positions", "velocities", "masses", "cell", "charges"):
        np.testing.assert_allclose(host(getattr(again, name)), host(getattr(batch, name)),
                                   rtol=1e-6, atol=1e-7, err_msg=name)
    for name in ("atomic_numbers", "system_index", "atom_mask", "fixed", "tags", "pbc",
                 "n_atoms", "system_mask", "sample_id"):
        np.testing.assert_array_equal(host(getattr(again, name), int), host(getattr(batch, name), int),
                                      err_msg=name)


def test_to_atoms_attaches_results_and_overrides():
    atoms_list = make_structures()
    batch = Batch.from_atoms(atoms_list, capacity=Capacity(4, 32), **NO_CHECK)
    rng = np.random.default_rng(3)
    energy = np.array([-1.5, 2.25, -7.0, 0.0])
    forces = rng.normal(size=(32, 3))
    stress = np.zeros((4, 3, 3))
    for s in range(4):
        a = rng.normal(size=(3, 3))
        stress[s] = a + a.T                                     # symmetric, all entries distinct
    new_positions = host(batch.positions) + 0.25
    back = batch.to_atoms(positions=new_positions, energy=energy, forces=forces, stress=stress)
    for s, (atoms, idx) in enumerate(zip(back, slices(batch))):
        assert atoms.get_potential_energy() == pytest.approx(energy[s])
        np.testing.assert_allclose(atoms.get_forces(apply_constraint=False), forces[idx])
        st = stress[s]
        voigt = [st[0, 0], st[1, 1], st[2, 2], st[1, 2], st[0, 2], st[0, 1]]   # xx yy zz yz xz xy
        np.testing.assert_allclose(atoms.get_stress(), voigt)
        np.testing.assert_allclose(atoms.get_stress(voigt=False), st)
        np.testing.assert_allclose(atoms.positions, atoms_list[s].positions + 0.25, **F32)
    # ASE applies FixAtoms to get_forces(): the fixed slab atoms read zero
    slab_forces = back[2].get_forces()
    fixed = atoms_list[2].get_tags() == 2
    np.testing.assert_array_equal(slab_forces[fixed], 0.0)
    np.testing.assert_allclose(slab_forces[~fixed], forces[slices(batch)[2]][~fixed])


# --------------------------------------------------------------------------- from_arrays
def test_from_arrays_plain_lists_and_defaults():
    positions = [[[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]],
                 [[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]]]
    numbers = [[29, 29], [8, 1, 1]]
    cell = [[[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0]], np.zeros((3, 3)).tolist()]
    batch = Batch.from_arrays(positions, numbers, cell=cell, pbc=[True, False], **NO_CHECK)
    assert batch.capacity == Capacity(2, 32)
    np.testing.assert_allclose(host(batch.positions[:5]), np.concatenate([np.array(p) for p in positions]), **F32)
    np.testing.assert_array_equal(host(batch.atomic_numbers[:5], int), [29, 29, 8, 1, 1])
    np.testing.assert_allclose(host(batch.masses[:5]), atomic_masses[[29, 29, 8, 1, 1]], rtol=1e-4)
    np.testing.assert_allclose(host(batch.cell[:2]), np.array(cell), **F32)
    np.testing.assert_array_equal(host(batch.pbc, bool), [[True] * 3, [False] * 3])  # one bool per system
    np.testing.assert_array_equal(host(batch.velocities), 0.0)
    np.testing.assert_array_equal(host(batch.charges), 0.0)
    np.testing.assert_array_equal(host(batch.tags, int), 0)
    assert not host(batch.fixed, bool).any()
    np.testing.assert_array_equal(host(batch.sample_id, int), [0, 1])

    # explicit optional fields, still as plain lists
    batch = Batch.from_arrays(
        positions, numbers, cell=cell, pbc=[[True, True, True], [False, False, False]],
        velocities=[[[0.01, 0, 0], [-0.01, 0, 0]], None],
        masses=[[63.0, 65.0], [16.0, 2.0, 2.0]],
        fixed=[[True, False], [False, False, False]],
        tags=[[1, 2], [0, 0, 3]], charges=[[0, 0], [-0.8, 0.4, 0.4]],
        sample_ids=[5, 9], capacity=Capacity(3, 8), **NO_CHECK)
    np.testing.assert_allclose(host(batch.velocities[:2, 0]), [0.01, -0.01], rtol=1e-6)
    np.testing.assert_array_equal(host(batch.velocities[2:]), 0.0)
    np.testing.assert_allclose(host(batch.masses[:5]), [63, 65, 16, 2, 2])
    np.testing.assert_array_equal(host(batch.fixed, bool)[:5], [True, False, False, False, False])
    np.testing.assert_array_equal(host(batch.tags, int)[:5], [1, 2, 0, 0, 3])
    np.testing.assert_allclose(host(batch.charges[:5]), [0, 0, -0.8, 0.4, 0.4], rtol=1e-6)
    np.testing.assert_array_equal(host(batch.sample_id, int), [5, 9, -1])
    np.testing.assert_array_equal(host(batch.masses[5:]), 1.0)


def test_default_masses_match_ase_for_common_elements():
    z = np.arange(1, 87)   # H..Rn: elements with standard atomic weights
    positions = np.stack([np.arange(len(z)) * 1.0, np.zeros(len(z)), np.zeros(len(z))], axis=1)
    with jax.enable_x64(True):
        batch = Batch.from_arrays([positions], [z], min_distance=None)
        masses = host(batch.masses[:len(z)])
    # Tc (43) and Pm (61) have no stable isotope: we use the mass numbers 97 and 145,
    # ASE the isotope masses 97.907 and 144.913
    ok = (z != 43) & (z != 61)
    np.testing.assert_allclose(masses[ok], atomic_masses[z[ok]], rtol=1e-4)


# --------------------------------------------------------------------------- validation
SIDS = [11, 22]
WHERE = "system 1 (sample_id 22)"


def base_arrays() -> dict:
    """Two valid systems; the tests break system 1 (sample id 22)."""
    return dict(
        positions=[np.array([[0.0, 0.0, 0.0], [3.0, 0.0, 0.0]]),
                   np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])],
        atomic_numbers=[np.array([18, 18]), np.array([8, 1, 1])],
        cell=[np.eye(3) * 10.0, np.eye(3) * 8.0],
        pbc=[np.array([True, True, True]), np.array([True, True, True])],
        velocities=[np.zeros((2, 3)), np.zeros((3, 3))],
        masses=[np.array([39.9, 39.9]), np.array([16.0, 1.0, 1.0])],
        sample_ids=list(SIDS),
    )


EXTRA_DEFAULTS = {"fixed": np.zeros(2, bool), "tags": np.zeros(2, int), "charges": np.zeros(2)}


def with_system1(field, value):
    """base_arrays() with system 1's entry of ``field`` replaced by ``value``."""
    kw = base_arrays()
    entries = list(kw[field]) if field in kw else [EXTRA_DEFAULTS[field], None]
    entries[1] = value
    kw[field] = entries
    return kw


def test_base_arrays_are_valid():
    batch = Batch.from_arrays(**base_arrays())        # passes the default close-atoms check too
    np.testing.assert_array_equal(host(batch.sample_id, int), SIDS)


def _obj_positions():
    a = np.empty((3, 3), dtype=object)
    a[:] = 0.5
    return a


SYSTEM_CASES = {
    # wrong shapes
    "positions (n,2)": (("positions", np.zeros((3, 2))), ValueError,
                        ["field 'positions'", "shape (3, 2)", "expected (3, 3)"]),
    "positions too few rows": (("positions", np.zeros((2, 3))), ValueError,
                               ["field 'positions'", "shape (2, 3)"]),
    "cell (2,3)": (("cell", np.ones((2, 3))), ValueError, ["field 'cell'", "shape (2, 3)", "expected (3, 3)"]),
    "velocities wrong length": (("velocities", np.zeros((2, 3))), ValueError,
                                ["field 'velocities'", "shape (2, 3)"]),
    "masses wrong length": (("masses", np.ones(4)), ValueError, ["field 'masses'", "shape (4,)"]),
    "atomic_numbers 2d": (("atomic_numbers", np.array([[8, 1, 1]])), ValueError, ["field 'atomic_numbers'"]),
    # wrong dtypes
    "atomic_numbers float": (("atomic_numbers", np.array([8.0, 1.0, 1.0])), TypeError,
                             ["field 'atomic_numbers'", "integers", "float64"]),
    "atomic_numbers bool": (("atomic_numbers", np.array([True, True, True])), TypeError,
                            ["field 'atomic_numbers'", "integers"]),
    "positions strings": (("positions", [["a", "b", "c"]] * 3), TypeError,
                          ["field 'positions'", "real numbers"]),
    "positions object": (("positions", _obj_positions()), TypeError, ["field 'positions'", "object"]),
    "positions complex": (("positions", np.zeros((3, 3), complex)), TypeError, ["field 'positions'"]),
    "pbc ints": (("pbc", np.array([1, 1, 1])), TypeError, ["field 'pbc'", "booleans"]),
    "pbc strings": (("pbc", ["T", "T", "T"]), TypeError, ["field 'pbc'", "booleans"]),
    "masses strings": (("masses", ["16", "1", "1"]), TypeError, ["field 'masses'"]),
    "charges strings": (("charges", ["x", "y", "z"]), TypeError, ["field 'charges'"]),
    "charges nan": (("charges", np.array([0.0, np.nan, 0.0])), ValueError, ["field 'charges'", "non-finite"]),
    # non-finite values
    "positions nan": (("positions", np.array([[0, 0, 0], [np.nan, 0, 0], [0, 1, 0.0]])), ValueError,
                      ["field 'positions'", "non-finite", "rows [1]"]),
    "positions inf": (("positions", np.array([[0, 0, 0], [1, 0, 0], [0, 1, np.inf]])), ValueError,
                      ["field 'positions'", "non-finite", "rows [2]"]),
    "velocities inf": (("velocities", np.array([[0, 0, 0], [0, -np.inf, 0], [0, 0, 0.0]])), ValueError,
                       ["field 'velocities'", "non-finite"]),
    "cell nan": (("cell", np.diag([8.0, np.nan, 8.0])), ValueError, ["field 'cell'", "non-finite"]),
    "masses nan": (("masses", np.array([16.0, np.nan, 1.0])), ValueError, ["field 'masses'", "non-finite"]),
    # masses
    "masses zero": (("masses", np.array([16.0, 0.0, 1.0])), ValueError,
                    ["field 'masses'", "positive", "atoms [1]"]),
    "masses negative": (("masses", np.array([16.0, 1.0, -1.0])), ValueError,
                        ["field 'masses'", "positive", "atoms [2]"]),
    # unknown elements
    "atomic number 0": (("atomic_numbers", np.array([8, 0, 1])), ValueError,
                        ["field 'atomic_numbers'", "unknown atomic numbers [0]", "atoms [1]"]),
    "atomic number 119": (("atomic_numbers", np.array([8, 1, 119])), ValueError,
                          ["field 'atomic_numbers'", "unknown atomic numbers [119]", "atoms [2]", "1..118"]),
    "atomic number negative": (("atomic_numbers", np.array([-8, 1, 1])), ValueError,
                               ["field 'atomic_numbers'", "[-8]"]),
    # cells on periodic axes
    "cell zero vector": (("cell", np.diag([8.0, 8.0, 0.0])), ValueError,
                         ["field 'cell'", "zero lattice vector", "axes [2]"]),
    "cell parallel vectors": (("cell", np.array([[8.0, 0, 0], [4.0, 0, 0], [0, 0, 8.0]])), ValueError,
                              ["field 'cell'", "singular", "linearly dependent"]),
    "cell coplanar vectors": (("cell", np.array([[8.0, 0, 0], [0, 8.0, 0], [8.0, 8.0, 0]])), ValueError,
                              ["field 'cell'", "singular"]),
    "cell left-handed": (("cell", np.array([[0, 8.0, 0], [8.0, 0, 0], [0, 0, 8.0]])), ValueError,
                         ["field 'cell'", "left-handed"]),
    "cell negated vector": (("cell", np.diag([8.0, 8.0, -8.0])), ValueError, ["field 'cell'", "left-handed"]),
    # other per-atom fields
    "fixed ints": (("fixed", np.array([0, 1, 0])), ValueError, ["field 'fixed'"]),
    "tags floats": (("tags", np.array([0.5, 1, 0])), ValueError, ["field 'tags'"]),
    "tags wrong length": (("tags", np.array([0, 1])), ValueError, ["field 'tags'"]),
}


@pytest.mark.parametrize("case", list(SYSTEM_CASES), ids=list(SYSTEM_CASES))
def test_per_system_validation_names_field_system_and_sample_id(case):
    (field, value), exc, parts = SYSTEM_CASES[case]
    with raises(exc, WHERE, *parts):
        Batch.from_arrays(**with_system1(field, value))


def test_first_bad_system_is_named():
    """When system 0 is broken the message names system 0 / sample id 11."""
    kw = base_arrays()
    kw["masses"] = [np.array([39.9, -1.0]), np.array([16.0, 0.0, 1.0])]
    with raises(ValueError, "system 0 (sample_id 11)", "field 'masses'"):
        Batch.from_arrays(**kw)


def test_empty_input():
    with raises(ValueError, "no systems", "positions"):
        Batch.from_arrays([], [])
    with raises(ValueError, "empty"):
        Batch.from_atoms([])


def test_system_with_zero_atoms():
    kw = with_system1("positions", np.zeros((0, 3)))
    kw["atomic_numbers"][1] = np.zeros(0, dtype=int)
    kw["velocities"] = kw["masses"] = None
    with raises(ValueError, WHERE, "no atoms"):
        Batch.from_arrays(**kw)
    with raises(ValueError, "system 1 (sample_id 1)", "no atoms"):
        Batch.from_atoms([bulk("Ar", "fcc", a=5.26), Atoms()])


def test_system_with_zero_atoms_from_plain_lists():
    """BUG: an empty Python list of atomic numbers becomes a float64 array, so the
    message is "must be integers, got dtype float64" instead of "the system has no atoms"."""
    with raises(ValueError, "system 1 (sample_id 1)", "no atoms"):
        Batch.from_arrays([[[0.0, 0.0, 0.0]], []], [[18], []])


def test_pbc_wrong_shape_names_field():
    """BUG: pbc of shape (2,) reaches np.broadcast_to and raises numpy's own
    "operands could not be broadcast" without the field or the system."""
    with raises(ValueError, WHERE, "field 'pbc'"):
        Batch.from_arrays(**with_system1("pbc", np.array([True, True])))


def test_ragged_positions_name_field():
    """BUG: ragged nested lists raise numpy's "inhomogeneous shape" error from
    np.asarray without the field or the system."""
    with raises(ValueError, WHERE, "field 'positions'"):
        Batch.from_arrays(**with_system1("positions", [[0.0, 0.0, 0.0], [1.0, 0.0], [0.0, 1.0, 0.0]]))


def test_capacity_errors():
    kw = base_arrays()
    with raises(ValueError, WHERE, "3 atoms exceed capacity.num_atoms = 2"):
        Batch.from_arrays(**kw, capacity=Capacity(num_systems=4, num_atoms=2))
    with raises(ValueError, "2 systems do not fit capacity.num_systems = 1"):
        Batch.from_arrays(**kw, capacity=Capacity(num_systems=1, num_atoms=64))
    with raises(ValueError, WHERE, "hold 5 atoms", "capacity.num_atoms = 4"):
        Batch.from_arrays(**kw, capacity=Capacity(num_systems=4, num_atoms=4))
    # exactly full is fine
    batch = Batch.from_arrays(**kw, capacity=Capacity(num_systems=2, num_atoms=5), **NO_CHECK)
    assert host(batch.atom_mask, bool).all() and host(batch.system_mask, bool).all()
    # from_atoms: a single structure larger than the capacity
    with raises(ValueError, "system 0 (sample_id 4)", "8 atoms exceed capacity.num_atoms = 4"):
        Batch.from_atoms(make_structures()[0], capacity=Capacity(1, 4), sample_ids=[4])


@pytest.mark.parametrize("field", ["atomic_numbers", "cell", "pbc", "velocities", "masses",
                                   "fixed", "tags", "charges", "sample_ids"])
def test_mismatched_list_lengths(field):
    kw = base_arrays()
    kw[field] = [7] if field == "sample_ids" else [{**EXTRA_DEFAULTS, **kw}[field][0]]
    with raises(ValueError, f"field '{field}'", "1 entries", "2 systems"):
        Batch.from_arrays(**kw)


def test_from_atoms_sample_ids_length_mismatch():
    with raises(ValueError, "field 'sample_ids'", "2 entries", "3 systems"):
        Batch.from_atoms(make_structures(), sample_ids=[1, 2])


@pytest.mark.parametrize("ids, parts", [
    ([5, 5], ["field 'sample_ids'", "repeats", "[5]"]),
    ([3, -1], ["field 'sample_ids'", "non-negative"]),
    ([3.0, 4.0], ["field 'sample_ids'", "integers"]),
    ([0, 2**31], ["field 'sample_ids'", "2**31"]),
], ids=["duplicate", "negative", "float", "too-large"])
def test_bad_sample_ids(ids, parts):
    with raises(ValueError, *parts):
        Batch.from_arrays(**{**base_arrays(), "sample_ids": ids})


@pytest.mark.parametrize("ids, parts", [
    ([5, 5], ["system 0", "system 1", "5"]),
    ([3, -1], ["system 1", "-1"]),
], ids=["duplicate", "negative"])
def test_bad_sample_ids_name_the_systems(ids, parts):
    """BUG (contract): _validation promises every message names the system; the
    sample-id messages name neither the system indices nor (for negatives) the id."""
    with raises(ValueError, "field 'sample_ids'", *parts):
        Batch.from_arrays(**{**base_arrays(), "sample_ids": ids})


def test_slab_with_zero_third_vector_accepted():
    slab_cell = np.array([[5.0, 0, 0], [2.5, 4.33, 0], [0, 0, 0]])
    kw = with_system1("cell", slab_cell)
    kw["pbc"][1] = np.array([True, True, False])
    batch = Batch.from_arrays(**kw, **NO_CHECK)
    np.testing.assert_array_equal(host(batch.pbc[1], bool), [True, True, False])
    np.testing.assert_allclose(host(batch.cell[1]), slab_cell, rtol=1e-6)
    # the same cell fully periodic is rejected
    with raises(ValueError, WHERE, "field 'cell'", "zero lattice vector", "[2]"):
        Batch.from_arrays(**with_system1("cell", slab_cell))
    # a molecule needs no cell at all
    kw = with_system1("cell", np.zeros((3, 3)))
    kw["pbc"][1] = np.array([False, False, False])
    Batch.from_arrays(**kw, **NO_CHECK)
    # an ASE slab (pbc TTF, zero vacuum vector) through from_atoms
    slab = fcc111("Al", size=(2, 2, 2))
    assert not slab.pbc[2] and np.allclose(slab.cell[2], 0)
    Batch.from_atoms(slab, **NO_CHECK)


# --------------------------------------------------------------------------- close atoms
def close_pair_arrays(pos1, cell1=np.eye(3) * 10.0, pbc1=(True, True, True)):
    kw = base_arrays()
    kw["positions"][1] = np.asarray(pos1, float)
    kw["atomic_numbers"][1] = np.array([1] * len(pos1))
    kw["cell"][1] = cell1
    kw["pbc"][1] = np.array(pbc1)
    kw["velocities"] = kw["masses"] = None
    return kw


CLOSE = [[1.0, 1.0, 1.0], [1.3, 1.0, 1.0], [3.0, 1.0, 1.0]]


def close_pair_atoms(pos1):
    """The same two systems as close_pair_arrays, as ASE Atoms (same shapes: no recompiles)."""
    return [Atoms("Ar2", positions=[[0.0, 0.0, 0.0], [3.0, 0.0, 0.0]], cell=np.eye(3) * 10.0, pbc=True),
            Atoms("H3", positions=pos1, cell=np.eye(3) * 10.0, pbc=True)]
ACROSS = [[0.1, 5.0, 5.0], [9.8, 5.0, 5.0], [5.0, 5.0, 5.0]]   # 0.3 Å apart through the x face


def test_close_atoms_error_by_default():
    with raises(ValueError, "field 'positions'", "min_distance = 0.5", WHERE, "atoms 0 and 1", "0.3 Å"):
        Batch.from_arrays(**close_pair_arrays(CLOSE))
    with raises(ValueError, "system 1 (sample_id 1)", "atoms 0 and 1", "0.3 Å"):
        Batch.from_atoms(close_pair_atoms(CLOSE))


def test_close_atoms_across_periodic_boundary():
    with raises(ValueError, "field 'positions'", WHERE, "0.3 Å"):
        Batch.from_arrays(**close_pair_arrays(ACROSS))
    # the same coordinates are fine without periodicity along x
    Batch.from_arrays(**close_pair_arrays(ACROSS, pbc1=(False, True, True)))


def test_close_atoms_warn_ignore_none():
    kw = close_pair_arrays(CLOSE)
    with warns("field 'positions'", WHERE, "0.3 Å"):
        batch = Batch.from_arrays(**kw, on_close_atoms="warn")
    np.testing.assert_allclose(host(batch.positions[2:5]), CLOSE, **F32)
    with warns(WHERE, "0.3 Å"):
        Batch.from_arrays(**close_pair_arrays(ACROSS), on_close_atoms="warn")
    for options in (dict(on_close_atoms="ignore"), dict(min_distance=None)):
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*min_distance.*")
            Batch.from_arrays(**kw, **options)
    with warns("system 1 (sample_id 1)"):
        Batch.from_atoms(close_pair_atoms(CLOSE), on_close_atoms="warn")
    with pytest.raises(ValueError, match="on_close_atoms"):
        Batch.from_arrays(**kw, on_close_atoms="bogus")


def test_close_atoms_warning_points_at_the_caller():
    """BUG: check_close_atoms warns with a fixed stacklevel=4, right for from_atoms
    (from_atoms -> from_arrays -> check) but one frame too far for a direct
    from_arrays call, so the warning is attributed to the caller's caller."""
    with pytest.warns(UserWarning, match="min_distance") as record:
        Batch.from_atoms(close_pair_atoms(CLOSE), on_close_atoms="warn")
    assert [w.filename for w in record if "min_distance" in str(w.message)] == [__file__]
    with pytest.warns(UserWarning, match="min_distance") as record:
        Batch.from_arrays(**close_pair_arrays(CLOSE), on_close_atoms="warn")
    assert [w.filename for w in record if "min_distance" in str(w.message)] == [__file__]


@pytest.mark.parametrize("min_distance", [0.0, -1.0])
def test_non_positive_min_distance_is_clear(min_distance):
    """BUG: min_distance=0 reaches the neighbor list and fails with "cannot convert
    float NaN to integer" (after RuntimeWarnings); -1 with "NeighborSpec.cutoff must
    be > 0". Either skip the check or reject it naming min_distance."""
    kw = close_pair_arrays([[0.0, 0.0, 0.0], [1.5, 0.0, 0.0], [5.0, 5.0, 5.0]])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            Batch.from_arrays(**kw, min_distance=min_distance)
    except ValueError as e:
        assert "min_distance" in str(e), str(e)


def test_min_distance_threshold():
    dimer = [[0.0, 0.0, 0.0], [1.5, 0.0, 0.0], [5.0, 5.0, 5.0]]
    kw = close_pair_arrays(dimer)
    Batch.from_arrays(**kw)                                  # 1.5 Å > 0.5 Å default
    with raises(ValueError, WHERE, "min_distance = 2.0", "1.5 Å"):
        Batch.from_arrays(**close_pair_arrays(dimer), min_distance=2.0)


# --------------------------------------------------------------------------- precision
FLOAT_FIELDS = ("positions", "velocities", "masses", "charges", "cell")
INT_FIELDS = ("atomic_numbers", "system_index", "tags", "n_atoms", "sample_id")
BOOL_FIELDS = ("atom_mask", "fixed", "pbc", "system_mask")


def check_dtypes(batch, fdt):
    assert batch.dtype == fdt
    for name in FLOAT_FIELDS:
        assert getattr(batch, name).dtype == fdt, name
    for name in INT_FIELDS:
        assert getattr(batch, name).dtype == jnp.int32, name
    for name in BOOL_FIELDS:
        assert getattr(batch, name).dtype == jnp.bool_, name


def test_float32_by_default():
    batch = Batch.from_atoms(make_structures(), **NO_CHECK)
    check_dtypes(batch, jnp.float32)


def test_float64_under_x64(x64):
    atoms_list = make_structures()
    batch = Batch.from_atoms(atoms_list, **NO_CHECK)
    check_dtypes(batch, jnp.float64)
    for s, (atoms, idx) in enumerate(zip(atoms_list, slices(batch))):
        np.testing.assert_array_equal(host(batch.positions[idx]), atoms.positions)
        np.testing.assert_array_equal(host(batch.cell[s]), atoms.cell[:])
        np.testing.assert_allclose(host(batch.velocities[idx]), atoms.get_velocities() * ase.units.fs,
                                   rtol=1e-14)
    back = batch.to_atoms()
    for orig, new in zip(atoms_list, back):
        np.testing.assert_allclose(new.get_velocities(), orig.get_velocities(), rtol=1e-13)


def test_precision_fixture_controls_dtype(precision):
    batch = Batch.from_arrays(**base_arrays(), **NO_CHECK)
    check_dtypes(batch, jnp.dtype(precision))


# --------------------------------------------------------------------------- jit / pytree
def test_same_capacity_does_not_retrace():
    traces = []

    @jax.jit
    def total_mass(batch):
        traces.append(1)
        return sum_systems(batch.masses, batch)

    capacity = Capacity(4, 32)
    b1 = Batch.from_atoms(make_structures(), capacity=capacity, **NO_CHECK)
    b2 = Batch.from_atoms([bulk("Ar", "fcc", a=5.26, cubic=True)] * 2, capacity=capacity, **NO_CHECK)
    m1, m2 = total_mass(b1), total_mass(b2)
    assert len(traces) == 1
    np.testing.assert_allclose(host(m2[:2]), 4 * atomic_masses[18], rtol=1e-6)
    assert host(m1[3]) == 0.0
    leaves, treedef = jax.tree_util.tree_flatten(b1)
    assert len(leaves) == 14                                  # capacity is static metadata
    assert jax.tree_util.tree_unflatten(treedef, leaves).capacity == capacity


# --------------------------------------------------------------------------- Capacity
@pytest.mark.parametrize("args, exc, msg", [
    ((0, 32), ValueError, "num_systems must be >= 1"),
    ((-1, 32), ValueError, "num_systems must be >= 1"),
    ((1, 0), ValueError, "num_atoms must be >= 1"),
    ((1, 32, -1), ValueError, "max_neighbors must be >= 0"),
    ((1.0, 32), TypeError, "num_systems must be an int"),
    ((1, "32"), TypeError, "num_atoms must be an int"),
    ((True, 32), TypeError, "num_systems must be an int"),
    ((1, 32, 2.5), TypeError, "max_neighbors must be an int"),
])
def test_capacity_validation(args, exc, msg):
    with pytest.raises(exc, match=re.escape(msg)):
        Capacity(*args)


def test_capacity_basics():
    c = Capacity(num_systems=64, num_atoms=16_384, max_neighbors=96)
    assert repr(c) == "Capacity(num_systems=64, num_atoms=16384, max_neighbors=96)"
    assert Capacity(2, 32).max_neighbors == 0
    assert BufferConfig is Capacity
    # frozen and hashable: usable as a dict key / jit static argument
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.num_atoms = 1
    table = {c: "a", Capacity(2, 32): "b"}
    assert table[Capacity(64, 16_384, 96)] == "a"
    assert hash(Capacity(2, 32)) == hash(Capacity(2, 32, 0))
    assert Capacity(2, 32) != Capacity(2, 32, 8)
    assert c.with_max_neighbors(12) == Capacity(64, 16_384, 12)
    assert c.max_neighbors == 96                              # unchanged


def test_for_systems_rounding_and_headroom():
    assert Capacity.for_systems([5, 7, 20]) == Capacity(3, 32)
    assert Capacity.for_systems([33]) == Capacity(1, 64)
    assert Capacity.for_systems([32]) == Capacity(1, 32)
    assert Capacity.for_systems([1]) == Capacity(1, 32)               # at least one multiple
    assert Capacity.for_systems(np.array([10, 10])) == Capacity(2, 32)
    # 25 % headroom: 8 systems -> 10, 80 atoms -> 100 -> 128
    assert Capacity.for_systems([10] * 8, headroom=0.25) == Capacity(10, 128)
    assert Capacity.for_systems([10] * 8, headroom=0.25, atom_multiple=1) == Capacity(10, 100)
    assert Capacity.for_systems([10] * 8, headroom=0.25, atom_multiple=64) == Capacity(10, 128)
    assert Capacity.for_systems([3, 3, 3], headroom=0.5, atom_multiple=1) == Capacity(5, 14)
    assert Capacity.for_systems([4], max_neighbors=50) == Capacity(1, 32, 50)
    with pytest.raises(ValueError, match="no systems"):
        Capacity.for_systems([])


def test_for_systems_headroom_has_no_float_round_up():
    """BUG: ceil(n * (1.0 + headroom)) rounds 1600 * 1.1 = 1760.0000000000002 up to
    1761 (-> 1792 instead of 1760), and 100 systems * 1.1 to 111 slots."""
    assert Capacity.for_systems([1600], headroom=0.1).num_atoms == 1760
    assert Capacity.for_systems([1] * 100, headroom=0.1, atom_multiple=1).num_systems == 110


@pytest.mark.parametrize("kwargs", [dict(headroom=-0.5), dict(atom_multiple=0), dict(atom_multiple=-32)],
                         ids=["negative-headroom", "zero-multiple", "negative-multiple"])
def test_for_systems_rejects_bad_arguments(kwargs):
    """BUG: negative headroom silently returns a capacity the systems do not fit
    (10 x 10 atoms -> Capacity(5, 64)); atom_multiple=0 raises ZeroDivisionError."""
    with pytest.raises(ValueError):
        Capacity.for_systems([10] * 10, **kwargs)


def test_all_at_once_checks_match_per_system_checks():
    """The batched validation (used when every system is regular) returns exactly what the
    per-system checks return, for full inputs, defaults, int positions and scalar pbc;
    and a system whose field is missing or of another dtype falls back to them."""
    from nvalchemi_jax import _validation

    rng = np.random.default_rng(3)
    sizes = [3, 1, 5]
    fields = dict(
        positions=[rng.normal(size=(n, 3)) for n in sizes[:2]] + [np.arange(15).reshape(5, 3)],
        atomic_numbers=[rng.integers(1, 90, n) for n in sizes],
        cell=[np.eye(3) * 9.0, np.zeros((3, 3)), np.diag([7, 8, 9])],
        pbc=[np.ones(3, bool), False, np.array([True, True, False])],
        velocities=[rng.normal(size=(n, 3)) for n in sizes],
        masses=[rng.uniform(1, 50, n) for n in sizes],
        fixed=[rng.integers(0, 2, n).astype(bool) for n in sizes],
        tags=[rng.integers(0, 9, n) for n in sizes],
        charges=[rng.normal(size=n) for n in sizes])
    ids = [7, 3, 11]
    for drop in (None, "velocities", "masses", "fixed", "tags", "charges", "cell", "pbc"):
        given = {k: (None if k == drop else v) for k, v in fields.items()}
        together = _validation._validate_together(ids, **given)
        assert together is not None, drop
        each = _validation._validate_each(ids, **given)
        assert len(together) == len(each) == 3
        for a, b in zip(together, each):
            assert a.keys() == b.keys()
            for key in a:
                np.testing.assert_array_equal(a[key], b[key], err_msg=f"{key} ({drop})")
                assert np.asarray(a[key]).dtype == np.asarray(b[key]).dtype, key
    # irregular: one system without velocities, one with float tags, one bool position array
    for key, value in (("velocities", [fields["velocities"][0], None, fields["velocities"][2]]),
                       ("tags", [fields["tags"][0], np.zeros(1), fields["tags"][2]]),
                       ("positions", [fields["positions"][0], np.ones((1, 3), bool),
                                      fields["positions"][2]])):
        assert _validation._validate_together(ids, **{**fields, key: value}) is None, key
