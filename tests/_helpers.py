"""Shared test helpers: small argon batches, a mixed batch, ASE's VelocityVerlet, and a
compilation counter."""

import contextlib

import jax
import jax.monitoring
import numpy as np

import nvalchemi_jax as nj
from nvalchemi_jax.datasets import fcc_crystal

ARGON = dict(sigma=3.40, epsilon=0.0104, cutoff=8.5)


def argon_batch(repeats=((2, 2, 2),), rattle=0.05, seed=0, sample_ids=None, temperature=None,
                capacity=None, key=0):
    """Rattled periodic FCC argon crystals, one per entry of ``repeats``."""
    rng = np.random.default_rng(seed)
    positions, cells = [], []
    for r in repeats:
        p, c = fcc_crystal(r)
        positions.append(p + rng.normal(0, rattle, p.shape))
        cells.append(c)
    batch = nj.Batch.from_arrays(positions=positions, atomic_numbers=[np.full(len(p), 18) for p in positions],
                                 cell=cells, pbc=[True] * len(positions), sample_ids=sample_ids,
                                 capacity=capacity)
    if temperature is not None:
        from nvalchemi_jax.dynamics import maxwell_boltzmann
        batch = batch.replace(velocities=maxwell_boltzmann(batch, temperature, jax.random.key(key)))
    return batch


def ase_velocity_verlet(batch, steps, dt=5.0, **lj):
    """The first system of ``batch`` run by ASE's VelocityVerlet (``dt`` fs) under ASE's own
    Lennard-Jones (``lj``: sigma, epsilon, rc, smooth, ...); returns the ASE ``Atoms``."""
    from ase import units
    from ase.calculators.lj import LennardJones
    from ase.md.verlet import VelocityVerlet
    atoms = batch.to_atoms()[0]
    atoms.calc = LennardJones(**lj)
    VelocityVerlet(atoms, timestep=dt * units.fs).run(steps)
    return atoms


def assert_matches_ase(state, atoms, energy_rtol=1e-9):
    """The first system of ``state`` against ASE's ``atoms`` after the same run: positions
    within 1e-6 Å, velocities 1e-8 Å/fs-units, energy to ``energy_rtol``."""
    from ase import units
    n = len(atoms)
    assert np.abs(np.asarray(state.positions[:n]) - atoms.positions).max() < 1e-6
    np.testing.assert_allclose(np.asarray(state.velocities[:n]) / units.fs, atoms.get_velocities(),
                               atol=1e-8)
    np.testing.assert_allclose(float(state.energy[0]), atoms.get_potential_energy(), rtol=energy_rtol)


def run_both(monkeypatch, variable, md, batch, state=None, **kwargs):
    """The same run with the path switched by environment ``variable`` on ("1") and off
    ("0"): ``(on, off)`` run results."""
    runs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv(variable, flag)
        runs[flag] = md.run(batch, state=state, **kwargs)
    return runs["1"], runs["0"]


def assert_same_states(fast, slow, rtol=1e-9, atol=1e-12, rebuilds=True):
    """Two states of the same run agree: float fields to ``rtol`` / ``atol``, counters and
    codes exactly, and (``rebuilds``) the neighbor-list rebuild counts."""
    for name in ("positions", "velocities", "forces", "energy", "previous_energy"):
        np.testing.assert_allclose(np.asarray(getattr(fast, name)), np.asarray(getattr(slow, name)),
                                   rtol=rtol, atol=atol, err_msg=name)
    for name in ("step", "status", "failure", "global_step"):
        np.testing.assert_array_equal(np.asarray(getattr(fast, name)), np.asarray(getattr(slow, name)),
                                      err_msg=name)
    if rebuilds:
        np.testing.assert_array_equal(np.asarray(fast.neighbors.rebuilds),
                                      np.asarray(slow.neighbors.rebuilds), err_msg="rebuilds")


def mixed_batch(temperature=60.0):
    """Three crystals of 32, 48 and 108 atoms, every fifth atom krypton, atom 3 fixed."""
    rng = np.random.default_rng(1)
    positions, cells, numbers, fixed = [], [], [], []
    for r in [(2, 2, 2), (2, 2, 3), (3, 3, 3)]:
        p, c = fcc_crystal(r)
        positions.append(p + rng.normal(0, 0.05, p.shape))
        cells.append(c)
        z = np.full(len(p), 18)
        z[::5] = 36
        numbers.append(z)
        pin = np.zeros(len(p), bool)
        pin[3] = True
        fixed.append(pin)
    batch = nj.Batch.from_arrays(positions=positions, atomic_numbers=numbers, cell=cells,
                                 pbc=[True] * 3, fixed=fixed, sample_ids=[4, 5, 6])
    from nvalchemi_jax.dynamics import maxwell_boltzmann
    return batch.replace(velocities=maxwell_boltzmann(batch, temperature, jax.random.key(2)))


@contextlib.contextmanager
def count_compilations():
    """Counts XLA backend compilations inside the block: ``with count_compilations() as n: ...; n[0]``.
    A program loaded from the persistent compilation cache (conftest) counts too: JAX records
    the same event for it."""
    count = [0]

    def listener(name, secs, **kwargs):
        if name == "/jax/core/compile/backend_compile_duration":
            count[0] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield count
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
