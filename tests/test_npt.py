"""NPT (MTK barostat + Nosé–Hoover chains) and NPH on argon crystals.

References are independent of the integrator: the static E(V) of the perfect
crystal from ASE's Lennard-Jones calculator, its classical quasi-harmonic
thermal expansion from ASE finite-difference Hessians, the exact NPT volume
distribution of an ideal gas, the ensemble identity <P_inst> = P_applied (with
block-average error bars), conservation of the extended energy (and the dt²
scaling of its error), and geometry (cell angles, axis ratios).

Compilation dominates the cost on a CPU, so the crystal runs all use batches of
one capacity (2 systems, 64 atoms), one neighbor-list spec, one compiled init
and one recording scan (``_chunk``, with the dynamics as an argument): each
coupling (and NPH) compiles once. The ideal gas has a small capacity of its own.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nvalchemi_jax as nj
from nvalchemi_jax import neighbors, units
from nvalchemi_jax.datasets import fcc_crystal
from nvalchemi_jax.dynamics import kinetic_energy, maxwell_boltzmann, status
from nvalchemi_jax.dynamics.integrators.npt import NPH, NPT, npt_conserved_energy
from nvalchemi_jax.models import LennardJones, volume

SIGMA, EPSILON, CUTOFF, SWITCH_ON = 3.40, 0.0104, 8.5, 7.5
LJ = LennardJones(sigma=SIGMA, epsilon=EPSILON, cutoff=CUTOFF, switch_on=SWITCH_ON)
IDEAL_GAS = LennardJones(sigma=SIGMA, epsilon=0.0, cutoff=CUTOFF, switch_on=SWITCH_ON)   # no forces
CAPACITY = nj.Capacity(num_systems=2, num_atoms=64, max_neighbors=104)   # 86 needed at 0.5 GPa
CHUNK = 100                      # steps per compiled scan
DT = 5.0                         # fs
TAU_T = 250.0                    # fs
# With W = (N_f + 3) kT τ_p², τ_p = 5 ps gives a cold argon crystal (10–20 K, 32 atoms)
# a volume period of about 0.7 ps, close to its phonon periods.
TAU_P = 5000.0                   # fs
KB = units.KB
T_COLD, T_WARM = 10.0, 20.0
P_HIGH = units.gpa_to_stress(0.5)


# --------------------------------------------------------------------------- structures
def cubic(a, strain=None):
    """2×2×2 cubic FCC argon (32 atoms), optionally deformed by ``1 + strain``."""
    positions, cell = fcc_crystal((2, 2, 2), a)
    if strain is not None:
        deform = np.eye(3) + np.asarray(strain)
        positions, cell = positions @ deform, cell @ deform
    return positions, cell


def primitive(a):
    """3×3×3 primitive FCC cells (27 atoms): a triclinic cell with 60° angles."""
    cell = 0.5 * a * (np.ones((3, 3)) - np.eye(3))
    frac = np.array(np.meshgrid(*[np.arange(3)] * 3, indexing="ij")).reshape(3, -1).T
    return frac @ cell, 3 * cell


def make_batch(structures, temperatures=None, key=0, capacity=CAPACITY):
    """A batch at ``capacity``; velocities from Maxwell–Boltzmann at ``temperatures`` (K)."""
    batch = nj.Batch.from_arrays(
        positions=[p for p, _ in structures], cell=[c for _, c in structures],
        atomic_numbers=[np.full(len(p), 18) for p, _ in structures],
        pbc=[True] * len(structures), capacity=capacity, min_distance=None)   # perfect crystals
    if temperatures is not None:
        t = np.zeros(capacity.num_systems)
        t[:len(temperatures)] = temperatures
        batch = batch.replace(velocities=_maxwell_boltzmann(batch, jnp.asarray(t), jax.random.key(key)))
    return batch


_maxwell_boltzmann = jax.jit(maxwell_boltzmann)


def per_slot(*values):
    """A per-system parameter over CAPACITY's slots (unused slots repeat the last value)."""
    values = list(values) + [values[-1]] * (CAPACITY.num_systems - len(values))
    return jnp.asarray(values)


def npt(coupling, cls=None, dt=DT, temperature=T_COLD, pressure=0.0, tau_t=TAU_T, tau_p=TAU_P,
        model=LJ):
    """An NPT (or NPH) whose numbers are all per-slot arrays, so that every dynamics of
    one class and coupling shares one compiled scan (scalars would change the avals)."""
    slots = lambda v: per_slot(*v) if isinstance(v, (tuple, list)) else per_slot(v)
    if cls is NPH:
        return NPH(model=model, dt=slots(dt), pressure=slots(pressure), tau_p=slots(tau_p),
                   coupling=coupling)
    return NPT(model=model, dt=slots(dt), temperature=slots(temperature), pressure=slots(pressure),
               tau_t=slots(tau_t), tau_p=slots(tau_p), coupling=coupling)


# --------------------------------------------------------------------------- running
@functools.cache
def neighbor_spec():
    """One spec for every batch here: sized on the densest structure used (0.5 GPa)."""
    with jax.enable_x64(True):
        batch = make_batch([cubic(5.10), primitive(5.10)])
        spec, _ = neighbors.allocate(batch, cutoff=CUTOFF, skin=0.5)
    return spec


@functools.partial(jax.jit, static_argnames="spec")
def _init(dyn, batch, key, spec):
    return dyn.init(batch, key, neighbor_spec=spec)


def start(dyn, batch, key=0, spec=None):
    """Initial state. Forces and stress do not depend on the coupling, so one compiled
    init (of an isotropic NPT) serves every dynamics; ``dyn`` then sets its own variables."""
    dyn.check(batch)
    spec = spec or neighbor_spec()
    reference = NPT(model=dyn.model)
    state = _init(reference, batch, jax.random.key(key), spec)
    return state.replace(stage=dyn.init_stage(state, batch))


@jax.jit
def _chunk(dyn, state, batch, limit):
    """CHUNK steps (those at index >= limit are skipped), recording per-system observables."""
    def body(state, i):
        state = jax.lax.cond(i < limit, lambda s: dyn.step(s, batch), lambda s: s, state)
        record = dict(conserved=npt_conserved_energy(state, batch, dyn), energy=state.energy,
                      volume=volume(state.cell), kinetic=kinetic_energy(state.velocities, batch),
                      stress_trace=jnp.trace(state.stress, axis1=-2, axis2=-1), cell=state.cell)
        return state, record
    return jax.lax.scan(body, state, jnp.arange(CHUNK))


def simulate(dyn, batch, n_steps, state=None, spec=None):
    """Run ``n_steps`` (a multiple of CHUNK); returns the final state and numpy records (T, S, ...)."""
    assert n_steps % CHUNK == 0
    state = start(dyn, batch, spec=spec) if state is None else state
    records = []
    for _ in range(n_steps // CHUNK):
        state, rec = _chunk(dyn, state, batch, CHUNK)
        records.append(jax.tree.map(np.asarray, rec))
    assert not bool(state.neighbors.overflow)
    assert not np.any(np.asarray(state.status) == status.FAILED)
    return state, {k: np.concatenate([r[k] for r in records]) for k in records[0]}


def instantaneous_pressure(rec):
    """(T, S) eV/Å³: kinetic + virial, P = 2K/(3V) − tr(σ)/3 (σ tensile positive)."""
    return 2.0 * rec["kinetic"] / (3.0 * rec["volume"]) - rec["stress_trace"] / 3.0


def block_mean(x, n_blocks=10):
    """Mean of a time series and its standard error from ``n_blocks`` block averages."""
    x = np.asarray(x)[: len(x) // n_blocks * n_blocks]
    blocks = x.reshape(n_blocks, -1).mean(axis=1)
    return blocks.mean(), blocks.std(ddof=1) / np.sqrt(n_blocks)


def conservation(rec, system, skip=0.2):
    """Of the conserved series of ``system``, after the first ``skip`` of it (the
    integrator's shadow Hamiltonian differs from H by O(dt²) terms that depend on the
    state, so the far-from-equilibrium start sits at an offset): its peak-to-peak
    fluctuation and its drift (last tenth's mean minus first tenth's), both relative to
    the potential energy |U| (the cohesive energy; |H| itself can be small, as P V
    cancels much of U under pressure)."""
    start = int(skip * len(rec["conserved"]))
    h = rec["conserved"][start:, system]
    scale = np.abs(rec["energy"][start:, system]).mean()
    tenth = max(1, len(h) // 10)
    return np.ptp(h) / scale, abs(h[-tenth:].mean() - h[:tenth].mean()) / scale


# --------------------------------------------------------------------------- references (ASE)
def _ase_crystal(a, cutoff=CUTOFF, switch_on=SWITCH_ON):
    from ase.build import bulk
    from ase.calculators.lj import LennardJones as AseLJ
    atoms = bulk("Ar", "fcc", a=a, cubic=True) * (2, 2, 2)
    atoms.calc = AseLJ(sigma=SIGMA, epsilon=EPSILON, rc=cutoff, ro=switch_on, smooth=True)
    return atoms


def _ase_log_det_hessian(a, cutoff=CUTOFF, switch_on=SWITCH_ON, h=1e-3):
    """Σ ln λ over the non-zero eigenvalues of the 32-atom crystal's Hessian (central differences)."""
    atoms = _ase_crystal(a, cutoff, switch_on)
    x0 = atoms.get_positions()
    hess = np.zeros((x0.size, x0.size))
    for k in range(x0.size):
        for sign in (1.0, -1.0):
            x = x0.copy()
            x.flat[k] += sign * h
            atoms.set_positions(x)
            hess[k] -= sign * atoms.get_forces().ravel() / (2 * h)
    lam = np.linalg.eigvalsh(0.5 * (hess + hess.T))
    assert np.all(lam[3:] > 1e-3) and np.all(np.abs(lam[:3]) < 1e-6)     # 3 translations
    return float(np.sum(np.log(lam[3:])))


@functools.cache
def reference_eos(cutoff=CUTOFF, switch_on=SWITCH_ON, a_range=(4.95, 5.295)):
    """Static E(V) of the perfect 32-atom crystal (ASE), its minimum V0, and the classical
    quasi-harmonic free energy F(V, T) = E(V) + ½ kT Σ ln λ(V).

    ``volume_at(T, P)`` minimises F + P V. ``slope`` is the exact O(T) coefficient of
    the NPT mean volume at P = 0: d<V>/dT = −k/2 [L' / E2 + E3 / E2²] with L = Σ ln λ,
    E2 and E3 the second and third derivatives of E(V) (the second term: p(V) ∝
    exp(−F/kT) is skewed, so its mean is not its mode).

    The C¹ switch makes E2 and the Hessian jump where a neighbor shell crosses
    ``switch_on`` or ``cutoff`` (for 8.5/7.5 Å: shell 6 leaves at a = 4.907 Å, shell 4
    enters the switch at a = 5.303 Å), so everything is fitted inside ``a_range``."""
    a_grid = np.linspace(*a_range, 70)
    v_grid = 8 * a_grid**3
    e_grid = np.array([_ase_crystal(a, cutoff, switch_on).get_potential_energy() for a in a_grid])
    energy = np.polynomial.Polynomial.fit(v_grid, e_grid, 7)
    assert np.max(np.abs(energy(v_grid) - e_grid)) < 1e-7          # the fit is exact enough
    v_fine = np.linspace(v_grid[0], v_grid[-1], 200_001)
    v0 = v_fine[np.argmin(energy(v_fine))]
    a_hess = np.linspace(max(a_range[0], 5.16), a_range[1], 4)
    log_det = np.polynomial.Polynomial.fit(
        8 * a_hess**3, [_ase_log_det_hessian(a, cutoff, switch_on) for a in a_hess], 2)

    def volume_at(temperature, pressure=0.0):
        v = v_fine[v_fine > 8 * a_hess[0] ** 3] if temperature > 0 else v_fine
        g = energy(v) + pressure * v + 0.5 * KB * temperature * log_det(v)
        assert v[1] < v[np.argmin(g)] < v[-2], "minimum outside the fitted range"
        return v[np.argmin(g)]

    e2, e3 = energy.deriv(2)(v0), energy.deriv(3)(v0)
    slope = -0.5 * KB * (log_det.deriv(1)(v0) / e2 + e3 / e2**2)
    return dict(v0=v0, energy=energy, volume_at=volume_at, slope=slope)


def lattice_for(v):
    return (v / 8) ** (1 / 3)


# --------------------------------------------------------------------------- the runs


def isotropic_run(n_steps):
    """System 0: T = 10 K, P = 0, started at the quasi-harmonic volume; system 1: 20 K,
    0.5 GPa, started at the static volume for 0.5 GPa. Both NPT, isotropic."""
    ref = reference_eos()
    a_cold = lattice_for(ref["volume_at"](T_COLD))
    a_high = lattice_for(ref["volume_at"](0.0, P_HIGH))
    batch = make_batch([cubic(a_cold), cubic(a_high)], temperatures=[2 * T_COLD, 2 * T_WARM])
    dyn = npt("isotropic", temperature=(T_COLD, T_WARM), pressure=(0.0, P_HIGH))
    state, rec = simulate(dyn, batch, n_steps)
    return dict(batch=batch, dyn=dyn, state=state, rec=rec, a_cold=a_cold, a_high=a_high)


@pytest.fixture(scope="module")
def iso():
    with jax.enable_x64(True):
        yield isotropic_run(3000)


# --------------------------------------------------------------------------- parameters
@pytest.mark.parametrize("kwargs, name", [
    (dict(dt=0.0), "dt"), (dict(dt=-1.0), "dt"), (dict(temperature=-5.0), "temperature"),
    (dict(temperature=None), "temperature"), (dict(tau_t=0.0), "tau_t"),
    (dict(tau_p=-10.0), "tau_p"), (dict(pressure=float("nan")), "pressure"),
    (dict(pressure=None), "pressure"), (dict(coupling="cubic"), "coupling"),
    (dict(chain_length=0), "chain_length"), (dict(chain_substeps=0), "chain_substeps"),
    (dict(yoshida_order=2), "yoshida_order"), (dict(dt=np.array([1.0, -1.0])), "dt"),
])
def test_bad_parameters_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        NPT(model=LJ, **kwargs)


@pytest.mark.parametrize("kwargs, name", [
    (dict(dt=0.0), "dt"), (dict(tau_p=0.0), "tau_p"), (dict(temperature=-1.0), "temperature"),
    (dict(coupling="xyz"), "coupling"),
])
def test_bad_nph_parameters_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        NPH(model=LJ, **kwargs)


def test_cluster_and_fixed_atoms_raise():
    positions, cell = cubic(5.26)
    common = dict(positions=[positions], atomic_numbers=[np.full(32, 18)], min_distance=None)
    cluster = nj.Batch.from_arrays(**common)
    slab = nj.Batch.from_arrays(**common, cell=[cell], pbc=[[True, True, False]])
    for batch in (cluster, slab):
        for dyn in (NPT(model=LJ), NPH(model=LJ)):
            with pytest.raises(ValueError, match="periodic"):
                dyn.init(batch)
    fixed = np.zeros(32, bool)
    fixed[0] = True
    pinned = nj.Batch.from_arrays(**common, cell=[cell], pbc=[True], fixed=[fixed])
    with pytest.raises(ValueError, match="fixed"):
        NPT(model=LJ).init(pinned)


# --------------------------------------------------------------------------- pytree, jit, batch
@jax.jit
def _updates(dyn, state, batch):
    return dyn.post_update(dyn.pre_update(state, batch), batch)


def test_init_and_step_same_pytree_and_jit_equals_eager(x64):
    """init and step give one pytree type; the integrator's updates give the same numbers
    eagerly and under jit. (The model evaluation between them is the engine's, whose
    jit == eager test is in test_dynamics_engine; an eager one here would cost ~15 s.)"""
    batch = make_batch([primitive(5.28), cubic(5.28, strain=[[0, 0.03, 0], [0.03, 0, 0], [0, 0, 0]])],
                       temperatures=[20.0, 20.0])
    dyn = npt("triclinic", temperature=10.0, pressure=units.gpa_to_stress(0.2))
    state = start(dyn, batch)
    stepped, _ = _chunk(dyn, state, batch, 20)   # the barostat and chains are moving now
    # dyn.init itself (traced, not compiled: start() shares one compiled init between tests)
    initial = jax.eval_shape(lambda b, k: dyn.init(b, k, neighbor_spec=neighbor_spec()),
                             batch, jax.random.key(0))
    assert jax.tree.structure(initial) == jax.tree.structure(state) == jax.tree.structure(stepped)
    for a, b, c in zip(jax.tree.leaves(initial), jax.tree.leaves(state), jax.tree.leaves(stepped)):
        assert a.shape == b.shape == c.shape and a.dtype == b.dtype == c.dtype
    assert not np.allclose(np.asarray(stepped.cell), np.asarray(state.cell))
    assert np.any(np.asarray(stepped.stage.system["strain_rate"])[:, 0, 1] != 0)   # shear is live
    jitted = _updates(dyn, stepped, batch)
    eager = dyn.post_update(dyn.pre_update(stepped, batch), batch)
    assert jax.tree.structure(eager) == jax.tree.structure(jitted) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        assert a.shape == b.shape and a.dtype == b.dtype
        if jnp.issubdtype(a.dtype, jnp.floating):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-14)
        elif not jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_batch_invariance(x64):
    """Each system of a mixed batch (own T, P, dt) evolves exactly as when run alone."""
    shear = [[0, 0.03, 0], [0.03, 0, 0], [0, 0, 0]]
    systems = [primitive(5.28), cubic(5.28, strain=shear)]
    temps, pressures, dts = (10.0, 25.0), (0.0, units.gpa_to_stress(0.3)), (5.0, 4.0)

    def dynamics(slots):
        pick = lambda v: tuple(v[i] for i in slots)
        return npt("triclinic", dt=pick(dts), temperature=pick(temps), pressure=pick(pressures))

    mixed_batch = make_batch(systems, temperatures=[2 * t for t in temps])
    mixed, _ = simulate(dynamics([0, 1]), mixed_batch, 2 * CHUNK)
    slices = mixed_batch.system_slices()
    for s in range(2):
        alone_batch = make_batch([systems[s]])
        # the same initial velocities as in the mixed batch (they depend only on the sample id,
        # which differs here for system 1, so copy them)
        alone_batch = alone_batch.replace(velocities=alone_batch.velocities.at[:len(slices[s])].set(
            mixed_batch.velocities[slices[s]]))
        alone, _ = simulate(dynamics([s]), alone_batch, 2 * CHUNK)
        n = len(slices[s])
        np.testing.assert_allclose(np.asarray(alone.positions[:n]), np.asarray(mixed.positions[slices[s]]),
                                   rtol=0, atol=1e-9)
        np.testing.assert_allclose(np.asarray(alone.velocities[:n]),
                                   np.asarray(mixed.velocities[slices[s]]), rtol=0, atol=1e-12)
        np.testing.assert_allclose(np.asarray(alone.cell[0]), np.asarray(mixed.cell[s]), rtol=0, atol=1e-9)
        for k, v in mixed.stage.system.items():
            np.testing.assert_allclose(np.asarray(alone.stage.system[k][0]), np.asarray(v[s]),
                                       rtol=1e-9, atol=1e-14, err_msg=k)


# --------------------------------------------------------------------------- isotropic physics
def check_zero_pressure_volume(run, tolerance):
    ref = reference_eos()
    v_static, v_qha = ref["v0"], ref["volume_at"](T_COLD)
    rec, skip = run["rec"], len(run["rec"]["volume"]) // 5
    v_mean, v_err = block_mean(rec["volume"][skip:, 0])
    print(f"V static {v_static:.2f}  quasi-harmonic(10 K) {v_qha:.2f}  NPT <V> {v_mean:.2f} ± {v_err:.2f} Å³")
    # the static minimum plus the classical thermal expansion, within `tolerance`
    assert abs(v_mean - v_qha) / v_qha < tolerance
    assert v_mean > v_static      # the crystal expands on heating
    return v_mean, v_err


def check_pressure(run, n_sigma=3.0):
    rec, skip = run["rec"], len(run["rec"]["volume"]) // 5
    p = instantaneous_pressure(rec)[skip:]
    out = []
    for s, target in enumerate((0.0, P_HIGH)):
        mean, err = block_mean(p[:, s])
        print(f"system {s}: <P> = {units.stress_to_gpa(mean):.4f} ± {units.stress_to_gpa(err):.4f} GPa "
              f"(target {units.stress_to_gpa(target):.3f})")
        # the instantaneous pressure has fluctuations of ~0.05 GPa; a floor of 2 MPa
        # covers the O(kT/V) ensemble corrections (COM, N vs N-1 degrees of freedom)
        assert abs(mean - target) < n_sigma * err + units.gpa_to_stress(0.002)
        assert err < units.gpa_to_stress(0.02)     # the test has resolving power
        out.append((mean, err))
    return out


def check_temperatures(run, tolerance):
    rec, skip = run["rec"], len(run["rec"]["volume"]) // 5
    dof = 3 * 32 - 3
    t = 2 * rec["kinetic"][skip:, :2] / (dof * KB)
    for s, target in enumerate((T_COLD, T_WARM)):
        assert abs(t[:, s].mean() / target - 1) < tolerance, (s, t[:, s].mean())


def test_isotropic_zero_pressure_volume(iso):
    check_zero_pressure_volume(iso, tolerance=0.01)


def test_isotropic_pressure_matches_target(iso):
    check_pressure(iso)


def test_isotropic_temperature_and_shape(iso):
    check_temperatures(iso, tolerance=0.1)
    cells = iso["rec"]["cell"][:, :2]
    # the shape never changes: every cell stays a multiple of the initial one
    ratio = cells / cells[:, :, :1, :1]
    np.testing.assert_allclose(ratio, np.broadcast_to(np.eye(3), ratio.shape), atol=1e-12)
    assert np.ptp(iso["rec"]["volume"][:, 0]) > 5.0           # but the volume does fluctuate


def test_npt_conserves_extended_energy(iso):
    h = iso["rec"]["conserved"][:, :2]
    for s in range(2):
        fluctuation, drift = conservation(iso["rec"], s)
        print(f"NPT system {s}: extended energy fluctuation {fluctuation:.1e}, drift {drift:.1e} "
              f"of |U| = {abs(iso['rec']['energy'][-1, s]):.3f} eV")
        assert fluctuation < 1e-4 and drift < 1e-5
    # ... while the parts it is made of do change by far more
    assert np.ptp(iso["rec"]["volume"][:, 1] * P_HIGH) > 50 * np.ptp(h[:, 1])


# --------------------------------------------------------------------------- NPH
def conserved_series(cls, dt, duration):
    """System 0: 10 K, P = 0; system 1: 20 K, 0.5 GPa; isotropic, ``duration`` fs at ``dt``."""
    ref = reference_eos()
    a = lattice_for(ref["volume_at"](T_COLD))
    a_high = lattice_for(ref["volume_at"](0.0, P_HIGH))
    batch = make_batch([cubic(a), cubic(a_high)], temperatures=[2 * T_COLD, 2 * T_WARM])
    dyn = npt("isotropic", cls=cls, dt=dt, temperature=(T_COLD, T_WARM), pressure=(0.0, P_HIGH))
    state, rec = simulate(dyn, batch, int(round(duration / dt)))
    rec["stage_keys"] = sorted(state.stage.system)
    return rec


def check_second_order(cls, dt, duration):
    """The extended energy's fluctuation shrinks 4× when dt halves (a consistent
    second-order splitting; a wrong coupling term would leave an O(1) error)."""
    coarse, fine = conserved_series(cls, dt, duration), conserved_series(cls, dt / 2, duration)
    for s in range(2):
        std = [np.std(r["conserved"][len(r["conserved"]) // 5:, s]) for r in (coarse, fine)]
        print(f"{cls.__name__} system {s}: std(H) {std[0]:.2e} eV at dt = {dt} fs, "
              f"{std[1]:.2e} at dt/2: ratio {std[0] / std[1]:.2f}")
        assert 3.3 < std[0] / std[1] < 4.8
    return coarse


def test_npt_energy_error_is_second_order(x64):
    check_second_order(NPT, 4.0, 2000.0)


def test_nph_conserves_enthalpy(x64):
    rec = check_second_order(NPH, DT, 2500.0)
    h = rec["conserved"][:, :2]
    for s in range(2):
        fluctuation, drift = conservation(rec, s)
        print(f"NPH system {s}: fluctuation {fluctuation:.1e}, drift {drift:.1e}; "
              f"volume range {np.ptp(rec['volume'][:, s]):.2f} Å³")
        assert fluctuation < 1e-4 and drift < 1e-5
    # enthalpy flows between its parts: the P V term alone moves far more than H
    assert np.ptp(rec["volume"][:, 1] * P_HIGH) > 50 * np.ptp(h[:, 1])
    assert not any("thermostat" in k for k in rec["stage_keys"])      # no chains at all


# --------------------------------------------------------------------------- ideal gas: exact ensemble
GAS_ATOMS, GAS_T, GAS_BOX = 4, 100.0, 14.0
GAS_CAPACITY = nj.Capacity(num_systems=2, num_atoms=2 * GAS_ATOMS)
# Boxes down to 3.6 Å (V/<V> = 0.017; probability ~1e-6 per sample) scan 5³ images. The
# atoms are never wrapped and cross their box hundreds of times in the long run: lattice
# shifts past the int8 range, so int32 from the start (what `neighbors.grow` would pick;
# this test steps without regrowth and asserts no overflow).
GAS_SPEC = neighbors.NeighborSpec(cutoff=CUTOFF, skin=0.5, max_neighbors=128, method="all_pairs",
                                  max_candidates=125 * GAS_ATOMS, shift_dtype="int32")


def ideal_gas_run(n_steps):
    """Two boxes of 4 non-interacting argon atoms at 100 K under P = 4 kT / (14 Å)³.

    The atoms fly freely and their positions are never wrapped, so the neighbor list's
    conservative rebuild test fires almost every step once they have crossed the box
    a few times: a small capacity of its own keeps those rebuilds cheap."""
    rng = np.random.default_rng(7)
    pressure = GAS_ATOMS * KB * GAS_T / GAS_BOX**3
    systems = [(rng.uniform(0, GAS_BOX, (GAS_ATOMS, 3)), GAS_BOX * np.eye(3)) for _ in range(2)]
    batch = make_batch(systems, temperatures=[GAS_T, GAS_T], capacity=GAS_CAPACITY)
    # no forces, so only the barostat and the chains limit dt
    dyn = npt("isotropic", model=IDEAL_GAS, dt=25.0, temperature=GAS_T, pressure=pressure,
              tau_t=200.0, tau_p=500.0)
    _, rec = simulate(dyn, batch, n_steps, spec=GAS_SPEC)
    return rec, pressure


def check_ideal_gas(n_steps, check_variance):
    """With the centre of mass at rest, N atoms have N−1 free positions, so the MTK
    ensemble gives p(V) ∝ V^(N−1) exp(−PV/kT): V P/kT is Gamma(N)-distributed,
    mean N and variance N (not N−1 or N+1, which a wrong barostat measure, e.g. a
    wrong 1/N_f term, gives); the kinetic energy is (3N−3) kT / 2 on average."""
    rec, pressure = ideal_gas_run(n_steps)
    skip = len(rec["volume"]) // 10
    x = rec["volume"][skip:, :2] * pressure / (KB * GAS_T)              # (T, 2)
    mean, err = block_mean(x.mean(axis=1), 20)
    var = x.var(axis=0).mean()
    t_kin = 2 * rec["kinetic"][skip:, :2] / ((3 * GAS_ATOMS - 3) * KB * GAS_T)
    print(f"ideal gas: <PV/kT> = {mean:.3f} ± {err:.3f} (exact {GAS_ATOMS}), var {var:.2f} "
          f"(exact {GAS_ATOMS}), <T_kin>/T = {t_kin.mean():.3f}")
    assert abs(mean - GAS_ATOMS) < 3 * err + 0.02
    assert abs(mean - GAS_ATOMS) < 0.4        # resolving power: N ± 1 would be off by 1
    assert abs(t_kin.mean() - 1) < 0.05
    if check_variance:
        assert abs(var / GAS_ATOMS - 1) < 0.1


def test_ideal_gas_volume_distribution(x64):
    check_ideal_gas(6000, check_variance=False)


@pytest.mark.slow
def test_slow_ideal_gas_volume_distribution(x64):
    check_ideal_gas(200_000, check_variance=True)


@pytest.mark.slow
def test_slow_thermal_expansion_matches_quasi_harmonic(x64):
    """With the switch placed between neighbor shells 4 and 5 (7.75–7.95 Å), no pair enters
    it at 2.5–5 K, so the sampled potential is analytic and the NPT mean volume must follow
    the exact O(T) law V0 + slope·T (see reference_eos). (With 7.5–8.5 Å the fourth shell,
    7.45 Å, vibrates across the C¹ kink at 7.5 Å, which pulls it in: the expansion then
    comes out ~4 % short of the quasi-harmonic value, as the default tests see.)"""
    cutoff, switch_on = 7.95, 7.75
    model = LennardJones(sigma=SIGMA, epsilon=EPSILON, cutoff=cutoff, switch_on=switch_on)
    ref = reference_eos(cutoff, switch_on, a_range=(5.10, 5.30))
    temps = (2.5, 5.0)
    batch = make_batch([cubic(lattice_for(ref["v0"] + ref["slope"] * t)) for t in temps],
                       temperatures=[2 * t for t in temps])
    # τ_p ∝ 1/√T keeps the volume period ~0.7 ps
    dyn = npt("isotropic", model=model, temperature=temps,
              tau_p=tuple(TAU_P * np.sqrt(T_COLD / t) for t in temps))
    _, rec = simulate(dyn, batch, 40_000)
    skip = len(rec["volume"]) // 5
    for s, (t, allowance) in enumerate(zip(temps, (0.03, 0.05))):     # O(T²) terms grow with T
        mean, err = block_mean(rec["volume"][skip:, s], 20)
        ratio = (mean - ref["v0"]) / (ref["slope"] * t)
        print(f"{t} K: <V> − V0 = {mean - ref['v0']:.3f} ± {err:.3f} Å³, O(T) law "
              f"{ref['slope'] * t:.3f}: ratio {ratio:.3f} ± {err / (ref['slope'] * t):.3f}")
        assert abs(ratio - 1) < allowance + 3 * err / (ref["slope"] * t)


# --------------------------------------------------------------------------- triclinic, anisotropic
def angles(cell):
    """(T, 3) angles in degrees between the cell vectors (bc, ac, ab)."""
    a, b, c = cell[..., 0, :], cell[..., 1, :], cell[..., 2, :]
    cos = lambda x, y: np.sum(x * y, -1) / np.linalg.norm(x, axis=-1) / np.linalg.norm(y, axis=-1)
    return np.degrees(np.arccos(np.stack([cos(b, c), cos(a, c), cos(a, b)], -1)))


def triclinic_run(n_steps):
    ref = reference_eos()
    a = lattice_for(ref["volume_at"](T_COLD))
    shear = np.array([[0, 0.03, 0], [0.03, 0, 0], [0, 0, 0]])
    batch = make_batch([primitive(a), cubic(a, strain=shear)], temperatures=[2 * T_COLD] * 2)
    dyn = npt("triclinic")
    state, rec = simulate(dyn, batch, n_steps)
    return dict(state=state, rec=rec, v_ref=ref["volume_at"](T_COLD))


def check_triclinic(run, volume_tolerance, angle_bound):
    rec = run["rec"]
    second = slice(len(rec["volume"]) // 2, None)
    v_per_atom = run["v_ref"] / 32
    # the 60° primitive cell: no collapse or blow-up, angles bounded, volume at equilibrium
    ang = angles(rec["cell"][:, 0])
    print(f"primitive cell angles {ang.min():.2f}–{ang.max():.2f}°; <V/atom> "
          f"{rec['volume'][second, 0].mean() / 27:.3f} (quasi-harmonic {v_per_atom:.3f}) Å³")
    assert np.all(np.abs(ang - 60.0) < angle_bound)
    assert abs(rec["volume"][second, 0].mean() / 27 / v_per_atom - 1) < volume_tolerance
    assert abs(rec["volume"][second, 1].mean() / 32 / v_per_atom - 1) < volume_tolerance
    # the cubic crystal sheared by 3 % (γ = 86.6°): the shear relaxes, γ returns to 90°
    # (its thermal spread is about ±1°)
    gamma = angles(rec["cell"][:, 1])[:, 2]
    print(f"sheared cubic: γ from {gamma[0]:.2f}° to <γ> {gamma[second].mean():.2f}° "
          f"(range {gamma[second].min():.2f}–{gamma[second].max():.2f})")
    assert abs(gamma[0] - 90.0) > 3.0
    assert abs(gamma[second].mean() - 90.0) < 0.7
    for s in range(2):
        fluctuation, drift = conservation(rec, s)
        assert fluctuation < 1e-4 and drift < 1e-5


def test_triclinic_cell_stable_and_shear_relaxes(x64):
    check_triclinic(triclinic_run(2000), volume_tolerance=0.005, angle_bound=2.0)


def anisotropic_run(n_steps):
    """Two cubic crystals strained by +4 % along x and −4 % along z, 10 K, P = 0."""
    ref = reference_eos()
    a = lattice_for(ref["volume_at"](T_COLD))
    batch = make_batch([cubic(a, strain=np.diag([0.04, 0, 0])), cubic(a, strain=np.diag([0, 0, -0.04]))],
                       temperatures=[2 * T_COLD] * 2)
    state, rec = simulate(npt("anisotropic"), batch, n_steps)
    return dict(state=state, rec=rec, a=a)


def check_anisotropic(run, tolerance):
    """The cells stay orthorhombic, and the imposed anisotropy (about 2.7 % per axis)
    relaxes to within ``tolerance``: the crystals become cubic again, at the equilibrium
    lattice. (At 10 K each axis of this 32-atom crystal fluctuates by ~1 % with a period
    of picoseconds, so picosecond averages scatter by a few tenths of a percent.)"""
    rec = run["rec"]
    second = slice(len(rec["volume"]) // 2, None)
    cells = rec["cell"][:, :2]
    assert np.all(cells * (1 - np.eye(3)) == 0.0)                 # orthorhombic stays so
    lengths = np.diagonal(cells, axis1=-2, axis2=-1)               # (T, 2, 3)
    anisotropy = lengths / lengths.mean(axis=-1, keepdims=True) - 1
    print(f"anisotropic: initial anisotropy {np.round(anisotropy[0], 4).tolist()}, second half "
          f"{np.round(anisotropy[second].mean(axis=0), 4).tolist()}; mean lengths "
          f"{np.round(lengths[second].mean(axis=0), 4).tolist()}, cubic 2a = {2 * run['a']:.4f}")
    assert np.all(np.abs(anisotropy[0]).max(axis=-1) > 0.025)
    assert np.all(np.abs(anisotropy[second].mean(axis=0)) < tolerance)
    volume_per_atom = rec["volume"][second, :2].mean(axis=0) / 32
    np.testing.assert_allclose(volume_per_atom, run["a"] ** 3 / 4, rtol=0.005)


def test_anisotropic_relaxes_uniaxial_strain(x64):
    check_anisotropic(anisotropic_run(2000), tolerance=0.01)


# --------------------------------------------------------------------------- long acceptance runs
@pytest.mark.slow
def test_slow_isotropic_volume_pressure_energy(x64):
    run = isotropic_run(40_000)
    check_zero_pressure_volume(run, tolerance=0.003)
    check_pressure(run)
    check_temperatures(run, tolerance=0.03)
    # Drift bound: the second system's conserved energy swings slowly over thousands of
    # steps (its tenth-means range over ±1.5e-6 of |U| and scatter by 1.0e-6 about a
    # straight line), so the difference of the first and last tenths has a noise of ~1.4e-6;
    # it measured 2.4e-6 (the first system 1.6e-7). 5e-6 is ~3.5 times that noise and half
    # the NPH test's 1e-5; a broken conserved quantity also fails the fluctuation bound.
    for s in range(2):
        fluctuation, drift = conservation(run["rec"], s)
        assert fluctuation < 1e-4 and drift < 5e-6


@pytest.mark.slow
def test_slow_nph_conserves_enthalpy(x64):
    rec = conserved_series(NPH, DT, 100_000.0)
    for s in range(2):
        fluctuation, drift = conservation(rec, s)
        assert fluctuation < 1e-4 and drift < 2e-6


@pytest.mark.slow
def test_slow_triclinic_and_anisotropic(x64):
    check_triclinic(triclinic_run(20_000), volume_tolerance=0.003, angle_bound=2.5)
    check_anisotropic(anisotropic_run(20_000), tolerance=0.005)


@pytest.mark.slow
def test_slow_float32():
    """Default precision: the same physics, with the extended energy conserved to float32 round-off."""
    ref = reference_eos()
    a = lattice_for(ref["volume_at"](T_COLD))
    for coupling in ("isotropic", "triclinic"):
        shear = np.array([[0, 0.02, 0], [0.02, 0, 0], [0, 0, 0]])
        batch = make_batch([cubic(a), cubic(a, strain=shear)], temperatures=[2 * T_COLD] * 2)
        assert batch.positions.dtype == np.float32
        _, rec = simulate(npt(coupling), batch, 10_000)
        second = slice(len(rec["volume"]) // 2, None)
        for s in range(2):
            fluctuation, drift = conservation(rec, s)
            print(f"float32 {coupling} {s}: fluctuation {fluctuation:.1e} drift {drift:.1e}")
            assert fluctuation < 1e-3 and drift < 2e-4
            assert abs(rec["volume"][second, s].mean() / ref["volume_at"](T_COLD) - 1) < 0.01
