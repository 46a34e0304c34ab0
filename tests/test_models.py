"""Pair potentials (Lennard-Jones, Morse, soft spheres) against ASE and closed forms.

References:
* ASE's ``LennardJones`` calculator (shifted, ``smooth=False``; switched, ``smooth=True``)
  on bulk, small, triclinic, slab and cluster argon, per system and as one batch,
  with both neighbor-list builders, in float32 and float64;
* numpy brute-force pair sums (minimum image, cell > 2 cutoff) for the mixed-species
  Lennard-Jones and for Morse; closed forms for dimers;
* central finite differences for forces and stress;
* trace counters for "no recompilation".
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, fcc111
from ase.calculators.lj import LennardJones as AseLJ
from ase.cluster import Icosahedron
from ase.neighborlist import neighbor_list
from ase.stress import voigt_6_to_full_3x3_stress

from nvalchemi_jax.batch import Batch
from nvalchemi_jax.capacity import Capacity
from nvalchemi_jax.models import LennardJones, Morse, SoftSphere, compute
from nvalchemi_jax.neighbors import allocate, build

SIGMA, EPSILON, CUTOFF, A_AR = 3.40, 0.0104, 8.5, 5.26
SWITCH_ON = 6.5
METHODS = ("all_pairs", "cell_list")
TOL = {"float64": 1e-8, "float32": 2e-4}

_compute = jax.jit(compute, static_argnames=("forces", "stress"))
_build = jax.jit(build, static_argnums=0)


# --------------------------------------------------------------------------- systems
def _rattled(atoms: Atoms, seed: int, stdev: float = 0.05) -> Atoms:
    atoms.rattle(stdev, seed=seed)
    return atoms


def _fcc_bulk() -> Atoms:
    """256 atoms, cubic cell of 21 Å > 2 cutoff."""
    return _rattled(bulk("Ar", "fcc", a=A_AR, cubic=True) * (4, 4, 4), seed=1)


def _small_cubic() -> Atoms:
    """The 4-atom cubic cell (5.26 Å, much thinner than 2 cutoff: two images each side)."""
    return _rattled(bulk("Ar", "fcc", a=A_AR, cubic=True), seed=2)


def _small_supercell() -> Atoms:
    """2x2x2 cubic supercell (10.5 Å < 2 cutoff)."""
    return _rattled(bulk("Ar", "fcc", a=A_AR, cubic=True) * (2, 2, 2), seed=3)


def _triclinic_primitive() -> Atoms:
    """Primitive FCC cell, randomly strained and repeated 2x2x2, rattled (triclinic)."""
    atoms = bulk("Ar", "fcc", a=A_AR) * (2, 2, 2)
    rng = np.random.default_rng(4)
    strain = np.eye(3) + 0.03 * rng.standard_normal((3, 3))
    atoms.set_cell(atoms.cell.array @ strain, scale_atoms=True)
    return _rattled(atoms, seed=4)


def _sheared_supercell() -> Atoms:
    """2x2x2 cubic supercell under a general (right-handed) shear."""
    atoms = bulk("Ar", "fcc", a=A_AR, cubic=True) * (2, 2, 2)
    shear = np.array([[1.0, 0.0, 0.0], [0.18, 1.0, 0.0], [-0.11, 0.23, 1.0]])
    atoms.set_cell(atoms.cell.array @ shear, scale_atoms=True)
    assert np.linalg.det(atoms.cell.array) > 0
    return _rattled(atoms, seed=5)


def _primitive_single() -> Atoms:
    """One atom in a strained primitive cell (3 Å wide: three images each side)."""
    atoms = bulk("Ar", "fcc", a=A_AR)
    atoms.set_cell(atoms.cell.array @ np.array([[1.02, 0.01, -0.02], [0.0, 0.97, 0.015],
                                                [0.01, 0.0, 1.01]]), scale_atoms=True)
    return atoms


def _slab() -> Atoms:
    """fcc(111) slab, pbc (T, T, F), in-plane width 9.7 Å < 2 cutoff."""
    atoms = fcc111("Ar", size=(3, 3, 4), a=A_AR, vacuum=6.0)
    assert list(atoms.pbc) == [True, True, False]
    return _rattled(atoms, seed=6)


def _cluster() -> Atoms:
    """55-atom icosahedron, open (no cell)."""
    atoms = Icosahedron("Ar", noshells=3, latticeconstant=A_AR)
    atoms.set_cell(np.zeros((3, 3)))
    atoms.pbc = False
    return _rattled(atoms, seed=7)


SYSTEMS = {
    "fcc_bulk": _fcc_bulk,
    "small_cubic": _small_cubic,
    "small_supercell": _small_supercell,
    "triclinic": _triclinic_primitive,
    "sheared": _sheared_supercell,
    "primitive_1atom": _primitive_single,
    "slab": _slab,
    "cluster": _cluster,
}


@functools.lru_cache(maxsize=None)
def _ase_reference(name: str, variant: str):
    """ASE energy, forces and (fully periodic only) 3x3 stress, cached per system/variant."""
    atoms = SYSTEMS[name]()
    if variant == "shift":
        atoms.calc = AseLJ(sigma=SIGMA, epsilon=EPSILON, rc=CUTOFF, smooth=False)
    else:
        atoms.calc = AseLJ(sigma=SIGMA, epsilon=EPSILON, rc=CUTOFF, ro=SWITCH_ON, smooth=True)
    energy = atoms.get_potential_energy()
    forces = atoms.get_forces()
    stress = voigt_6_to_full_3x3_stress(atoms.get_stress()) if atoms.pbc.all() else None
    return energy, forces, stress


def _lj(variant: str) -> LennardJones:
    if variant == "shift":
        return LennardJones(sigma=SIGMA, epsilon=EPSILON, cutoff=CUTOFF, shift=True)
    return LennardJones(sigma=SIGMA, epsilon=EPSILON, cutoff=CUTOFF, switch_on=SWITCH_ON)


def _evaluate(model, atoms_list, method="all_pairs", stress=True, capacity=None, skin=0.5,
              max_neighbors=None):
    # min_distance=None skips the close-atoms check (a neighbor-list compile of its own).
    batch = Batch.from_atoms(atoms_list, capacity=capacity, min_distance=None)
    _, nl = allocate(batch, cutoff=model.cutoff, skin=skin, method=method,
                     max_neighbors=max_neighbors)
    assert not bool(nl.overflow)
    out = _compute(model, batch.positions, batch.cell, batch, nl, stress=stress)
    return batch, nl, out


def _rel(ours, ref) -> float:
    """max |ours - ref| relative to the largest component of ref."""
    ours, ref = np.asarray(ours, float), np.asarray(ref, float)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def _check_against_ase(names, variant, batch, out, tol):
    assert out.energy.dtype == batch.positions.dtype
    slices = batch.system_slices()
    for s, (name, idx) in enumerate(zip(names, slices)):
        energy, forces, stress = _ase_reference(name, variant)
        e = float(out.energy[s])
        assert abs(e - energy) <= tol * abs(energy), (name, e, energy)
        f = np.asarray(out.forces, float)[idx]
        if name == "primitive_1atom":      # one atom in a periodic cell feels no force
            assert np.max(np.abs(forces)) < 1e-12
            assert np.max(np.abs(f)) <= tol * 1e-2
        else:
            assert _rel(f, forces) <= tol, (name, _rel(f, forces))
        if stress is not None:
            assert _rel(out.stress[s], stress) <= tol, (name, _rel(out.stress[s], stress))


# --------------------------------------------------------------------------- LJ vs ASE
@pytest.mark.parametrize("variant", ["shift", "switch"])
@pytest.mark.parametrize("method", METHODS)
def test_lj_batch_matches_ase(precision, method, variant):
    """ONE batch of every system (bulk, thin cells, triclinic, slab, cluster) vs ASE per system."""
    names = list(SYSTEMS)
    batch, _, out = _evaluate(_lj(variant), [SYSTEMS[n]() for n in names], method=method)
    _check_against_ase(names, variant, batch, out, TOL[precision])
    # Padding atoms get zero force.
    pad = ~np.asarray(batch.atom_mask)
    assert np.all(np.asarray(out.forces)[pad] == 0)


def _single_systems(method: str):
    """Each system alone in a one-system batch of a common capacity, with the neighbor
    spec allocate() chose for the batch of all of them, so one program serves all."""
    names = list(SYSTEMS)
    everything = Batch.from_atoms([SYSTEMS[n]() for n in names], min_distance=None)
    spec, _ = allocate(everything, cutoff=CUTOFF, skin=0.5, method=method)
    capacity = Capacity(num_systems=1, num_atoms=int(np.max(np.asarray(everything.n_atoms))))
    for name in names:
        batch = Batch.from_atoms([SYSTEMS[name]()], capacity=capacity, min_distance=None)
        nl = _build(spec, batch.positions, batch.cell, batch)
        assert not bool(nl.overflow)
        yield name, batch, nl


@pytest.mark.parametrize("method", METHODS)
def test_lj_single_systems_match_ase(x64, method):
    """Each system on its own vs ASE, shifted and switched LJ, float64."""
    for name, batch, nl in _single_systems(method):
        for variant in ("shift", "switch"):
            out = _compute(_lj(variant), batch.positions, batch.cell, batch, nl, stress=True)
            _check_against_ase([name], variant, batch, out, TOL["float64"])


def test_lj_single_systems_float32():
    for name, batch, nl in _single_systems("cell_list"):
        out = _compute(_lj("switch"), batch.positions, batch.cell, batch, nl, stress=True)
        assert out.forces.dtype == jnp.float32
        _check_against_ase([name], "switch", batch, out, TOL["float32"])


def test_lj_unshifted_energy_is_ase_plus_shift(x64):
    """Unshifted LJ = ASE's shifted energy + e0 per pair within the cutoff; forces/stress equal."""
    names = ["fcc_bulk", "small_cubic", "triclinic", "slab", "cluster"]
    atoms_list = [SYSTEMS[n]() for n in names]
    model = LennardJones(sigma=SIGMA, epsilon=EPSILON, cutoff=CUTOFF)
    batch, _, out = _evaluate(model, atoms_list, method="cell_list")
    e0 = 4 * EPSILON * ((SIGMA / CUTOFF) ** 12 - (SIGMA / CUTOFF) ** 6)
    for s, (name, atoms, idx) in enumerate(zip(names, atoms_list, batch.system_slices())):
        energy, forces, stress = _ase_reference(name, "shift")
        n_pairs = len(neighbor_list("i", atoms, CUTOFF)) // 2      # ordered pairs / 2
        expected = energy + e0 * n_pairs
        assert abs(float(out.energy[s]) - expected) <= 1e-10 * abs(expected)
        assert _rel(np.asarray(out.forces)[idx], forces) <= 1e-8
        if stress is not None:
            assert _rel(out.stress[s], stress) <= 1e-8
    # The shift really matters: the unshifted energy differs from the shifted one.
    assert abs(float(out.energy[0]) - _ase_reference("fcc_bulk", "shift")[0]) > 1e-3


# --------------------------------------------------------------------------- numpy references
def _pair_sum(atoms: Atoms, cutoff: float, phi):
    """Brute-force energy, forces and stress of a pair potential (minimum image: the
    periodic cell must be wider than 2 cutoff). ``phi(r, zi, zj) -> (energy, dE/dr)``."""
    pos = atoms.get_positions()
    z = atoms.get_atomic_numbers()
    i, j = np.triu_indices(len(atoms), k=1)
    d = pos[j] - pos[i]
    if atoms.pbc.any():
        cell = atoms.cell.array
        frac = d @ np.linalg.inv(cell)
        frac -= np.where(atoms.pbc, np.round(frac), 0.0)
        d = frac @ cell
    r = np.linalg.norm(d, axis=1)
    keep = r < cutoff
    i, j, d, r = i[keep], j[keep], d[keep], r[keep]
    e, de = phi(r, z[i], z[j])
    g = (de / r)[:, None] * d          # dE/dd_ij
    forces = np.zeros_like(pos)
    np.add.at(forces, i, g)
    np.add.at(forces, j, -g)
    stress = None
    if atoms.pbc.all():
        stress = np.einsum("p,pa,pb->ab", de / r, d, d) / atoms.get_volume()
    return float(e.sum()), forces, stress


def _ar_kr_mixture() -> Atoms:
    atoms = bulk("Ar", "fcc", a=5.45, cubic=True) * (4, 4, 4)     # 21.8 Å > 2 cutoff
    rng = np.random.default_rng(11)
    numbers = atoms.get_atomic_numbers()
    numbers[rng.permutation(len(atoms))[: len(atoms) // 3]] = 36
    atoms.set_atomic_numbers(numbers)
    return _rattled(atoms, seed=12, stdev=0.08)


@pytest.mark.parametrize("shift", [False, True])
def test_lj_mixed_species_vs_numpy(x64, shift):
    """Ar/Kr LJ with Lorentz-Berthelot mixing vs a numpy minimum-image pair sum."""
    sig = {18: 3.40, 36: 3.65}
    eps = {18: 0.0104, 36: 0.0140}
    model = LennardJones.mixed(species=(18, 36), sigma=(sig[18], sig[36]),
                               epsilon=(eps[18], eps[36]), cutoff=CUTOFF, shift=shift)
    np.testing.assert_allclose(np.asarray(model.sigma), [[3.40, 3.525], [3.525, 3.65]])
    np.testing.assert_allclose(np.asarray(model.epsilon)[0, 1], np.sqrt(0.0104 * 0.0140))

    def phi(r, zi, zj):
        s = (np.vectorize(sig.get)(zi) + np.vectorize(sig.get)(zj)) / 2
        e = np.sqrt(np.vectorize(eps.get)(zi) * np.vectorize(eps.get)(zj))
        sr6 = (s / r) ** 6
        energy = 4 * e * (sr6**2 - sr6)
        if shift:
            sc6 = (s / CUTOFF) ** 6
            energy = energy - 4 * e * (sc6**2 - sc6)
        return energy, -24 * e * (2 * sr6**2 - sr6) / r

    atoms = _ar_kr_mixture()
    assert set(atoms.get_atomic_numbers()) == {18, 36}
    energy, forces, stress = _pair_sum(atoms, CUTOFF, phi)
    for method in METHODS:
        batch, _, out = _evaluate(model, [atoms], method=method)
        model.check(batch)
        n = len(atoms)
        assert abs(float(out.energy[0]) - energy) <= 1e-10 * abs(energy)
        assert _rel(np.asarray(out.forces)[:n], forces) <= 1e-9
        assert _rel(out.stress[0], stress) <= 1e-9


def test_lj_mixed_single_species_reduces_to_plain(x64):
    """A mixed model on a pure-Ar batch equals the scalar model."""
    atoms = [_small_supercell(), _cluster()]
    mixed = LennardJones.mixed(species=(36, 18), sigma=(3.65, SIGMA), epsilon=(0.014, EPSILON),
                               cutoff=CUTOFF, shift=True)
    _, _, a = _evaluate(mixed, atoms)
    _, _, b = _evaluate(_lj("shift"), atoms)
    np.testing.assert_allclose(a.energy, b.energy, rtol=1e-12)
    np.testing.assert_allclose(a.forces, b.forces, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(a.stress, b.stress, rtol=1e-10, atol=1e-14)


# --------------------------------------------------------------------------- Morse
MORSE = dict(depth=0.3429, alpha=1.3588, r0=2.866)


def _dimers(distances, symbol="Cu"):
    return [Atoms(f"{symbol}2", positions=[[0.0, 0.0, 0.0], [r, 0.0, 0.0]]) for r in distances]


def _morse_closed(r, depth, alpha, r0):
    x = np.exp(-alpha * (r - r0))
    return depth * (x * x - 2 * x), depth * (-2 * alpha * x * x + 2 * alpha * x)


def test_morse_dimer_closed_form(precision):
    cutoff = 6.0
    model = Morse(**MORSE, cutoff=cutoff)
    r = np.array([1.9, 2.3, MORSE["r0"], 3.2, 4.0, 5.5, 5.99, 6.01, 7.0])
    batch, _, out = _evaluate(model, _dimers(r), stress=False)
    e_ref, de_ref = _morse_closed(r, **MORSE)
    e_ref = np.where(r < cutoff, e_ref, 0.0)
    de_ref = np.where(r < cutoff, de_ref, 0.0)
    forces = np.asarray(out.forces, float)
    f2 = np.stack([forces[idx[1]] for idx in batch.system_slices()])
    f1 = np.stack([forces[idx[0]] for idx in batch.system_slices()])
    tol = TOL[precision]
    scale = MORSE["depth"] * MORSE["alpha"] * 10
    np.testing.assert_allclose(np.asarray(out.energy, float), e_ref, rtol=tol, atol=tol * MORSE["depth"])
    np.testing.assert_allclose(f2[:, 0], -de_ref, rtol=tol, atol=tol * scale)
    np.testing.assert_allclose(f1, -f2, atol=tol * scale)
    assert np.all(f2[:, 1:] == 0)
    # Minimum -D at r0 with zero force.
    k = int(np.argmin(np.abs(r - MORSE["r0"])))
    assert abs(float(out.energy[k]) + MORSE["depth"]) <= tol * MORSE["depth"]
    assert abs(f2[k, 0]) <= tol * scale
    assert float(out.energy[k]) == pytest.approx(float(np.min(np.asarray(out.energy))))
    # Repulsive inside r0, attractive outside (within the cutoff).
    assert f2[0, 0] > 0 and f2[3, 0] < 0


def _small_cluster(symbol="Cu", a=3.61, seed=21):
    from ase.cluster import Octahedron
    atoms = Octahedron(symbol, 3, cutoff=1, latticeconstant=a)     # 38 atoms
    atoms.set_cell(np.zeros((3, 3)))
    atoms.pbc = False
    return _rattled(atoms, seed=seed, stdev=0.08)


@pytest.mark.parametrize("shift", [False, True])
def test_morse_cluster_vs_numpy(x64, shift):
    cutoff = 5.0
    model = Morse(**MORSE, cutoff=cutoff, shift=shift)
    e_cut = _morse_closed(cutoff, **MORSE)[0]

    def phi(r, zi, zj):
        e, de = _morse_closed(r, **MORSE)
        return (e - e_cut if shift else e), de

    atoms = _small_cluster()
    energy, forces, _ = _pair_sum(atoms, cutoff, phi)
    for method in METHODS:
        batch, _, out = _evaluate(model, [atoms], method=method)
        n = len(atoms)
        assert abs(float(out.energy[0]) - energy) <= 1e-10 * abs(energy)
        assert _rel(np.asarray(out.forces)[:n], forces) <= 1e-9
        assert np.all(np.asarray(out.stress) == 0)          # no cell, no stress


def test_morse_shift_is_continuous(x64):
    """With shift the dimer energy goes to zero at the cutoff; without it jumps by phi(rc)."""
    cutoff = 6.0
    r = np.array([cutoff - 1e-7, cutoff + 1e-7])
    _, _, shifted = _evaluate(Morse(**MORSE, cutoff=cutoff, shift=True), _dimers(r), stress=False)
    _, _, plain = _evaluate(Morse(**MORSE, cutoff=cutoff), _dimers(r), stress=False)
    assert abs(float(shifted.energy[0])) < 1e-8 and float(shifted.energy[1]) == 0.0
    jump = _morse_closed(cutoff, **MORSE)[0]
    assert float(plain.energy[0]) == pytest.approx(jump, rel=1e-5)


def test_morse_switch_dimer_matches_ase_cutoff_function(x64):
    """Morse(switch_on=ro) = closed form times ASE's C1 switch (the one of its smooth LJ)."""
    from ase.calculators.lj import cutoff_function, d_cutoff_function
    cutoff, onset = 6.0, 4.5
    r = np.array([2.5, 4.0, 4.6, 5.2, 5.9, 6.2])
    batch, _, out = _evaluate(Morse(**MORSE, cutoff=cutoff, switch_on=onset), _dimers(r), stress=False)
    e, de = _morse_closed(r, **MORSE)
    fc = cutoff_function(r**2, cutoff**2, onset**2)
    dfc = 2 * r * d_cutoff_function(r**2, cutoff**2, onset**2)       # d fc / d r
    f2 = np.stack([np.asarray(out.forces)[idx[1]] for idx in batch.system_slices()])
    np.testing.assert_allclose(np.asarray(out.energy), e * fc, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(f2[:, 0], -(de * fc + e * dfc), rtol=1e-10, atol=1e-14)


def test_morse_species_table_vs_numpy(x64):
    """Per-species Morse tables on a Cu/Ag cluster."""
    species = (29, 47)
    depth = np.array([[0.34, 0.30], [0.30, 0.33]])
    alpha = np.array([[1.36, 1.40], [1.40, 1.37]])
    r0 = np.array([[2.87, 2.95], [2.95, 3.05]])
    model = Morse(depth=depth, alpha=alpha, r0=r0, cutoff=5.5, species=species, shift=True)
    atoms = _small_cluster(seed=22)
    numbers = atoms.get_atomic_numbers()
    numbers[::3] = 47
    atoms.set_atomic_numbers(numbers)
    row = {29: 0, 47: 1}

    def phi(r, zi, zj):
        a = np.vectorize(row.get)(zi)
        b = np.vectorize(row.get)(zj)
        e, de = _morse_closed(r, depth[a, b], alpha[a, b], r0[a, b])
        return e - _morse_closed(5.5, depth[a, b], alpha[a, b], r0[a, b])[0], de

    energy, forces, _ = _pair_sum(atoms, 5.5, phi)
    _, _, out = _evaluate(model, [atoms], method="cell_list")
    assert abs(float(out.energy[0]) - energy) <= 1e-10 * abs(energy)
    assert _rel(np.asarray(out.forces)[: len(atoms)], forces) <= 1e-9


# --------------------------------------------------------------------------- soft spheres
@pytest.mark.parametrize("alpha", [2.0, 2.5])
def test_soft_sphere_dimer_closed_form(precision, alpha):
    sigma, eps = 2.0, 1.5
    model = SoftSphere(sigma=sigma, epsilon=eps, alpha=alpha)
    assert model.cutoff == sigma
    r = np.array([0.6, 1.0, 1.5, 1.9, 1.999, 2.001, 2.5, 4.0])
    batch, _, out = _evaluate(model, _dimers(r, "H"), stress=False)
    overlap = np.clip(1 - r / sigma, 0, None)
    e_ref = eps / alpha * overlap**alpha
    f_ref = eps / sigma * overlap ** (alpha - 1)          # on atom 2, along +x (repulsive)
    f2 = np.stack([np.asarray(out.forces, float)[idx[1]] for idx in batch.system_slices()])
    tol = TOL[precision]
    np.testing.assert_allclose(np.asarray(out.energy, float), e_ref, rtol=tol, atol=tol * eps)
    np.testing.assert_allclose(f2[:, 0], f_ref, rtol=tol, atol=tol * eps)
    assert np.all(np.asarray(out.energy)[r >= sigma] == 0)
    assert np.all(f2[r >= sigma] == 0)
    assert np.all(np.isfinite(np.asarray(out.forces)))


def test_soft_sphere_species_table(x64):
    """Per-pair contact distances: the cutoff is the largest, smaller pairs stop at their own."""
    sigma = np.array([[1.0, 1.5], [1.5, 2.0]])
    model = SoftSphere(sigma=sigma, epsilon=1.0, species=(1, 2))
    assert model.cutoff == 2.0
    r = 1.2
    systems = [Atoms(s, positions=[[0, 0, 0], [r, 0, 0]]) for s in ("H2", "HHe", "He2")]
    _, _, out = _evaluate(model, systems, stress=False)
    expected = [0.0, 0.5 * (1 - r / 1.5) ** 2, 0.5 * (1 - r / 2.0) ** 2]
    np.testing.assert_allclose(np.asarray(out.energy), expected, rtol=1e-12, atol=1e-15)


def test_soft_sphere_sigma_beyond_cutoff_is_rejected():
    """BUG (models/soft_sphere.py): the cutoff is a static field fixed at construction, so
    ``model.replace(sigma=larger)`` (or an explicit ``cutoff`` below sigma) silently drops
    every overlapping pair between the old cutoff and the new sigma: the energy of a
    dimer at 2.5 Å with sigma 3 Å comes out 0 instead of 0.5 (1 - 2.5/3)^2, and it jumps
    at r = cutoff. The host-side ``check(batch)`` should refuse such a model."""
    grown = SoftSphere(sigma=2.0, epsilon=1.0).replace(sigma=3.0)
    assert grown.cutoff == 2.0                     # the stale cutoff
    batch = Batch.from_atoms(_dimers([2.5], "H"), min_distance=None)
    with pytest.raises(ValueError, match="cutoff"):
        grown.check(batch)
    with pytest.raises(ValueError, match="cutoff"):
        SoftSphere(sigma=3.0, epsilon=1.0, cutoff=2.0).check(batch)
    SoftSphere(sigma=2.0, epsilon=1.0).check(batch)                      # fine
    SoftSphere(sigma=np.array([[1.0, 1.5], [1.5, 2.0]]), epsilon=1.0, species=(1, 2)).check(batch)


# --------------------------------------------------------------------------- autodiff checks
def _random_periodic_system(seed=31, n=7, min_dist=2.6):
    rng = np.random.default_rng(seed)
    cell = np.array([[7.0, 0.0, 0.0], [1.3, 6.6, 0.0], [-0.8, 1.1, 6.9]])
    frac = []
    while len(frac) < n:
        f = rng.random(3)
        ok = True
        for g in frac:
            df = f - g
            df -= np.round(df)
            if np.linalg.norm(df @ cell) < min_dist:
                ok = False
        if ok:
            frac.append(f)
    atoms = Atoms("Ar" * n, scaled_positions=np.array(frac), cell=cell, pbc=True)
    numbers = atoms.get_atomic_numbers()
    numbers[::2] = 36
    atoms.set_atomic_numbers(numbers)
    return atoms


FD_MODELS = {
    "lj_switch": lambda: LennardJones.mixed(species=(18, 36), sigma=(3.4, 3.65),
                                            epsilon=(0.0104, 0.014), cutoff=7.0, switch_on=5.0),
    "morse_switch": lambda: Morse(**MORSE, cutoff=6.0, switch_on=4.5),
    "soft_sphere": lambda: SoftSphere(sigma=3.2, epsilon=0.5, alpha=2.5),
}


@pytest.mark.parametrize("name", list(FD_MODELS))
def test_forces_and_stress_finite_differences(x64, name):
    model = FD_MODELS[name]()
    atoms = _random_periodic_system()
    batch, nl, out = _evaluate(model, [atoms])
    n = len(atoms)
    pos0 = np.asarray(batch.positions)
    cell0 = np.asarray(batch.cell)
    energy_fn = jax.jit(lambda p, c: compute(model, p, c, batch, nl, forces=False).energy[0])
    h = 1e-5

    fd_forces = np.zeros((n, 3))
    for i in range(n):
        for a in range(3):
            plus, minus = pos0.copy(), pos0.copy()
            plus[i, a] += h
            minus[i, a] -= h
            fd_forces[i, a] = -(float(energy_fn(plus, cell0)) - float(energy_fn(minus, cell0))) / (2 * h)
    forces = np.asarray(out.forces)[:n]
    assert np.max(np.abs(forces)) > 1e-3          # a non-trivial configuration
    assert _rel(forces, fd_forces) < 1e-6
    assert np.max(np.abs(forces.sum(axis=0))) < 1e-10      # Newton's third law

    fd_stress = np.zeros((3, 3))
    volume = abs(np.linalg.det(cell0[0]))
    for a in range(3):
        for b in range(3):
            energies = []
            for sign in (1, -1):
                deform = np.eye(3)
                deform[a, b] += sign * h
                energies.append(float(energy_fn(pos0 @ deform, cell0 @ deform)))
            fd_stress[a, b] = (energies[0] - energies[1]) / (2 * h) / volume
    stress = np.asarray(out.stress[0])
    assert np.max(np.abs(stress)) > 1e-5
    assert _rel(stress, fd_stress) < 1e-6
    np.testing.assert_allclose(stress, stress.T, atol=1e-12)


@pytest.mark.parametrize("name", list(FD_MODELS))
def test_closed_form_equals_autodiff(x64, name):
    """Pair potentials evaluate forces and stress in closed form (a gather over the full
    list); autodiff of the same energy is an independent route to the same numbers, on a
    batch mixing a periodic two-species cell, a slab and a cluster."""
    model = FD_MODELS[name]()
    slab = fcc111("Ar", (2, 2, 3), a=A_AR, vacuum=6.0)
    cluster = Icosahedron("Ar", 2, latticeconstant=A_AR)
    for atoms in (slab, cluster):
        numbers = atoms.get_atomic_numbers()
        numbers[1::3] = 36
        atoms.set_atomic_numbers(numbers)
    batch, nl, closed = _evaluate(model, [_random_periodic_system(), slab, cluster])
    auto = compute(model, batch.positions, batch.cell, batch, nl, stress=True, method="autodiff")
    assert hasattr(model, "evaluate")
    for field in ("energy", "forces", "stress"):
        ours, ref = getattr(closed, field), getattr(auto, field)
        assert _rel(ours, ref) < 1e-12, field
    summed = compute(model + FD_MODELS["soft_sphere"](), batch.positions, batch.cell, batch, nl,
                     stress=True)
    single = compute(FD_MODELS["soft_sphere"](), batch.positions, batch.cell, batch, nl, stress=True)
    assert _rel(summed.forces, np.asarray(closed.forces) + np.asarray(single.forces)) < 1e-12
    with pytest.raises(ValueError, match="method must be"):
        compute(model, batch.positions, batch.cell, batch, nl, method="magic")


def test_force_loss_gradients_match_autodiff_and_stay_symmetric(x64):
    """Fitting a two-species table to forces: the gradient through the closed-form forces
    equals the one through autodiff forces, and is a symmetric table (a valid model)."""
    model = FD_MODELS["lj_switch"]()
    batch, nl, _ = _evaluate(model, [_random_periodic_system()])

    def loss(m, method):
        out = compute(m, batch.positions, batch.cell, batch, nl, method=method)
        return jnp.sum(out.forces ** 2)

    closed = jax.grad(loss)(model, "auto")
    auto = jax.grad(loss)(model, "autodiff")
    for field in ("sigma", "epsilon"):
        g, ref = np.asarray(getattr(closed, field)), np.asarray(getattr(auto, field))
        assert np.max(np.abs(ref)) > 0
        assert _rel(g, ref) < 1e-10, field
        np.testing.assert_allclose(g, g.T, rtol=1e-12)


# --------------------------------------------------------------------------- batching
def test_batch_invariance(x64):
    """Several systems in one (padded) batch give the same results as each alone."""
    model = _lj("switch")
    names = ["small_cubic", "slab", "cluster"]
    atoms_list = [SYSTEMS[n]() for n in names]
    capacity = Capacity(num_systems=5, num_atoms=160)
    batch, _, out = _evaluate(model, atoms_list, method="cell_list", capacity=capacity)
    for s, (atoms, idx) in enumerate(zip(atoms_list, batch.system_slices())):
        _, _, alone = _evaluate(model, [atoms], method="all_pairs", max_neighbors=128)
        n = len(atoms)
        assert abs(float(out.energy[s]) - float(alone.energy[0])) <= 1e-12 * abs(float(alone.energy[0]))
        np.testing.assert_allclose(np.asarray(out.forces)[idx], np.asarray(alone.forces)[:n],
                                   rtol=0, atol=1e-12 * float(np.max(np.abs(alone.forces))))
        np.testing.assert_allclose(out.stress[s], alone.stress[0], rtol=0,
                                   atol=1e-12 * max(float(np.max(np.abs(alone.stress))), 1e-300))
    # Empty slots: zero energy and stress; padding atoms: zero force.
    assert np.all(np.asarray(out.energy)[len(names):] == 0)
    assert np.all(np.asarray(out.stress)[len(names):] == 0)
    assert np.all(np.asarray(out.forces)[~np.asarray(batch.atom_mask)] == 0)


def test_compute_without_forces_and_stress(x64):
    model = _lj("shift")
    batch, nl, full = _evaluate(model, [_small_supercell(), _cluster()])
    energy_only = _compute(model, batch.positions, batch.cell, batch, nl, forces=False)
    assert energy_only.forces is None and energy_only.stress is None
    np.testing.assert_allclose(energy_only.energy, full.energy, rtol=1e-14)
    no_stress = _compute(model, batch.positions, batch.cell, batch, nl)
    assert no_stress.stress is None
    np.testing.assert_allclose(no_stress.forces, full.forces, rtol=1e-14, atol=1e-16)


# --------------------------------------------------------------------------- compilation
def test_no_retrace_on_new_positions_or_parameters(x64):
    traces = []

    @jax.jit
    def step(model, positions, cell, batch, nl):
        traces.append(1)
        return compute(model, positions, cell, batch, nl, stress=True)

    model = LennardJones(sigma=SIGMA, epsilon=EPSILON, cutoff=CUTOFF, shift=True)
    batch, nl, ref = _evaluate(model, [_small_supercell(), _slab()])
    out1 = step(model, batch.positions, batch.cell, batch, nl)
    np.testing.assert_allclose(out1.energy, ref.energy, rtol=1e-13)
    rng = np.random.default_rng(41)
    moved = batch.positions + 0.01 * jnp.asarray(rng.standard_normal(batch.positions.shape))
    out2 = step(model, moved, batch.cell, batch, nl)
    assert len(traces) == 1
    assert not np.allclose(out2.energy, out1.energy)

    # A new epsilon (a pytree leaf) is a new argument value, not a new program.
    out3 = step(model.replace(epsilon=2 * EPSILON), batch.positions, batch.cell, batch, nl)
    assert len(traces) == 1
    np.testing.assert_allclose(out3.energy, 2 * np.asarray(out1.energy), rtol=1e-12)
    np.testing.assert_allclose(out3.forces, 2 * np.asarray(out1.forces), rtol=1e-12, atol=1e-15)
    out4 = step(model.replace(epsilon=jnp.asarray(0.5 * EPSILON), sigma=jnp.asarray(SIGMA)),
                batch.positions, batch.cell, batch, nl)
    assert len(traces) == 1
    np.testing.assert_allclose(out4.energy, 0.5 * np.asarray(out1.energy), rtol=1e-12)

    # Tables over species likewise.
    mixed = LennardJones.mixed(species=(18, 36), sigma=(3.4, 3.65), epsilon=(0.0104, 0.014),
                               cutoff=CUTOFF, shift=True)
    step(mixed, batch.positions, batch.cell, batch, nl)
    assert len(traces) == 2
    step(mixed.replace(epsilon=mixed.epsilon * 1.5), batch.positions, batch.cell, batch, nl)
    assert len(traces) == 2
    # A static attribute (the cutoff) is part of the program and does retrace.
    step(LennardJones(sigma=SIGMA, epsilon=EPSILON, cutoff=8.0, shift=True),
         batch.positions, batch.cell, batch, nl)
    assert len(traces) == 3


def test_grad_wrt_parameters(x64):
    """Parameters are differentiable leaves: dE/d epsilon = E / epsilon for LJ."""
    model = _lj("shift")
    batch, nl, out = _evaluate(model, [_small_supercell()])
    grad = jax.grad(lambda m: compute(m, batch.positions, batch.cell, batch, nl,
                                      forces=False).energy[0])(model)
    assert float(grad.epsilon) == pytest.approx(float(out.energy[0]) / EPSILON, rel=1e-12)
    assert np.isfinite(float(grad.sigma))


# --------------------------------------------------------------------------- validation
def test_unknown_species_raise():
    model = LennardJones.mixed(species=(18,), sigma=(SIGMA,), epsilon=(EPSILON,), cutoff=CUTOFF)
    atoms = Atoms("ArKrXe", positions=[[0, 0, 0], [4, 0, 0], [0, 4, 0]])
    batch = Batch.from_atoms([atoms, Atoms("Ar", positions=[[0, 0, 0]])], min_distance=None)
    with pytest.raises(ValueError, match=r"atomic numbers \[36, 54\]"):
        model.check(batch)
    model.check(Batch.from_atoms([Atoms("Ar2", positions=[[0, 0, 0], [4, 0, 0]])],
                                 min_distance=None))
    for other in (Morse(depth=np.ones((2, 2)), alpha=1.0, r0=2.0, cutoff=5.0, species=(18, 10)),
                  SoftSphere(sigma=np.full((2, 2), 2.0), epsilon=1.0, species=(18, 10))):
        with pytest.raises(ValueError, match=r"\[36, 54\]"):
            other.check(batch)
    # Scalar-parameter models accept every element.
    _lj("shift").check(batch)


def test_unknown_species_energy_is_nan(x64):
    """Without check(), pairs involving an unparametrised element are NaN, not silently 0."""
    model = LennardJones.mixed(species=(18,), sigma=(SIGMA,), epsilon=(EPSILON,), cutoff=CUTOFF)
    atoms = Atoms("ArKr", positions=[[0, 0, 0], [4, 0, 0]])
    ok = Atoms("Ar2", positions=[[0, 0, 0], [4, 0, 0]])
    _, _, out = _evaluate(model, [atoms, ok], stress=False)
    assert np.isnan(float(out.energy[0]))
    assert np.isfinite(float(out.energy[1]))


@pytest.mark.parametrize("make, match", [
    (lambda: LennardJones(sigma=np.ones((3, 3)), epsilon=1.0, cutoff=5.0, species=(18, 36)),
     r"shape \(3, 3\), expected \(2, 2\)"),
    (lambda: LennardJones(sigma=np.ones(2), epsilon=1.0, cutoff=5.0, species=(18, 36)),
     r"shape \(2,\), expected \(2, 2\)"),
    (lambda: LennardJones(sigma=3.4, epsilon=np.ones((2, 2)), cutoff=5.0),
     "no 'species'"),
    (lambda: LennardJones(sigma=np.array([[3.4, 3.5], [3.6, 3.65]]), epsilon=1.0, cutoff=5.0,
                          species=(18, 36)), "symmetric"),
    (lambda: LennardJones.mixed(species=(18, 36), sigma=(3.4, 3.6, 3.9), epsilon=(1.0, 1.0),
                                cutoff=5.0), "shape"),
    (lambda: LennardJones(sigma=3.4, epsilon=1.0, cutoff=0.0), "cutoff"),
    (lambda: LennardJones(sigma=3.4, epsilon=1.0, cutoff=None), "cutoff"),
    (lambda: LennardJones(sigma=3.4, epsilon=1.0, cutoff=5.0, switch_on=6.0), "switch_on"),
    (lambda: LennardJones(sigma=3.4, epsilon=1.0, cutoff=5.0, shift=True, switch_on=4.0), "shift"),
    (lambda: Morse(depth=np.ones((2, 2)), alpha=np.ones((3, 3)), r0=2.0, cutoff=5.0,
                   species=(1, 2)), r"Morse.alpha has shape \(3, 3\)"),
    (lambda: Morse(depth=1.0, alpha=1.0, r0=2.0, cutoff=-1.0), "cutoff"),
    (lambda: SoftSphere(sigma=np.ones((2, 2)), epsilon=1.0), "no 'species'"),
    (lambda: SoftSphere(sigma=np.ones((2, 2)), epsilon=np.ones((1, 1)), species=(1, 2)),
     r"SoftSphere.epsilon has shape \(1, 1\)"),
    (lambda: SoftSphere(sigma=1.0, epsilon=1.0, alpha=0.5), "alpha"),
])
def test_bad_parameters_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()
