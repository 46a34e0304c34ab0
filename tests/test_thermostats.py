"""NVT thermostats (Langevin BAOAB, Nosé–Hoover chain) against independent references.

* Canonical sampling (64 independent 32-atom argon crystals in one batch): the time-
  and ensemble-averaged kinetic temperature equals the target, and each system's
  kinetic energy follows the canonical Gamma distribution (shape dof/2, scale kT) by a
  Kolmogorov–Smirnov test on samples spaced further apart than their correlation
  time. Langevin's random force does not conserve momentum (dof = 3N); Nosé–Hoover
  keeps zero total momentum (dof = 3N − 3).
* Nosé–Hoover: the extended energy is conserved; the chain integrator converges to a
  high-accuracy ODE solution (scipy) with the order its Suzuki–Yoshida weights promise;
  chain_length, yoshida_order and n_chain_steps change the dynamics.
* Langevin: one step against the closed forms of velocity Verlet (friction 0) and of
  the damped BAOAB step (temperature 0).
* Engine contract: batch invariance (mixed sizes and temperatures == each system
  alone), jit == eager, init/step share a treedef, new numbers never recompile, bad
  parameters raise ValueError naming the parameter.

Compilation dominates on a small CPU box, so the contract tests share one float64
layout (capacity and neighbor spec) and one compiled step per thermostat. The default
run is short; ``--runslow`` runs the acceptance lengths (10⁴ steps).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, stats

from nvalchemi_jax import Batch, Capacity, neighbors, units
from nvalchemi_jax.datasets import fcc_crystal
from nvalchemi_jax.dynamics import thermo
from nvalchemi_jax.dynamics.integrators.langevin import NVTLangevin
from nvalchemi_jax.dynamics.integrators.nose_hoover import (NVTNoseHoover, chain_half_step,
                                                           chain_masses, nose_hoover_energy,
                                                           yoshida_weights)
from nvalchemi_jax.models import LennardJones

# Argon; the C¹ switch makes forces continuous, which energy conservation needs.
LJ = LennardJones(sigma=3.40, epsilon=0.0104, cutoff=8.5, switch_on=7.5)
# Atoms of these crystals rarely move 0.75 Å from their sites: with this skin the
# neighbor list is seldom rebuilt, which keeps the tests fast.
SKIN = 1.5
T_TARGET = 50.0         # K, well below the melting point of LJ argon (~84 K)
DT = 5.0                # fs


# --------------------------------------------------------------------------- helpers
@partial(jax.jit, static_argnames=("length", "record"))
def _run_chunk(dyn, state, batch, length, record):
    def body(state, _):
        state = dyn.step(state, batch)
        return state, record(dyn, state, batch)
    return jax.lax.scan(body, state, None, length=length)


def record_run(dyn, batch, state, n_chunks, chunk, record):
    """Run ``n_chunks * chunk`` steps; return the final state and ``record(dyn, state,
    batch)`` after every step, stacked ``(steps, ...)`` on the host. ``dyn`` is an
    argument of the compiled chunk, so dynamics that differ only in numbers share it."""
    out = []
    for _ in range(n_chunks):
        state, rec = _run_chunk(dyn, state, batch, chunk, record)
        out.append(jax.device_get(rec))
    return state, jax.tree.map(lambda *xs: np.concatenate(xs), *out)


def kinetic(dyn, state, batch):
    return thermo.kinetic_energy(state.velocities, batch)


def observe(dyn, state, batch):
    """Per step: potential and kinetic energy (eV) and the thermostat's variables."""
    return state.energy, thermo.kinetic_energy(state.velocities, batch), state.stage.system


def lag_autocorrelation(series):
    """Lag-1 autocorrelation of ``series (T, S)`` of identically distributed systems
    (deviations from the ensemble mean, pooled over systems)."""
    x = series - series.mean()
    return float(np.sum(x[1:] * x[:-1]) / np.sum(x * x))


# --------------------------------------------------------------------------- canonical sampling
def argon_batch(n_systems, repeats=(2, 2, 2)):
    """``n_systems`` perfect FCC argon crystals (a known-good geometry: the close-atom
    check, which costs a compilation, is skipped)."""
    positions, cell = fcc_crystal(repeats)
    return Batch.from_arrays(positions=[positions] * n_systems,
                             atomic_numbers=[np.full(len(positions), 18)] * n_systems,
                             cell=[cell] * n_systems, pbc=[[True] * 3] * n_systems,
                             min_distance=None)


# name: (dynamics, remove_com for the dof, equilibration steps, sample stride, samples per
# system in the default run). Strides: the kinetic-energy autocorrelation (measured with
# 32 systems over 2,000 steps) is 0.09 at 10 steps and 0.006 at 20 for Langevin
# (γ = 0.02/fs); Nosé–Hoover (τ = 50 fs) oscillates with a ~200 fs period and an
# envelope that falls to 0.11 at 80 steps and 0.02 at 120.
CANONICAL = {
    "langevin": (NVTLangevin(model=LJ, dt=DT, temperature=T_TARGET, friction=0.02, skin=SKIN),
                 False, 100, 20, 10),
    "nose_hoover": (NVTNoseHoover(model=LJ, dt=DT, temperature=T_TARGET, tau=50.0, skin=SKIN),
                    True, 160, 80, 5),
}


@pytest.fixture(scope="module")
def canonical_start():
    """64 crystals with Maxwell–Boltzmann velocities at 2T from the perfect lattice (a
    nearly harmonic crystal gives half its kinetic energy to the potential and starts
    near T), initialised once: the Nosé–Hoover run takes the same start with its own
    stage variables (what ``init`` would give; saves a compilation)."""
    batch = argon_batch(64)
    batch = batch.replace(velocities=thermo.maxwell_boltzmann(batch, 2 * T_TARGET,
                                                              jax.random.key(1)))
    return batch, CANONICAL["langevin"][0].init(batch, jax.random.key(7))


@pytest.mark.parametrize("name", list(CANONICAL))
@pytest.mark.parametrize("long", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_canonical_kinetic_energy(canonical_start, name, long):
    """64 independent 32-atom argon crystals: mean T within 2 % of the target and
    per-system KE ~ Gamma(dof/2, kT) (KS test, p > 0.01) on time-decorrelated samples."""
    dyn, remove_com, n_equilibrate, stride, n_samples = CANONICAL[name]
    if long:                                                   # 10^4 steps
        n_samples = 10_000 // stride
    batch, state = canonical_start
    state = state.replace(stage=dyn.init_stage(state, batch))
    n_steps = n_equilibrate + n_samples * stride
    state, ke = record_run(dyn, batch, state, n_steps // stride, stride, kinetic)
    ke = ke[n_equilibrate:]                                    # (steps, 64) eV
    dof = float(thermo.degrees_of_freedom(batch, remove_com=remove_com)[0])
    kt = units.KB * T_TARGET

    mean_t = 2.0 * ke.mean() / (dof * units.KB)
    # One system's T fluctuates by sqrt(2/dof) = 14 %; over 64 systems and several
    # correlation times the standard error is ~0.5 %, so 2 % is a real test (and far
    # above BAOAB's / velocity Verlet's O(dt²) kinetic bias, ~0.1 % at 5 fs here).
    assert abs(mean_t / T_TARGET - 1) < 0.02, mean_t

    samples = ke[stride - 1::stride]                           # (n_samples, 64)
    # Samples one stride apart must be nearly independent for the KS test to hold.
    rho = lag_autocorrelation(samples)
    assert abs(rho) < 0.25, rho
    p = stats.kstest(samples.ravel(), "gamma", args=(dof / 2, 0.0, kt)).pvalue
    assert p > 0.01, (p, mean_t)
    # The test has power: the same samples reject a temperature 6 % off.
    wrong = stats.kstest(samples.ravel(), "gamma", args=(dof / 2, 0.0, 1.06 * kt)).pvalue
    assert wrong < 0.01, wrong
    print(f"\n{name}: mean T = {mean_t:.3f} K over {len(ke)} steps x 64 systems; KS p = {p:.3f} "
          f"({samples.size} samples, lag-{stride} autocorrelation {rho:+.3f}; "
          f"T x 1.06 gives p = {wrong:.1e}); list rebuilds {int(state.neighbors.rebuilds.sum())}")


# --------------------------------------------------------------------------- shared layout
# A rattled 108-atom crystal at 70 K (sample 9), a rattled 32-atom one at 40 K
# (sample 5) and an empty slot, in float64.
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
    return [(large + rng.normal(0, 0.05, large.shape), large_cell, 70.0, 9),
            (small + rng.normal(0, 0.05, small.shape), small_cell, 40.0, 5)]


def _batch(systems):
    """The systems in the shared layout with Maxwell–Boltzmann velocities at their own
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


@partial(jax.jit, static_argnames=("spec",))
def _jit_init(dyn, batch, key, spec):
    return dyn.init(batch, key, neighbor_spec=spec)


def _init(dyn, batch, seed=4):
    """``dyn.init`` under jit (one compilation per thermostat for the shared layout)."""
    state = _jit_init(dyn, batch, jax.random.key(seed), SPEC)
    assert not bool(state.neighbors.overflow)
    return state


# --------------------------------------------------------------------------- Nosé–Hoover
def _extended_energy_numpy(potential, kinetic_energy, eta, p_eta, dof, kt, tau):
    """H = K + U + Σ p_k²/(2 Q_k) + dof kT η₁ + kT Σ_{k≥2} η_k with Q₁ = dof kT τ²,
    Q_k = kT τ², written out independently of the module."""
    q = np.ones(p_eta.shape[-1]) * (kt * tau**2)[..., None]
    q[..., 0] *= dof
    return (kinetic_energy + potential + np.sum(p_eta**2 / (2 * q), axis=-1)
            + dof * kt * eta[..., 0] + kt * np.sum(eta[..., 1:], axis=-1))


@pytest.mark.parametrize("n_chunks, chunk", [(400, 1), pytest.param(50, 200, marks=pytest.mark.slow)])
def test_nose_hoover_conserves_extended_energy(x64, n_chunks, chunk):
    """float64, dt = 2 fs: the extended energy stays within 1e-4 of itself while the
    thermostat moves far more energy than that in and out of the particles. (At 5 fs,
    velocity Verlet alone fluctuates by ~1e-4 on these crystals.)"""
    batch, temps = _batch(_systems())
    dyn = _make("nose_hoover", temps).replace(dt=2.0)
    state = _init(dyn, batch)
    final, (potential, kin, stage) = record_run(dyn, batch, state, n_chunks, chunk, observe)
    dof = np.asarray(thermo.degrees_of_freedom(batch), float)
    kt = units.KB * np.asarray(temps)
    tau = np.asarray(state.stage.system["tau"])
    h0 = _extended_energy_numpy(np.asarray(state.energy), np.asarray(kinetic(dyn, state, batch)),
                                np.asarray(state.stage.system["eta"]),
                                np.asarray(state.stage.system["p_eta"]), dof, kt, tau)
    h = _extended_energy_numpy(potential, kin, stage["eta"], stage["p_eta"], dof, kt, tau)
    # The public function agrees with the written-out formula.
    np.testing.assert_allclose(np.asarray(nose_hoover_energy(final, batch, dyn)), h[-1], rtol=1e-12)
    filled = slice(0, 2)
    deviation = np.max(np.abs(h - h0), axis=0)[filled]
    relative = deviation / np.abs(h0[filled])
    assert np.all(relative < 1e-4), relative
    exchanged = np.ptp((h - kin - potential)[:, filled], axis=0)
    assert np.all(exchanged > 100 * deviation), (exchanged, deviation)
    per_ke = deviation / (0.5 * dof * kt)[filled]
    print(f"\nNH extended energy over {n_chunks * chunk} steps of 2 fs: max |H - H0|/|H0| = "
          f"{relative.max():.2e} ({deviation.max():.2e} eV = {per_ke.max():.1e} of the mean "
          f"kinetic energy); energy moved through the chain >= {exchanged.min():.3f} eV")


def _chain_reference(kinetic0, p0, masses, kt, dof, duration):
    """The exact flow of the chain and the friction on the particles (no forces), by
    scipy's DOP853 at tight tolerance: an independent reference for the splitting."""
    m = len(p0)

    def rhs(_, y):
        ke, p = y[0], y[m + 1:]
        g = np.empty(m)
        g[0] = 2 * ke - dof * kt
        g[1:] = p[:-1] ** 2 / masses[:-1] - kt
        friction = np.append(p[1:] / masses[1:], 0.0)
        return np.concatenate([[-2 * p[0] / masses[0] * ke], p / masses, g - p * friction])

    y0 = np.concatenate([[kinetic0], np.zeros(m), p0])
    y = integrate.solve_ivp(rhs, (0, duration), y0, method="DOP853", rtol=1e-13, atol=1e-16).y[:, -1]
    return np.concatenate([[np.sqrt(y[0] / kinetic0)], y[1:]])   # velocity scale, η, p


@pytest.mark.parametrize("chain_length", [1, 2, 4])
def test_chain_step_converges_with_yoshida_order(x64, chain_length):
    """The chain step converges to the exact thermostat flow at the order of its
    Suzuki–Yoshida weights: 2 (1 weight), 4 (3 and 5), 6 (7)."""
    dof, kt, tau, duration = 93.0, units.KB * 50.0, 50.0, 10.0
    masses = np.asarray(chain_masses(jnp.array([dof]), jnp.array([kt]), jnp.array([tau]),
                                     chain_length))[0]
    kinetic0 = 1.6 * 0.5 * dof * kt                           # hot: the chain works hard
    p0 = 0.3 * np.sqrt(masses * kt) * (-1.0) ** np.arange(chain_length)
    exact = _chain_reference(kinetic0, p0, masses, kt, dof, duration)
    norm = np.concatenate([[1.0], np.ones(chain_length), np.sqrt(masses * kt)])

    def error(order, n_chain_steps):
        scale, eta, p = chain_half_step(
            jnp.array([kinetic0]), jnp.zeros((1, chain_length)), jnp.array([p0]),
            jnp.array([masses]), jnp.array([kt]), jnp.array([dof]), jnp.array([duration]),
            yoshida_weights(order), n_chain_steps)
        got = np.concatenate([np.asarray(scale), np.asarray(eta)[0], np.asarray(p)[0]])
        return np.max(np.abs(got - exact) / norm)

    e = {(order, n): error(order, n) for order in (1, 3, 5, 7) for n in (1, 2, 4)}
    assert e[1, 1] > 5 * e[3, 1] > 0 and e[3, 1] > 3 * e[5, 1] and e[5, 1] > 3 * e[7, 1], e
    # Halving the sub-step divides the error by 2^order.
    assert 3.5 < e[1, 1] / e[1, 2] < 4.5 and 3.5 < e[1, 2] / e[1, 4] < 4.5, e     # 2nd order
    assert 13 < e[3, 2] / e[3, 4] < 19 and 13 < e[5, 2] / e[5, 4] < 19, e         # 4th order
    assert 45 < e[7, 2] / e[7, 4] < 80 and e[7, 4] < 1e-7, e                    # 6th order


def test_nose_hoover_static_options_change_the_dynamics(x64):
    """chain_length, yoshida_order and n_chain_steps reach the integrator: from one
    state with a moving chain, one step's thermostatted half differs for every option."""
    batch, temps = _batch(_systems())
    state0 = _init(_make("nose_hoover", temps), batch)
    final = {}
    for options in [dict(), dict(chain_length=1), dict(chain_length=5), dict(yoshida_order=1),
                    dict(yoshida_order=5), dict(yoshida_order=7), dict(n_chain_steps=3)]:
        dyn = _make("nose_hoover", temps, **options)
        stage = dyn.init_stage(state0, batch)
        m = dyn.chain_length
        assert stage.system["eta"].shape == stage.system["p_eta"].shape == (3, m)
        # The same moving chain for every option (as far as its length allows).
        p_eta = jnp.tile(jnp.asarray([0.05, -0.02, 0.01, 0.0, 0.0][:m]), (3, 1))
        state = state0.replace(stage=stage.replace(system={**stage.system, "p_eta": p_eta}))
        after = dyn.post_update(state, batch)
        final[tuple(options.items())] = np.concatenate(
            [np.asarray(after.velocities).ravel(), np.asarray(after.stage.system["p_eta"])[:, 0]])
    keys = list(final)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            assert np.max(np.abs(final[a] - final[b])) > 1e-12, (a, b)


# --------------------------------------------------------------------------- Langevin
def test_langevin_one_step_closed_forms(x64):
    """friction = 0: one step is velocity Verlet, r₁ = r₀ + dt v₀ + ½ dt² a₀,
    v₁ = v₀ + ½ dt (a₀ + a₁). temperature = 0: the O step is the exact decay
    v -> exp(−γ dt) v between the half kicks and half drifts."""
    batch, temps = _batch(_systems())
    filled = np.asarray(batch.atom_mask)
    for friction, temperature in [(0.0, temps), (0.05, 0.0 * temps)]:
        dyn = _make("langevin", temperature).replace(friction=friction)
        state = _init(dyn, batch)
        new, _ = record_run(dyn, batch, state, 1, 1, observe)
        dt = DT
        to_acc = units.FORCE_TO_ACCELERATION / np.asarray(batch.masses)[:, None]
        a0, a1 = np.asarray(state.forces) * to_acc, np.asarray(new.forces) * to_acc
        v_half = np.asarray(state.velocities) + 0.5 * dt * a0
        c1 = np.exp(-friction * dt)
        r1 = np.asarray(state.positions) + 0.5 * dt * v_half * (1 + c1)
        v1 = c1 * v_half + 0.5 * dt * a1
        np.testing.assert_allclose(np.asarray(new.positions)[filled], r1[filled], rtol=0, atol=1e-12)
        np.testing.assert_allclose(np.asarray(new.velocities)[filled], v1[filled], rtol=0, atol=1e-14)
        assert set(new.stage.system) == {"dt", "temperature", "friction"}
        assert all(v.shape == (batch.num_systems,) for v in new.stage.system.values())
    assert not NVTLangevin.conserves_momentum and NVTNoseHoover.conserves_momentum


# --------------------------------------------------------------------------- engine contract
@pytest.mark.parametrize("kind", ["langevin", "nose_hoover"])
def test_batch_invariance(x64, kind):
    """Each system's trajectory in a mixed batch (108 + 32 atoms, 70 K and 40 K, an
    empty slot) equals its trajectory run alone, in another slot, with the same sample id."""
    systems = _systems()
    mixed, temps = _batch(systems)
    dyn = _make(kind, temps)
    state, _ = record_run(dyn, mixed, _init(dyn, mixed), 30, 1, observe)
    assert np.max(np.abs(np.asarray(state.positions - mixed.positions))) > 1e-3
    for slot, (system, idx) in enumerate(zip(systems, mixed.system_slices())):
        alone, t_alone = _batch([system])
        dyn1 = _make(kind, t_alone)
        s1, _ = record_run(dyn1, alone, _init(dyn1, alone), 30, 1, observe)
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
    if kind == "langevin":
        # ... and the noise is the system's own: another sample id gives another path.
        other, _ = _batch([systems[1][:3] + (6,)])
        s2, _ = record_run(dyn1, other, _init(dyn1, other), 30, 1, observe)
        assert np.max(np.abs(np.asarray(s2.positions - s1.positions))) > 1e-4


def _assert_same(a, b, rtol=1e-12, atol=1e-14):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            continue
        if jnp.issubdtype(x.dtype, jnp.floating):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)
        else:
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("kind", ["langevin", "nose_hoover"])
def test_jit_equals_eager_and_treedef(x64, kind):
    """The integrator's halves of a step give the same state eagerly and under jit;
    init and step return the same pytree type; new numbers (a temperature in the stage,
    a new dynamics object with other values) reuse the compiled step."""
    batch, temps = _batch(_systems())
    dyn = _make(kind, temps)
    state = _init(dyn, batch, seed=2)
    stepped, _ = _run_chunk(dyn, state, batch, 1, observe)
    assert jax.tree.structure(stepped) == jax.tree.structure(state)
    _assert_same(dyn.pre_update(state, batch), jax.jit(dyn.pre_update)(state, batch))
    _assert_same(dyn.post_update(stepped, batch), jax.jit(dyn.post_update)(stepped, batch))
    compiled = _run_chunk._cache_size()
    system = stepped.stage.system
    hotter = stepped.replace(stage=stepped.stage.replace(
        system={**system, "temperature": 2 * system["temperature"]}))
    _run_chunk(dyn, hotter, batch, 1, observe)
    _run_chunk(_make(kind, 3 * temps).replace(dt=1.0), state, batch, 1, observe)
    assert _run_chunk._cache_size() == compiled


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["langevin", "nose_hoover"])
def test_full_step_jit_equals_eager(x64, kind):
    """A whole eager ``Dynamics.step`` (slow on CPU: the engine re-traces its
    neighbor-update branch on every eager call) equals the compiled one."""
    batch, temps = _batch(_systems())
    dyn = _make(kind, temps)
    state = _init(dyn, batch, seed=2)
    _assert_same(dyn.step(state, batch), jax.jit(dyn.step)(state, batch), rtol=1e-11, atol=1e-13)


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
