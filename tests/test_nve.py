"""NVE against independent references: ASE's VelocityVerlet and energy conservation."""

import jax
import numpy as np
import pytest
from ase import units as ase_units

from nvalchemi_jax.dynamics import NVE, kinetic_energy, maxwell_boltzmann, temperature
from nvalchemi_jax.models import LennardJones

from _helpers import ARGON, argon_batch, ase_velocity_verlet


def test_matches_ase_velocity_verlet(x64):
    """Same start, 100 steps of 5 fs: positions agree to 1e-6 Å with ASE driving its own LJ."""
    batch = argon_batch(repeats=[(3, 3, 3)], temperature=40.0)
    md = NVE(model=LennardJones(**ARGON, shift=True), dt=5.0, n_steps=100)
    ours = md.run(batch).state
    atoms = ase_velocity_verlet(batch, 100, sigma=ARGON["sigma"], epsilon=ARGON["epsilon"],
                                rc=ARGON["cutoff"], smooth=False)
    n = len(atoms)
    assert np.abs(np.asarray(ours.positions[:n]) - atoms.positions).max() < 1e-6
    np.testing.assert_allclose(np.asarray(ours.velocities[:n]) / ase_units.fs, atoms.get_velocities(),
                               atol=1e-8)


def energy_drift(n_steps, switch_on=None):
    batch = argon_batch(repeats=[(3, 3, 3), (3, 3, 3)], temperature=40.0, sample_ids=[0, 1])
    model = LennardJones(**ARGON, shift=switch_on is None, switch_on=switch_on)
    md = NVE(model=model, dt=5.0, n_steps=n_steps)
    start = md.init(batch)
    end = md.run(batch, state=start, chunk_size=500).state
    e0 = np.asarray(start.energy + kinetic_energy(start.velocities, batch))[:2]
    e1 = np.asarray(end.energy + kinetic_energy(end.velocities, batch))[:2]
    return np.abs((e1 - e0) / e0)


def test_energy_conservation_short(x64):
    assert energy_drift(1000).max() < 1e-4


@pytest.mark.slow
def test_energy_conservation_10k_steps(x64):
    """The acceptance run: FCC argon, LJ cutoff 8.5 Å, 40 K, dt 5 fs, 10,000 steps."""
    assert energy_drift(10_000).max() < 1e-4


def test_maxwell_boltzmann(x64):
    """Velocities have zero total momentum, per-system temperatures near target (exact when
    asked), depend only on the sample id, and fixed atoms stay at rest."""
    batch = argon_batch(repeats=[(3, 3, 3)] * 3, sample_ids=[7, 8, 9])
    temps = np.array([10.0, 100.0, 300.0])
    v = maxwell_boltzmann(batch, temps, jax.random.key(3))
    p = np.zeros((3, 3))
    np.add.at(p, np.minimum(np.asarray(batch.system_index), 2),
              np.asarray(batch.masses)[:, None] * np.asarray(v) * np.asarray(batch.atom_mask)[:, None])
    np.testing.assert_allclose(p, 0, atol=1e-10)
    t = np.asarray(temperature(v, batch))[:3]
    # 321 degrees of freedom: relative spread sqrt(2/321) = 8 %; 4 sigma bound.
    np.testing.assert_allclose(t, temps, rtol=0.32)
    exact = maxwell_boltzmann(batch, temps, jax.random.key(3), exact=True)
    np.testing.assert_allclose(np.asarray(temperature(exact, batch))[:3], temps, rtol=1e-10)
    # System with sample id 8 alone gets the same velocities.
    alone = argon_batch(repeats=[(3, 3, 3)], sample_ids=[8])
    v_alone = maxwell_boltzmann(alone, 100.0, jax.random.key(3))
    second = np.asarray(batch.system_index) == 1
    np.testing.assert_allclose(np.asarray(v)[second], np.asarray(v_alone)[:108], atol=1e-12)
