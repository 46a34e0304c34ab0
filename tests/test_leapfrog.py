"""NVE in leapfrog form (neighbor lists, few kernels per step): against ASE's
VelocityVerlet, against the step-by-step engine (mixed batches, rebuilds, a list that
overflows mid-chunk, a failing system), and which runs take it. Off a GPU the pair kernel
runs in Pallas' interpreter (``NVALCHEMI_JAX_KERNELS=pallas``); resident kernels are turned off
so that small systems take this path."""

import dataclasses
import os

import jax

import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

from nvalchemi_jax import neighbors
from nvalchemi_jax.dynamics import NVE, ConvergenceHook, Criterion, NVTLangevin, leapfrog, persistent, resident
from nvalchemi_jax.dynamics.run import fused_paths
from nvalchemi_jax.dynamics import status as status_codes
from nvalchemi_jax.dynamics.hooks import LoggingHook
from nvalchemi_jax.models import LennardJones

import _helpers
from _helpers import ARGON, argon_batch, ase_velocity_verlet, assert_matches_ase, assert_same_states, mixed_batch

SHORT = dict(sigma=3.40, epsilon=0.0104, cutoff=5.0)


@pytest.fixture
def fused_only(monkeypatch):
    monkeypatch.setenv("NVALCHEMI_JAX_KERNELS", "pallas")
    monkeypatch.setenv("NVALCHEMI_JAX_RESIDENT", "0")
    monkeypatch.delenv("NVALCHEMI_JAX_LEAPFROG", raising=False)
    monkeypatch.setenv("NVALCHEMI_JAX_PERSISTENT", "0")
    return monkeypatch


@pytest.fixture(params=["0", "1"], ids=["xla-steps", "persistent"])
def kernels(request, fused_only):
    """Leapfrog steps in XLA, or in the persistent kernel (one program, interpreted; two
    kernel calls per chunk, so that chunks with rebuilds end early and the run goes on)."""
    fused_only.setenv("NVALCHEMI_JAX_PERSISTENT", request.param)
    fused_only.setattr(persistent, "SEGMENTS", 2)
    return fused_only


def run_both(kernels, md, batch, state=None, **kwargs):
    """The same run in leapfrog form and step by step."""
    return _helpers.run_both(kernels, "NVALCHEMI_JAX_LEAPFROG", md, batch, state, **kwargs)


def test_matches_ase_velocity_verlet(x64, kernels):
    """256 argon atoms at 300 K (cutoff 8.5 Å, skin 0.2 Å: the list is rebuilt inside the
    chunks), 40 steps of 5 fs: positions agree with ASE driving its own LJ to 1e-6 Å."""
    batch = argon_batch(repeats=[(4, 4, 4)], temperature=300.0)
    md = NVE(model=LennardJones(**ARGON, shift=True), dt=5.0, n_steps=40, skin=0.2)
    assert leapfrog.plan(md, batch)
    result = md.run(batch, chunk_size=25)
    ours = result.state
    assert int(ours.neighbors.rebuilds[0]) > 0
    atoms = ase_velocity_verlet(batch, 40, sigma=ARGON["sigma"], epsilon=ARGON["epsilon"],
                                rc=ARGON["cutoff"], smooth=False)
    # Rounding differences grow along a 300 K trajectory (positions ~1e-8 Å apart after
    # 40 steps in float64); the energy follows them: 1e-8 relative, not 1e-9.
    assert_matches_ase(ours, atoms, energy_rtol=1e-8)


def test_matches_engine_on_a_mixed_batch(x64, kernels):
    """Sizes 32 / 48 / 108, two species from tables, a fixed atom, ASE's smooth cutoff, a
    small skin (rebuilds inside chunks) and a step budget (25) that ends inside a chunk:
    every field of the state equals the step-by-step engine's (itself checked against ASE
    in test_nve)."""
    batch = mixed_batch(temperature=300.0)
    model = LennardJones.mixed(species=(18, 36), sigma=(3.40, 3.65), epsilon=(0.0104, 0.0140),
                               cutoff=5.0, switch_on=4.5)
    md = NVE(model=model, dt=4.0, n_steps=25, skin=0.2)
    fast, slow = run_both(kernels, md, batch, chunk_size=10)
    assert_same_states(fast.state, slow.state)
    assert int(fast.state.neighbors.rebuilds[0]) > 0
    assert fast.steps == slow.steps == 25 and fast.converged[:3].all()
    pinned = np.flatnonzero(np.asarray(batch.fixed))
    np.testing.assert_array_equal(np.asarray(fast.state.positions)[pinned],
                                  np.asarray(batch.positions)[pinned])


def test_a_list_that_overflows_inside_a_chunk(x64, kernels):
    """A hot run whose list is exactly as wide as the first build needed: a rebuild inside
    the chunk overflows it, the chunk is redone from its start with a wider list, and the
    result is the engine's."""
    batch = argon_batch(repeats=[(3, 3, 3), (2, 2, 3)], temperature=3000.0, rattle=0.3)
    md = NVE(model=LennardJones(**SHORT), dt=5.0, n_steps=40, skin=0.3)
    state = md.init(batch)
    snug = dataclasses.replace(state.neighbors.spec, max_neighbors=int(state.neighbors.needed[0]))
    state = state.replace(neighbors=neighbors.build(snug, state.positions, state.cell, batch))
    fast, slow = run_both(kernels, md, batch, state=state, chunk_size=20)
    assert fast.regrows >= 1 and fast.regrows == slow.regrows
    assert fast.state.neighbors.spec.max_neighbors > snug.max_neighbors
    # A regrown list starts its rebuild count afresh at the redone chunk's start, and the
    # persistent kernel's chunks (two calls each here) end early, at other steps.
    assert_same_states(fast.state, slow.state, rebuilds=os.environ["NVALCHEMI_JAX_PERSISTENT"] == "0")


def test_a_run_matches_chunks_chained_by_hand(x64, kernels):
    """``run``'s chunks, queued ahead of the host, give the result of chunks chained by hand
    from the caller's state, which stays as it was; a second run compiles nothing, and a
    run from the finished state hands it back without a step. The list is rebuilt inside
    the chunks (skin 0.2 Å, 300 K), so persistent chunks also end early."""
    from nvalchemi_jax.dynamics.run import run_chunk

    batch = argon_batch(repeats=[(2, 2, 2), (3, 2, 2)], temperature=300.0)
    md = NVE(model=LennardJones(**SHORT, shift=True), dt=5.0, n_steps=40, skin=0.2)
    state = md.init(batch)
    host = lambda s: [np.array(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
                               else x) for x in jax.tree.leaves(s)]
    kept = host(state)
    md.run(batch, state=state, max_steps=10, chunk_size=10)      # compiles a run's programs
    with _helpers.count_compilations() as compiled:
        result = md.run(batch, state=state, chunk_size=10)
    assert compiled[0] == 0
    assert result.steps == 40 and int(result.state.neighbors.rebuilds.max()) > 0
    for now, before in zip(host(state), kept, strict=True):
        np.testing.assert_array_equal(now, before)

    by_hand, path = state, fused_paths(md, batch)
    assert path["fused"]
    while int(by_hand.global_step) < 40:
        by_hand, _ = run_chunk(md, by_hand, batch, min(10, 40 - int(by_hand.global_step)), length=10, **path)
    assert_same_states(result.state, by_hand, rtol=1e-12, atol=1e-13)

    again = md.run(batch, state=result.state, chunk_size=10)
    assert again.chunks == 0 and again.steps == 40
    assert_same_states(again.state, result.state, rtol=0, atol=0)


def test_a_failing_system_leaves_the_others(x64, kernels):
    """A non-finite velocity in system 1 fails it (named reason, back to its last finite
    step, as the engine does); systems 0 and 2 run on exactly as the engine runs them."""
    batch = mixed_batch()
    md = NVE(model=LennardJones(**SHORT, shift=True), dt=4.0, n_steps=12, skin=0.2)
    batch = batch.replace(atomic_numbers=jnp.where(batch.atom_mask, 18, batch.atomic_numbers))
    state = md.init(batch)
    bad = int(np.flatnonzero(np.asarray(batch.system_index) == 1)[5])
    state = state.replace(velocities=state.velocities.at[bad, 0].set(jnp.nan))
    fast, slow = run_both(kernels, md, batch, state=state, chunk_size=12)
    assert fast.failed[:3].tolist() == [False, True, False] == slow.failed[:3].tolist()
    assert int(fast.state.failure[1]) == int(status_codes.Failure.NONFINITE_FORCES)
    assert_same_states(fast.state, slow.state)
    assert fast.converged[[0, 2]].all()


def test_which_runs_qualify(fused_only):
    kernels = fused_only
    batch = argon_batch(repeats=[(2, 2, 2), (3, 3, 3)])
    model = LennardJones(**SHORT, shift=True)
    md = NVE(model=model, dt=2.0, n_steps=10)
    assert leapfrog.plan(md, batch) and leapfrog.plan(NVE(model=model, dt=2.0), batch)
    fmax = ConvergenceHook((Criterion("fmax", 0.1),))
    refused = [
        NVE(model=model, dt=2.0, convergence=fmax),                               # not a budget
        NVE(model=model, dt=2.0, n_steps=10, hooks=(LoggingHook(frequency=5),)),  # hooks
        NVTLangevin(model=model, dt=2.0, temperature=50.0, friction=0.01, n_steps=10),
    ]
    for other in refused:
        assert not leapfrog.plan(other, batch), other
    # Open cells and large systems qualify (resident ones do not).
    open_batch = batch.replace(pbc=batch.pbc.at[1, 2].set(False))
    assert leapfrog.plan(md, open_batch) and not resident.plan(md, open_batch)
    kernels.setenv("NVALCHEMI_JAX_LEAPFROG", "0")
    assert not leapfrog.plan(md, batch)
    kernels.setenv("NVALCHEMI_JAX_LEAPFROG", "1")
    kernels.setenv("NVALCHEMI_JAX_KERNELS", "auto")     # auto: the kernels only on a GPU
    assert leapfrog.plan(md, batch) == resident._pallas.on_gpu()


def test_a_persistent_kernel_whose_barrier_ran_out_fails_the_running_systems(x64, fused_only):
    """Should the persistent kernel's programs not all run at once (its barrier gives up),
    the whole batch goes back to the chunk's start (its programs may have stopped at
    different steps), and every system that was to run fails with a reason that names the
    way out; one whose budget was spent is untouched. (Simulated: the interpreter runs one
    program; the verdict is replaced after a real kernel call in mid-chunk.)"""
    fused_only.setenv("NVALCHEMI_JAX_PERSISTENT", "1")
    real = persistent.call
    calls = []

    def gives_up_later(*args, **kwargs):
        rings, f, index, code = real(*args, **kwargs)
        calls.append(None)
        return rings, f, index, jnp.where(index > 3, persistent.STUCK, code)

    fused_only.setattr(persistent, "call", gives_up_later)
    batch = mixed_batch(temperature=300.0)
    md = NVE(model=LennardJones(**SHORT, shift=True), dt=4.0, n_steps=10, skin=0.05)
    state = md.init(batch)
    state = state.replace(step=state.step.at[2].set(10))        # system 2: budget spent
    assert fused_paths(md, batch)["grid"] == 1
    result = md.run(batch, state=state, chunk_size=10)
    assert calls, "the kernel never ran"
    assert result.failed[:3].tolist() == [True, True, False]
    assert all("NVALCHEMI_JAX_PERSISTENT=0" in result.failures[s] for s in (0, 1))
    end = result.state
    for name in ("positions", "energy", "previous_energy", "step"):
        np.testing.assert_array_equal(np.asarray(getattr(end, name)), np.asarray(getattr(state, name)),
                                      err_msg=name)
    lost = np.asarray(batch.system_index) < 2
    for name in ("velocities", "forces"):
        np.testing.assert_array_equal(np.asarray(getattr(end, name))[lost], 0.0, err_msg=name)
        np.testing.assert_array_equal(np.asarray(getattr(end, name))[~lost],
                                      np.asarray(getattr(state, name))[~lost], err_msg=name)
    # The list is rebuilt before it is used again (whatever positions it was built for).
    assert np.asarray(end.neighbors.stale)[np.asarray(batch.system_mask)].all()


def test_a_rebuild_at_every_step_and_a_failure_in_one_chunk(x64, kernels):
    """A skin so thin that every step ends a kernel call for a rebuild, and a system
    non-finite from the start (a call that advances nothing, then the engine's failure
    handling): the persistent kernel's chunks run out of calls and end early, and the run
    goes on to the engine's end."""
    batch = mixed_batch(temperature=300.0)
    batch = batch.replace(atomic_numbers=jnp.where(batch.atom_mask, 18, batch.atomic_numbers))
    md = NVE(model=LennardJones(**SHORT, shift=True), dt=4.0, n_steps=12, skin=1e-4)
    state = md.init(batch)
    bad = int(np.flatnonzero(np.asarray(batch.system_index) == 1)[5])
    state = state.replace(velocities=state.velocities.at[bad, 0].set(jnp.nan))
    fast, slow = run_both(kernels, md, batch, state=state, chunk_size=12)
    assert fast.failed[:3].tolist() == [False, True, False] == slow.failed[:3].tolist()
    assert int(np.asarray(fast.state.neighbors.rebuilds)[[0, 2]].min()) >= 11
    assert_same_states(fast.state, slow.state)
    assert fast.converged[[0, 2]].all()
    if os.environ["NVALCHEMI_JAX_PERSISTENT"] == "1":
        assert fast.chunks > slow.chunks == 1


def test_a_system_failing_late_in_a_kernel_call(x64, kernels):
    """A model that goes non-finite for pairs closer than 3.2 Å, and an atom thrown at its
    neighbor: its system fails at a later step of a kernel call (after the position ring
    wrapped), is put back to its last finite step as the engine does, and the others run on
    (one of them with fewer steps left than the chunk takes): every field, the previous
    energies included, equals the engine's."""

    @struct.dataclass
    class Brittle(LennardJones):
        def pair_term(self, r2, p):
            return jnp.where(r2 < 3.2 ** 2, jnp.nan, LennardJones.pair_term(self, r2, p))

    batch = mixed_batch()
    batch = batch.replace(atomic_numbers=jnp.where(batch.atom_mask, 18, batch.atomic_numbers))
    md = NVE(model=Brittle(**SHORT, shift=True), dt=4.0, n_steps=12, skin=2.0)
    state = md.init(batch)
    atoms = np.flatnonzero(np.asarray(batch.system_index) == 1)
    x = np.asarray(batch.positions)[atoms]
    gap = np.linalg.norm(x[1:] - x[0], axis=-1)
    toward = (x[1:][np.argmin(gap)] - x[0]) / gap.min()          # atom 0 -> its nearest neighbor
    state = state.replace(velocities=state.velocities.at[atoms[0]].set(0.05 * toward),
                          step=state.step.at[0].set(5))      # system 0: 7 steps left, not 12
    fast, slow = run_both(kernels, md, batch, state=state, chunk_size=12)
    assert fast.failed[:3].tolist() == [False, True, False] == slow.failed[:3].tolist()
    # Non-finite at x_i (i >= 3), put back to x_{i-1}: by then x_i has overwritten x_{i-3}'s
    # ring slot, so the slot read for x_{i-1} is one the ring has come round to.
    assert int(slow.state.step[1]) >= 2
    assert_same_states(fast.state, slow.state)


def test_programs_share_out_the_atoms(x64, fused_only):
    """Several programs, each owning a range of atoms, take a step as one program does (one
    step per call: Pallas' interpreter runs programs one after another, so no barrier)."""
    from nvalchemi_jax.models.pair import symmetric
    fused_only.setattr(persistent, "ROWS", 32)
    fused_only.setattr(persistent, "ATOMS", 16)
    batch = mixed_batch(temperature=300.0)
    md = NVE(model=LennardJones(**SHORT, shift=True), dt=4.0, n_steps=10)
    state = md.init(batch)
    n, dtype = batch.num_atoms, state.positions.dtype
    pad = lambda a: jnp.pad(a, ((0, 1),) + ((0, 0),) * (a.ndim - 1))      # the interpreter's spare row
    zero = jnp.zeros((n,), dtype)
    rings = persistent.rings_at_start(jnp.pad(state.positions, ((0, 0), (0, 1))), state.velocities, zero,
                                      zero, spare=1)
    params = {k: symmetric(v) for k, v in md.model.pair_parameters().items()}
    out = {}
    for grid in (1, 3):
        assert persistent.rows_per_program(n, grid) * (grid - 1) < n
        out[grid] = persistent.call(
            md.model.pair_term, md.model.cutoff, params, None, 1, rings, jnp.int32(0), jnp.int32(1),
            kick=pad(jnp.full((n,), 1e-3, dtype)), dt_atom=pad(jnp.full((n,), 4.0, dtype)),
            count_atom=pad(jnp.full((n,), 5, jnp.int32)), reference=state.neighbors.reference_positions,
            skin=md.skin, cell=state.cell, batch=batch, nl=state.neighbors, grid=grid)
    moved = np.asarray(out[1][0][0][1, :n, :3]) - np.asarray(state.positions)
    assert np.abs(moved).max() > 0
    for a, b in zip(jax.tree.leaves(out[1]), jax.tree.leaves(out[3])):
        np.testing.assert_array_equal(np.asarray(a)[..., :n] if np.ndim(a) == 1 else np.asarray(a),
                                      np.asarray(b)[..., :n] if np.ndim(b) == 1 else np.asarray(b))


def test_how_many_programs_the_persistent_kernel_takes(monkeypatch):
    """At most one per multiprocessor, each owning whole tiles of rows (every program owns
    atoms); by default only on GPUs and up to AUTO_MAX_ATOMS; forced on, one program in the
    interpreter elsewhere."""
    from nvalchemi_jax import _pallas
    monkeypatch.delenv("NVALCHEMI_JAX_PERSISTENT", raising=False)
    monkeypatch.setattr(_pallas, "multiprocessors", lambda: 0)
    assert persistent.programs(4000) == 0
    monkeypatch.setenv("NVALCHEMI_JAX_PERSISTENT", "1")
    assert persistent.programs(4000) == 1
    monkeypatch.setattr(_pallas, "multiprocessors", lambda: 132)
    assert persistent.programs(4000) == -(-4000 // persistent.ROWS) < 132
    assert persistent.programs(10 * persistent.AUTO_MAX_ATOMS) == 132
    monkeypatch.setenv("NVALCHEMI_JAX_PERSISTENT", "auto")
    grid = persistent.programs(32000)
    per = persistent.rows_per_program(32000, grid)
    assert grid == 125 and per == 2 * persistent.ROWS and (grid - 1) * per < 32000 <= grid * per
    assert persistent.programs(persistent.AUTO_MAX_ATOMS + 1) == 0
    monkeypatch.setenv("NVALCHEMI_JAX_PERSISTENT", "0")
    assert persistent.programs(32000) == 0
    monkeypatch.setenv("NVALCHEMI_JAX_PERSISTENT", "yes")
    with pytest.raises(ValueError, match="NVALCHEMI_JAX_PERSISTENT"):
        persistent.programs(32000)
