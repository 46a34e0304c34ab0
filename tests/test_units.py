"""nvalchemi_jax.units against ASE's unit system, plus round trips of the helpers.

ASE's internal units are the same metal units we use (Å, eV, amu, and time in
Å·sqrt(amu/eV)), so ``ase.units.fs``, ``GPa``, ``bar`` and ``kB`` are directly
comparable with ``units.FS``, ``GPA``, ``BAR`` and ``KB``.

Tolerances: ``ase.units`` defaults to CODATA 2014 (``ase.units.__codata_version__``)
while we use CODATA 2018 / the 2019 SI. The elementary charge (1.6021766208e-19
vs the exact 1.602176634e-19 C) and the atomic mass constant (1.660539040e-27 vs
1.66053906660e-27 kg) differ by ~1e-8 relative, so fs, GPa and bar agree to
~1e-8 and a 1e-7 relative tolerance is comfortable. The Boltzmann constant
moved more: 1.38064852e-23 (2014) vs the exact 1.380649e-23 J/K (2018), a 3.4e-7
relative change, so kB is compared to 1e-6 there. Against ASE's own CODATA 2018
table (``ase.units.create_units("2018")``) everything agrees to round-off (kB to
1e-10 because our KB is the 10-digit published value 8.617333262e-5 eV/K).
"""

import ase.units
import jax.numpy as jnp
import numpy as np
import pytest

from nvalchemi_jax import units

ASE_2018 = ase.units.create_units("2018")


@pytest.mark.parametrize("ours, theirs, rtol", [
    (units.FS, ase.units.fs, 1e-7),
    (units.GPA, ase.units.GPa, 1e-7),
    (units.BAR, ase.units.bar, 1e-7),
    (units.KB, ase.units.kB, 1e-6),   # CODATA 2014 k_B differs by 3.4e-7, see module docstring
], ids=["fs", "GPa", "bar", "kB"])
def test_against_ase_default_codata(ours, theirs, rtol):
    assert ours == pytest.approx(theirs, rel=rtol)


@pytest.mark.parametrize("ours, name, rtol", [
    (units.FS, "fs", 1e-12),
    (units.GPA, "GPa", 1e-12),
    (units.BAR, "bar", 1e-12),
    (units.KB, "kB", 1e-10),
], ids=["fs", "GPa", "bar", "kB"])
def test_against_ase_codata_2018(ours, name, rtol):
    assert ours == pytest.approx(ASE_2018[name], rel=rtol)


def test_derived_constants_are_consistent():
    assert units.FS * units.FS_PER_INTERNAL_TIME == pytest.approx(1.0, rel=1e-15)
    assert units.FS_PER_INTERNAL_TIME == pytest.approx(10.1805055, rel=1e-7)
    assert units.BAR == pytest.approx(units.GPA * 1e-4, rel=1e-14)
    # 1 eV/Å³ = 160.2176634 GPa (exact with the 2019 SI elementary charge)
    assert 1.0 / units.GPA == pytest.approx(160.2176634, rel=1e-14)
    # docstring examples
    assert round(units.GPA, 6) == 0.006242
    assert units.stress_to_gpa(0.01) == pytest.approx(1.602176634, rel=1e-14)


def test_time_round_trip_and_direction():
    dt = np.array([0.5, 1.0, 2.0, 10.0])
    internal = units.fs_to_internal(dt)
    # 1 fs is about 0.0982 internal units (internal unit ≈ 10.18 fs)
    np.testing.assert_allclose(internal, dt * ase.units.fs, rtol=1e-7)
    np.testing.assert_allclose(units.internal_to_fs(internal), dt, rtol=1e-14)
    assert units.internal_to_fs(units.fs_to_internal(1.0)) == pytest.approx(1.0, rel=1e-15)


def test_pressure_round_trips():
    p = np.array([-3.0, 0.0, 1e-3, 1.0, 250.0])
    np.testing.assert_allclose(units.stress_to_gpa(units.gpa_to_stress(p)), p, rtol=1e-14)
    np.testing.assert_allclose(units.stress_to_bar(units.bar_to_stress(p)), p, rtol=1e-14)
    s = np.array([1e-4, 0.01, 0.5])
    np.testing.assert_allclose(units.gpa_to_stress(units.stress_to_gpa(s)), s, rtol=1e-14)
    np.testing.assert_allclose(units.bar_to_stress(units.stress_to_bar(s)), s, rtol=1e-14)
    # direction: 1 GPa = 1e4 bar, and equals ase.units.GPa eV/Å³
    assert units.stress_to_bar(units.gpa_to_stress(1.0)) == pytest.approx(1e4, rel=1e-14)
    assert units.gpa_to_stress(1.0) == pytest.approx(ase.units.GPa, rel=1e-7)
    assert units.stress_to_gpa(ase.units.GPa) == pytest.approx(1.0, rel=1e-7)


def test_helpers_work_on_jax_arrays():
    x = jnp.array([1.0, 2.0], dtype=jnp.float32)
    for fn, inv in [(units.fs_to_internal, units.internal_to_fs),
                    (units.gpa_to_stress, units.stress_to_gpa),
                    (units.bar_to_stress, units.stress_to_bar)]:
        y = inv(fn(x))
        assert isinstance(y, type(x)) and y.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(y), [1.0, 2.0], rtol=1e-6)


@pytest.mark.filterwarnings("ignore:Use thermalize_momenta:DeprecationWarning")
def test_kinetic_temperature():
    # equipartition: KE = dof/2 kB T
    n_atoms, temperature = 64, 300.0
    dof = 3 * n_atoms - 3
    ke = 0.5 * dof * units.KB * temperature
    assert units.kinetic_temperature(ke, dof) == pytest.approx(temperature, rel=1e-14)
    # agrees with ASE's temperature for the same kinetic energy (ASE uses 3N dof)
    from ase import Atoms
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    atoms = Atoms("Ar64", positions=np.random.default_rng(0).uniform(0, 10, (64, 3)))
    MaxwellBoltzmannDistribution(atoms, temperature_K=500.0, rng=np.random.default_rng(1))
    ke = atoms.get_kinetic_energy()
    assert units.kinetic_temperature(ke, 3 * len(atoms)) == pytest.approx(
        atoms.get_temperature(), rel=1e-6)   # CODATA 2014 vs 2018 kB, see module docstring
    # vectorised
    t = units.kinetic_temperature(np.array([0.0, ke]), np.array([3, 3 * len(atoms)]))
    assert t[0] == 0.0 and t[1] == pytest.approx(atoms.get_temperature(), rel=1e-6)
