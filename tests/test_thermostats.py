"""NVT thermostats (Langevin BAOAB, Nosé–Hoover chain) against independent references.

* Canonical sampling: the time- and ensemble-averaged kinetic temperature equals
  the target, and each system's kinetic energy follows the canonical Gamma
  distribution (shape dof/2, scale kT) by a Kolmogorov–Smirnov test on samples
  spaced further apart than their correlation time. Langevin's random force does
  not conserve momentum (dof = 3N); Nosé–Hoover conserves zero total momentum
  (dof = 3N − 3).
* Nosé–Hoover: the extended energy is conserved; the chain integrator matches a
  high-accuracy ODE solution (scipy) with the convergence order its Suzuki–Yoshida
  weights promise, so chain_length, yoshida_order and n_chain_steps are honoured.
* Engine contract: batch invariance (mixed sizes and temperatures == each system
  alone), jit == eager, init/step share a treedef and a changed temperature does not
  recompile, bad parameters raise ValueError naming the parameter.

The default run keeps each physics test short (FCC argon, 64 systems of 32 atoms);
``--runslow`` runs the acceptance lengths (10⁴+ steps).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, stats

from nvalchemi_jax import Batch, Capacity, units
from nvalchemi_jax.datasets import fcc_crystal
from nvalchemi_jax.dynamics import thermo
from nvalchemi_jax.dynamics.integrators.langevin import NVTLangevin
from nvalchemi_jax.dynamics.integrators.nose_hoover import (NVTNoseHoover, chain_half_step,
                                                           chain_masses, nose_hoover_energy)
from nvalchemi_jax.dynamics.integrators.nose_hoover import _yoshida_weights
from nvalchemi_jax.models import LennardJones

# Argon; the C¹ switch makes forces continuous, which energy conservation needs.
LJ = LennardJones(sigma=3.40, epsilon=0.0104, cutoff=8.5, switch_on=7.5)
# A crystal at 50 K never moves an atom 0.75 Å from its site: with this skin the
# neighbor list is (almost) never rebuilt, which keeps the tests fast.
SKIN = 1.5
T_TARGET = 50.0         # K, well below the melting point of LJ argon (~84 K)
DT = 5.0                # fs


def argon_batch(n_systems, repeats=(2, 2, 2), sample_ids=None, capacity=None):
    positions, cell = fcc_crystal(repeats)
    return Batch.from_arrays(positions=[positions] * n_systems,
                             atomic_numbers=[np.full(len(positions), 18)] * n_systems,
                             cell=[cell] * n_systems, pbc=[[True] * 3] * n_systems,
                             sample_ids=sample_ids, capacity=capacity)


def with_velocities(batch, temperature, seed=1):
    """Maxwell–Boltzmann velocities with zero total momentum. Started from the
    perfect lattice, a (nearly harmonic) crystal at 2T shares half its kinetic
    energy with the potential and settles near T: a short equilibration."""
    v = thermo.maxwell_boltzmann(batch, temperature, jax.random.key(seed), remove_com=True)
    return batch.replace(velocities=v)


@partial(jax.jit, static_argnames=("length", "record"))
def _run_chunk(dyn, state, batch, length, record):
    def body(state, _):
        state = dyn.step(state, batch)
        return state, record(dyn, state, batch)
    return jax.lax.scan(body, state, None, length=length)


def record_run(dyn, batch, state, n_chunks, chunk, record):
    """Run ``n_chunks * chunk`` steps; return the final state and ``record(dyn, state, batch)``
    after every step, stacked ``(steps, ...)`` on the host. ``dyn`` is an argument of
    the compiled chunk, so dynamics that differ only in numbers share one compilation."""
    out = []
    for _ in range(n_chunks):
        state, rec = _run_chunk(dyn, state, batch, chunk, record)
        out.append(jax.device_get(rec))
    return state, jax.tree.map(lambda *xs: np.concatenate(xs), *out)


def energy(dyn, state, batch):
    return state.energy


def kinetic(dyn, state, batch):
    return thermo.kinetic_energy(state.velocities, batch)


def lag_autocorrelation(series):
    """Lag-1 autocorrelation of ``series (T, S)`` of identically distributed systems
    (deviations from the ensemble mean, pooled over systems)."""
    x = series - series.mean()
    return float(np.sum(x[1:] * x[:-1]) / np.sum(x * x))


# --------------------------------------------------------------------------- canonical sampling
# name: (dynamics, remove_com for the dof, equilibration steps, sample stride, samples per
# system in the default run). Strides: the kinetic-energy autocorrelation (measured with
# 32 systems over 2,000 steps) is 0.09 at 10 steps and 0.006 at 20 for Langevin
# (γ = 0.02/fs); Nosé–Hoover (τ = 50 fs) oscillates with a ~200 fs period and an
# envelope that falls to 0.11 at 80 steps and 0.02 at 120.
CANONICAL = {
    "langevin": (NVTLangevin(model=LJ, dt=DT, temperature=T_TARGET, friction=0.02, skin=SKIN),
                 False, 100, 20, 10),
    "nose_hoover": (NVTNoseHoover(model=LJ, dt=DT, temperature=T_TARGET, tau=50.0, skin=SKIN),
                    True, 240, 80, 6),
}


@pytest.mark.parametrize("name", list(CANONICAL))
@pytest.mark.parametrize("long", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_canonical_kinetic_energy(name, long):
    """64 independent 32-atom argon crystals: mean T within 2 % of the target and
    per-system KE ~ Gamma(dof/2, kT) (KS test, p > 0.01) on time-decorrelated samples."""
    dyn, remove_com, n_equilibrate, stride, n_samples = CANONICAL[name]
    if long:                                                   # >= 10^4 steps
        n_samples = 10_000 // stride
    batch = with_velocities(argon_batch(64), 2 * T_TARGET)
    state = dyn.init(batch, jax.random.key(7))
    n_steps = n_equilibrate + n_samples * stride
    state, ke = record_run(dyn, batch, state, n_steps // stride, stride, kinetic)
    ke = ke[n_equilibrate:]                                    # (steps, 64) eV
    dof = float(thermo.degrees_of_freedom(batch, remove_com=remove_com)[0])
    kt = units.KB * T_TARGET

    mean_t = 2.0 * ke.mean() / (dof * units.KB)
    # 64 systems x many correlation times: the standard error is ~0.3 %, so 2 % is
    # a real test of the thermostat (and of BAOAB's O(dt²) bias, ~0.1 % at 5 fs).
    assert abs(mean_t / T_TARGET - 1) < 0.02, mean_t

    samples = ke[stride - 1::stride]                           # (n_samples, 64)
    # Samples one stride apart must be nearly independent for the KS test to hold.
    rho = lag_autocorrelation(samples)
    assert abs(rho) < 0.25, rho
    p = stats.kstest(samples.ravel(), "gamma", args=(dof / 2, 0.0, kt)).pvalue
    assert p > 0.01, (p, mean_t)
    # The test has power: the same samples reject a temperature 5 % off.
    wrong = stats.kstest(samples.ravel(), "gamma", args=(dof / 2, 0.0, 1.05 * kt)).pvalue
    assert wrong < 0.01, wrong
    print(f"{name}: mean T = {mean_t:.3f} K, KS p = {p:.3f} ({samples.size} samples, "
          f"lag-{stride} autocorrelation {rho:+.3f}), rebuilds {int(state.neighbors.rebuilds.sum())}")


# --------------------------------------------------------------------------- Nosé–Hoover
@pytest.mark.parametrize("n_steps", [400, pytest.param(10_000, marks=pytest.mark.slow)])
def test_nose_hoover_conserves_extended_energy(x64, n_steps):
    """float64: the extended energy drifts less than 1e-4 of itself while the
    thermostat exchanges far more energy than that with the particles."""
    temperatures = jnp.array([30.0, 45.0, 60.0, 75.0])
    batch = argon_batch(4)
    batch = batch.replace(velocities=thermo.maxwell_boltzmann(batch, 2 * temperatures,
                                                              jax.random.key(3)))
    dyn = NVTNoseHoover(model=LJ, dt=DT, temperature=temperatures, tau=50.0, skin=SKIN)
    state = dyn.init(batch, jax.random.key(0))
    h0 = np.asarray(nose_hoover_energy(state, batch, dyn))
    _, (h, bath) = record_run(dyn, batch, state, n_steps // 200, 200, extended_and_bath)
    drift = np.max(np.abs(h - h0), axis=0)
    relative = drift / np.abs(h0)
    assert np.all(relative < 1e-4), relative
    exchanged = np.ptp(bath, axis=0)
    assert np.all(exchanged > 100 * drift), (exchanged, drift)
    print(f"NH extended energy over {n_steps} steps: max relative drift {relative.max():.2e} "
          f"(max |ΔH| {drift.max():.2e} eV; energy exchanged with the chain {exchanged.min():.2e} eV)")


def extended_and_bath(dyn, state, batch):
    """The extended energy and the thermostats' share of it, eV."""
    h = nose_hoover_energy(state, batch, dyn)
    return h, h - thermo.kinetic_energy(state.velocities, batch) - state.energy


def _chain_reference(kinetic0, p0, masses, kt, dof, duration):
    """The exact flow of the chain plus the friction on the particles (no forces),
    by scipy's DOP853 at tight tolerance: an independent reference for the splitting."""
    m = len(p0)

    def rhs(_, y):
        ke, eta, p = y[0], y[1:m + 1], y[m + 1:]
        g = np.empty(m)
        g[0] = 2 * ke - dof * kt
        g[1:] = p[:-1] ** 2 / masses[:-1] - kt
        friction = np.append(p[1:] / masses[1:], 0.0)
        return np.concatenate([[-2 * p[0] / masses[0] * ke], p / masses, g - p * friction])

    y0 = np.concatenate([[kinetic0], np.zeros(m), p0])
    sol = integrate.solve_ivp(rhs, (0, duration), y0, method="DOP853", rtol=1e-13, atol=1e-16)
    y = sol.y[:, -1]
    return np.sqrt(y[0] / kinetic0), y[1:m + 1], y[m + 1:]


@pytest.mark.parametrize("chain_length", [1, 2, 4])
def test_chain_step_matches_exact_flow_with_yoshida_order(x64, chain_length):
    """The half chain step converges to the exact thermostat flow, faster with more
    Suzuki–Yoshida weights (order 2 -> 4 -> 6) and with more sub-steps."""
    dof, kt, tau = 93.0, units.KB * 50.0, 50.0
    masses = np.asarray(chain_masses(jnp.array([dof]), jnp.array([kt]), jnp.array([tau]),
                                     chain_length))[0]
    kinetic0 = 1.6 * 0.5 * dof * kt                          # hot: the chain works hard
    p0 = 0.3 * np.sqrt(masses * kt) * (-1.0) ** np.arange(chain_length)
    duration = 60.0                                           # fs, longer than τ: a stiff test
    exact = _chain_reference(kinetic0, p0, masses, kt, dof, duration)

    def error(order, n_chain_steps):
        scale, eta, p = chain_half_step(
            jnp.array([kinetic0]), jnp.zeros((1, chain_length)), jnp.array([p0]),
            jnp.array([masses]), jnp.array([kt]), jnp.array([dof]), jnp.array([duration]),
            _yoshida_weights(order), n_chain_steps)
        got = np.concatenate([np.asarray(scale), np.asarray(eta)[0], np.asarray(p)[0]])
        want = np.concatenate([[exact[0]], exact[1], exact[2]])
        norm = np.concatenate([[1.0], np.ones(chain_length), np.sqrt(masses * kt)])
        return np.max(np.abs(got - want) / norm)

    errors = {order: error(order, 4) for order in (1, 3, 5, 7)}
    assert errors[1] > 10 * errors[3] > 0, errors
    assert errors[5] < errors[1] and errors[7] < errors[3], errors
    assert errors[7] < 1e-8, errors
    # Doubling the sub-steps cuts the error by 2^2 (order 1) and 2^4 (order 3).
    assert error(1, 4) / error(1, 8) > 3.0
    assert error(3, 4) / error(3, 8) > 10.0


def test_nose_hoover_static_options_change_the_trajectory(x64):
    """chain_length, yoshida_order and n_chain_steps reach the integrator: from one
    state (a hot crystal whose chain is already moving), the thermostatted half of a
    step differs for every option, and a short trajectory differs with chain_length."""
    batch = with_velocities(argon_batch(1), 4 * T_TARGET)
    base = dict(model=LJ, dt=DT, temperature=T_TARGET, tau=25.0, skin=SKIN)
    final = {}
    for options in [dict(), dict(chain_length=1), dict(chain_length=5), dict(yoshida_order=1),
                    dict(yoshida_order=5), dict(yoshida_order=7), dict(n_chain_steps=3)]:
        dyn = NVTNoseHoover(**base, **options)
        state = dyn.init(batch, jax.random.key(0))
        m = dyn.chain_length
        assert state.stage.system["eta"].shape == (1, m)
        # A chain in motion, the same for every option (its first three thermostats).
        p_eta = jnp.asarray([[0.02, -0.01, 0.005, 0.0, 0.0][:m]])
        state = state.replace(stage=state.stage.replace(system={**state.stage.system,
                                                                "p_eta": p_eta}))
        after = jax.jit(dyn.post_update)(state, batch)
        final[tuple(options.items())] = np.concatenate([np.asarray(after.velocities).ravel(),
                                                        np.asarray(after.stage.system["p_eta"])[0, :1]])
    keys = list(final)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            assert np.max(np.abs(final[a] - final[b])) > 1e-12, (a, b)
    # Whole steps: one thermostat (plain Nosé–Hoover) vs a chain of three.
    paths = []
    for m in (1, 3):
        dyn = NVTNoseHoover(**base, chain_length=m)
        state, _ = record_run(dyn, batch, dyn.init(batch), 1, 40, energy)
        paths.append(np.asarray(state.positions))
    assert np.max(np.abs(paths[0] - paths[1])) > 1e-6


# --------------------------------------------------------------------------- engine contract
# The contract tests share one float64 layout (capacity and neighbor spec) so that the
# compiled step is reused: a 108-atom crystal at 70 K (sample 9), a 32-atom one at 40 K
# (sample 5) and an empty slot.
CAPACITY = Capacity(num_systems=3, num_atoms=160)
SPEC = neighbors.NeighborSpec(cutoff=LJ.cutoff, skin=SKIN, max_neighbors=160,
                              method="all_pairs", max_candidates=27 * 108)


def _make(kind, temperature, **options):
    if kind == "langevin":
        return NVTLangevin(model=LJ, dt=DT, temperature=temperature, friction=0.05, skin=SKIN,
                           **options)
    return NVTNoseHoover(model=LJ, dt=DT, temperature=temperature, tau=40.0, skin=SKIN, **options)


def _systems():
    small, small_cell = fcc_crystal((2, 2, 2))
    large, large_cell = fcc_crystal((3, 3, 3))
    rng = np.random.default_rng(0)
    # Rattled so the forces are not zero from the first step.
    return [(large + rng.normal(0, 0.05, large.shape), large_cell, 70.0, 9),
            (small + rng.normal(0, 0.05, small.shape), small_cell, 40.0, 5)]


def _batch(systems):
    """The systems in the shared layout, Maxwell–Boltzmann velocities at their own
    temperatures, and the ``(S,)`` temperatures (1 K in empty slots)."""
    batch = Batch.from_arrays(positions=[s[0] for s in systems],
                              atomic_numbers=[np.full(len(s[0]), 18) for s in systems],
                              cell=[s[1] for s in systems], pbc=[[True] * 3] * len(systems),
                              sample_ids=[s[3] for s in systems], capacity=CAPACITY,
                              min_distance=None)
    temps = np.ones(batch.num_systems)
    temps[:len(systems)] = [s[2] for s in systems]
    v = thermo.maxwell_boltzmann(batch, temps, jax.random.key(11))
    return batch.replace(velocities=v), jnp.asarray(temps)


def _init(dyn, batch, seed=4):
    state = dyn.init(batch, jax.random.key(seed), neighbor_spec=SPEC)
    assert not bool(state.neighbors.overflow)
    return state


@pytest.mark.parametrize("kind", ["langevin", "nose_hoover"])
def test_batch_invariance(x64, kind):
    """Each system's trajectory in a mixed batch (108 + 32 atoms, 70 K and 40 K, an
    empty slot) equals its trajectory run alone, in another slot, with the same sample id."""
    systems = _systems()
    mixed, temps = _batch(systems)
    dyn = _make(kind, temps)
    state, _ = record_run(dyn, mixed, _init(dyn, mixed), 30, 1, energy)
    for slot, (system, idx) in enumerate(zip(systems, mixed.system_slices())):
        alone, t_alone = _batch([system])
        dyn1 = _make(kind, t_alone)
        s1, _ = record_run(dyn1, alone, _init(dyn1, alone), 30, 1, energy)
        n = len(idx)
        np.testing.assert_allclose(np.asarray(state.positions)[idx], np.asarray(s1.positions)[:n],
                                   rtol=0, atol=1e-10)
        np.testing.assert_allclose(np.asarray(state.velocities)[idx],
                                   np.asarray(s1.velocities)[:n], rtol=0, atol=1e-12)
        for name, value in state.stage.system.items():
            np.testing.assert_allclose(np.asarray(value)[slot], np.asarray(s1.stage.system[name])[0],
                                       rtol=1e-12, atol=1e-14, err_msg=name)
        assert float(state.energy[slot]) == pytest.approx(float(s1.energy[0]), abs=1e-10)
        assert int(state.step[slot]) == int(s1.step[0]) == 30
    assert np.max(np.abs(np.asarray(state.positions - mixed.positions))) > 1e-3
    if kind == "langevin":
        # ... and the noise is the system's own: another sample id gives another path.
        other, _ = _batch([systems[1][:3] + (6,)])
        s2, _ = record_run(dyn1, other, _init(dyn1, other), 30, 1, energy)
        assert np.max(np.abs(np.asarray(s2.positions - s1.positions))) > 1e-4


def _assert_same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        if jnp.issubdtype(x.dtype, jnp.floating):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-12, atol=1e-14)
        elif not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("kind", ["langevin", "nose_hoover"])
def test_jit_equals_eager_and_treedef(x64, kind):
    """One compiled step equals one eager step; init and step return the same pytree
    type; a changed temperature in the stage state is data (no recompilation)."""
    batch, temps = _batch(_systems())
    dyn = _make(kind, temps)
    state = _init(dyn, batch, seed=2)
    jitted, _ = _run_chunk(dyn, state, batch, 1, energy)
    eager = dyn.step(state, batch)
    assert jax.tree.structure(jitted) == jax.tree.structure(state) == jax.tree.structure(eager)
    _assert_same(jitted, eager)
    assert np.max(np.abs(np.asarray(jitted.positions - state.positions))) > 0
    compiled = _run_chunk._cache_size()
    system = jitted.stage.system
    hotter = jitted.replace(stage=jitted.stage.replace(
        system={**system, "temperature": 2 * system["temperature"]}))
    _run_chunk(dyn, hotter, batch, 1, energy)
    _run_chunk(_make(kind, 3 * temps), state, batch, 1, energy)    # new numbers, same program
    assert _run_chunk._cache_size() == compiled


@pytest.mark.parametrize("cls, kwargs, name", [
    (NVTLangevin, dict(dt=0.0, temperature=300.0), "dt"),
    (NVTLangevin, dict(dt=-1.0, temperature=300.0), "dt"),
    (NVTLangevin, dict(dt=1.0, temperature=-1.0), "temperature"),
    (NVTLangevin, dict(dt=1.0, temperature=[300.0, float("nan")]), "temperature"),
    (NVTLangevin, dict(dt=1.0, temperature=300.0, friction=-0.1), "friction"),
    (NVTNoseHoover, dict(dt=0.0, temperature=300.0), "dt"),
    (NVTNoseHoover, dict(dt=1.0, temperature=0.0), "temperature"),
    (NVTNoseHoover, dict(dt=1.0, temperature=300.0, tau=-5.0), "tau"),
    (NVTNoseHoover, dict(dt=1.0, temperature=300.0, chain_length=0), "chain_length"),
    (NVTNoseHoover, dict(dt=1.0, temperature=300.0, chain_length=2.5), "chain_length"),
    (NVTNoseHoover, dict(dt=1.0, temperature=300.0, yoshida_order=4), "yoshida_order"),
    (NVTNoseHoover, dict(dt=1.0, temperature=300.0, n_chain_steps=0), "n_chain_steps"),
])
def test_bad_parameters_raise(cls, kwargs, name):
    with pytest.raises(ValueError, match=name):
        cls(model=LJ, **kwargs)


def test_langevin_limits(x64):
    """friction = 0 is velocity Verlet (NVE); temperature = 0 only removes energy;
    the stage holds the per-system parameters; Langevin does not conserve momentum."""
    batch, temps = _batch(_systems())
    nve = NVE(model=LJ, dt=DT, skin=SKIN)
    frictionless = _make("langevin", temps, )
    frictionless = frictionless.replace(friction=0.0)
    a, _ = record_run(nve, batch, _init(nve, batch), 10, 1, energy)
    b, _ = record_run(frictionless, batch, _init(frictionless, batch), 10, 1, energy)
    np.testing.assert_allclose(np.asarray(a.positions), np.asarray(b.positions), rtol=0, atol=1e-12)

    cold = _make("langevin", 0.0 * temps)
    state = _init(cold, batch)
    e0 = np.asarray(kinetic(cold, state, batch) + state.energy)[:2]
    state, _ = record_run(cold, batch, state, 20, 1, energy)
    assert np.all(np.asarray(kinetic(cold, state, batch) + state.energy)[:2] < e0 - 1e-3)
    assert set(state.stage.system) == {"dt", "temperature", "friction"}
    assert all(v.shape == (batch.num_systems,) for v in state.stage.system.values())
    assert not NVTLangevin.conserves_momentum and NVTNoseHoover.conserves_momentum
