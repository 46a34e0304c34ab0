"""The engine: hook stages and order, frequencies, observers, convergence, per-system
failure, jit == eager, pytree types, no recompilation, neighbor-list regrowth."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nvalchemi_jax import neighbors
from nvalchemi_jax.dynamics import run as run_module
from nvalchemi_jax.dynamics import NVE, ConvergenceHook, Criterion, Hook, Stage, status
from nvalchemi_jax.models import LennardJones

from _helpers import ARGON, argon_batch, count_compilations

LJ = LennardJones(**ARGON, shift=True)


def recorder(log, label):
    def fn(state, batch, ctx):
        jax.debug.callback(lambda step: log.append((label, int(step))), ctx.step, ordered=True)
        return state
    return fn


def test_hook_stages_run_in_order():
    batch = argon_batch(temperature=20.0)
    log = []
    stages = [Stage.BEFORE_STEP, Stage.BEFORE_PRE_UPDATE, Stage.AFTER_PRE_UPDATE, Stage.BEFORE_COMPUTE,
              Stage.AFTER_COMPUTE, Stage.BEFORE_POST_UPDATE, Stage.AFTER_POST_UPDATE, Stage.ON_CONVERGE,
              Stage.AFTER_STEP]
    # Registered in reverse order to show that the stage, not registration, sets the phase,
    # plus two hooks at one stage to show registration order within a stage.
    hooks = [Hook(recorder(log, s.name), stages=(s,)) for s in reversed(stages)]
    hooks.append(Hook(recorder(log, "AFTER_STEP_second"), stages=(Stage.AFTER_STEP,)))
    md = NVE(model=LJ, dt=2.0, n_steps=1, hooks=hooks)
    state = md.init(batch)
    jax.jit(md.step)(state, batch)
    jax.effects_barrier()
    assert [label for label, _ in log] == [s.name for s in stages] + ["AFTER_STEP_second"]


def test_hook_frequency_and_step_index():
    batch = argon_batch(temperature=20.0)
    log = []
    md = NVE(model=LJ, dt=2.0, n_steps=10, hooks=[Hook(recorder(log, "h"), frequency=3)])
    md.run(batch, chunk_size=4)
    jax.effects_barrier()
    assert [step for _, step in log] == [0, 3, 6, 9]


def test_hook_can_modify_state():
    """Zeroing forces after every compute turns NVE into free flight: r(t) = r0 + v0 t."""
    batch = argon_batch(temperature=50.0)
    zero = Hook(lambda s, b, ctx: s.replace(forces=jnp.zeros_like(s.forces)), stages=(Stage.AFTER_COMPUTE,))
    md = NVE(model=LJ, dt=2.0, n_steps=5, hooks=[zero])
    state = md.init(batch)
    state = state.replace(forces=jnp.zeros_like(state.forces))
    out = md.run(batch, state=state).state
    np.testing.assert_allclose(out.positions, batch.positions + 10.0 * state.velocities, atol=1e-5)
    np.testing.assert_allclose(out.velocities, state.velocities, atol=1e-7)


def test_observer_records_are_handed_over_between_chunks():
    batch = argon_batch(repeats=[(2, 2, 2), (2, 2, 3)], temperature=30.0)
    calls = []

    def on_host(records, due, steps):
        calls.append((records["energy"][due], steps[due]))

    observer = Hook(record=lambda s, b, ctx: {"energy": s.energy}, on_host=on_host, frequency=5)
    md = NVE(model=LJ, dt=2.0, n_steps=23, hooks=[observer])
    result = md.run(batch, chunk_size=10)
    assert len(calls) == 3                      # one hand-over per chunk, none inside
    steps = np.concatenate([c[1] for c in calls])
    np.testing.assert_array_equal(steps, [0, 5, 10, 15, 20])
    energies = np.concatenate([c[0] for c in calls])
    assert energies.shape == (5, batch.num_systems)
    assert result.steps == 23


def test_step_budget_and_staggered_convergence():
    """System k converges when its step reaches k + 2; converged systems stop moving and
    ON_CONVERGE sees exactly the systems that converged in that step."""
    batch = argon_batch(repeats=[(2, 2, 2)] * 3, temperature=30.0, sample_ids=[0, 1, 2])
    seen = []

    def on_converge(state, batch, ctx):
        jax.debug.callback(lambda step, c: seen.append((int(step), np.asarray(c).tolist())),
                           ctx.step, ctx.converged, ordered=True)
        return state

    criterion = Criterion("custom", 0.0, custom=lambda s, b: (b.sample_id + 2 - s.step).astype(s.energy.dtype))
    md = NVE(model=LJ, dt=2.0, convergence=ConvergenceHook((criterion,)),
             hooks=[Hook(on_converge, stages=(Stage.ON_CONVERGE,))])
    result = md.run(batch, max_steps=50, chunk_size=3)
    jax.effects_barrier()
    np.testing.assert_array_equal(np.asarray(result.state.step)[:3], [2, 3, 4])
    assert result.converged[:3].all() and result.steps == 4
    assert seen == [(1, [True, False, False]), (2, [False, True, False]), (3, [False, False, True])]
    assert np.asarray(result.state.status)[:3].tolist() == [md.exit_status] * 3


def test_and_of_criteria():
    hook = ConvergenceHook([Criterion("fmax", 0.1), {"key": "energy_change", "threshold": 1e-3}])
    batch = argon_batch()
    md = NVE(model=LJ, dt=1.0, convergence=hook)
    state = md.init(batch)
    # previous_energy is +inf after init: energy_change fails although fmax may pass.
    assert not bool(hook.met(state, batch)[0])
    state = state.replace(previous_energy=state.energy, forces=jnp.zeros_like(state.forces))
    assert bool(hook.met(state, batch)[0])


@pytest.mark.parametrize("kwargs, match", [
    (dict(key="nope", threshold=1.0), "key"),
    (dict(key="fmax", threshold=-1.0), "threshold"),
    (dict(key="fmax", threshold=1.0, reduce_op="median"), "reduce_op"),
    (dict(key="custom", threshold=1.0), "custom"),
])
def test_bad_criteria(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Criterion(**kwargs)


def test_bad_parameters_raise_before_tracing():
    with pytest.raises(ValueError, match="dt"):
        NVE(model=LJ, dt=0.0)
    with pytest.raises(ValueError, match="dt"):
        NVE(model=LJ, dt=np.array([1.0, -1.0]))
    with pytest.raises(ValueError, match="n_steps"):
        NVE(model=LJ, dt=1.0, n_steps=-3)
    with pytest.raises(TypeError, match="Hook"):
        NVE(model=LJ, dt=1.0, hooks=[lambda s, b, c: s])


def test_nan_in_one_system_fails_only_that_system(x64):
    """A NaN injected into system 1's forces at step 3 marks it failed with a reason and
    freezes it; systems 0 and 2 go on exactly as in a batch without the fault."""
    batch = argon_batch(repeats=[(2, 2, 2)] * 3, temperature=40.0, sample_ids=[0, 1, 2])

    def poison(state, batch, ctx):
        bad = (batch.system_index == 1) & (ctx.step == 3)
        return state.replace(forces=jnp.where(bad[:, None], jnp.nan, state.forces))

    faulty = NVE(model=LJ, dt=2.0, n_steps=8, hooks=[Hook(poison, stages=(Stage.AFTER_COMPUTE,))])
    clean = NVE(model=LJ, dt=2.0, n_steps=8)
    states = []
    state = faulty.init(batch)
    for _ in range(3):
        state = faulty.step(state, batch)
    before_fault = state
    result = faulty.run(batch, state=state)
    reference = clean.run(batch).state
    st = result.state
    assert result.failed.tolist()[:3] == [False, True, False]
    assert result.failures == {1: status.message(status.Failure.NONFINITE_FORCES)}
    assert int(st.status[1]) == status.FAILED and int(st.failure[1]) == status.Failure.NONFINITE_FORCES
    atoms1 = np.asarray(batch.system_index) == 1
    np.testing.assert_array_equal(np.asarray(st.positions)[atoms1], np.asarray(before_fault.positions)[atoms1])
    assert np.all(np.isfinite(np.asarray(st.positions)))
    others = np.isin(np.asarray(batch.system_index), [0, 2])
    np.testing.assert_allclose(np.asarray(st.positions)[others], np.asarray(reference.positions)[others],
                               atol=1e-12)
    assert result.converged[[0, 2]].all()


def test_jit_equals_eager_and_same_pytree(x64):
    batch = argon_batch(temperature=30.0)
    md = NVE(model=LJ, dt=3.0, n_steps=5)
    state = md.init(batch)
    eager = md.step(state, batch)
    jitted = jax.jit(md.step)(state, batch)
    assert jax.tree.structure(state) == jax.tree.structure(eager) == jax.tree.structure(jitted)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        if jnp.issubdtype(a.dtype, jnp.floating):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
        elif not jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            np.testing.assert_array_equal(a, b)


def test_second_run_does_not_recompile():
    batch = argon_batch(temperature=30.0)
    md = NVE(model=LJ, dt=3.0, n_steps=12)
    md.run(batch, chunk_size=5)
    moved = batch.replace(positions=batch.positions + 0.01)
    other = NVE(model=LJ, dt=2.0, n_steps=12)        # a new dt is a number, not a new program
    with count_compilations() as n:
        md.run(moved, chunk_size=5)
        other.run(moved, chunk_size=5)
    assert n[0] == 0


def test_neighbor_overflow_regrows_and_redoes_the_chunk(x64):
    batch = argon_batch(temperature=30.0)
    md = NVE(model=LJ, dt=3.0, n_steps=6)
    spec, _ = neighbors.allocate(batch, cutoff=LJ.cutoff, skin=md.skin)
    small = dataclasses.replace(spec, max_neighbors=10)
    state = md.init(batch, neighbor_spec=small)
    assert bool(state.neighbors.overflow)
    result = md.run(batch, state=state, chunk_size=3)
    assert result.regrows == 1 and not bool(result.state.neighbors.overflow)
    assert result.state.neighbors.spec.max_neighbors > 10
    # The chunk that overflowed was redone from a correct list: same as a run that never overflowed
    # (except the first force evaluation, which init did with the small list: recompute it).
    good = md.init(batch, neighbor_spec=spec)
    reference = md.run(batch, state=good).state
    fixed_start = state.replace(forces=good.forces, energy=good.energy,
                                neighbors=neighbors.build(spec, batch.positions, batch.cell, batch))
    again = md.run(batch, state=fixed_start).state
    np.testing.assert_allclose(again.positions, reference.positions, atol=1e-12)


def test_a_finished_state_comes_back_as_it_was():
    """run() launches its first chunk without asking the host whether anything runs; from a
    state where nothing does (every system at its step budget) it must still hand the state
    back untouched: no step, no regrowth of an overflowed list, no recomputed forces."""
    batch = argon_batch(temperature=30.0)
    md = NVE(model=LJ, dt=3.0, n_steps=4)
    done = md.run(batch, chunk_size=4).state
    assert not np.asarray(md.running(done, batch)).any()
    spec = dataclasses.replace(done.neighbors.spec, max_neighbors=10)
    small = done.replace(neighbors=neighbors.build(spec, done.positions, done.cell, batch))
    assert bool(small.neighbors.overflow)
    for state in (done, small):
        again = md.run(batch, state=state, max_steps=20, chunk_size=5)
        assert again.chunks == 0 and again.regrows == 0 and again.steps == int(state.global_step)
        plain = lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x
        for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(again.state)):
            np.testing.assert_array_equal(np.asarray(plain(a)), np.asarray(plain(b)))


def _recording_observer(seen, frequency):
    """An observer whose host side keeps (steps, energies, positions) of every hand-over."""
    def on_host(records, due, steps):
        seen.append((steps.tolist(), np.array(records["energy"]), np.array(records["positions"])))
    return Hook(record=lambda s, b, ctx: {"energy": s.energy, "positions": s.positions},
                on_host=on_host, frequency=frequency)


@pytest.mark.parametrize("ahead", [1, 2])
def test_next_chunk_is_queued_before_records_are_handed_over(monkeypatch, ahead):
    """The run loop queues chunks k + 1 .. k + QUEUED_AHEAD before giving chunk k's rows to
    observers (host work overlaps device work), never more than the run's steps, and the rows
    are those of a plain chunk-after-chunk loop."""
    monkeypatch.setattr(run_module, "QUEUED_AHEAD", ahead)
    batch = argon_batch(repeats=[(2, 2, 2), (2, 2, 3)], temperature=30.0)
    events, seen = [], []
    original = run_module.dispatch

    def spy(*args, **kwargs):
        events.append("dispatch")
        return original(*args, **kwargs)

    monkeypatch.setattr(run_module, "dispatch", spy)
    observer = _recording_observer(seen, frequency=4)
    md = NVE(model=LJ, dt=2.0, n_steps=25,
             hooks=[observer, Hook(record=lambda s, b, ctx: {}, frequency=4,
                                   on_host=lambda r, d, steps: events.append(steps.tolist()))])
    state = md.init(batch)
    result = md.run(batch, state=state, chunk_size=10)
    queued = {1: ["dispatch", "dispatch", [0, 4, 8], "dispatch", [12, 16], [20, 24]],
              2: ["dispatch", "dispatch", "dispatch", [0, 4, 8], [12, 16], [20, 24]]}
    assert events == queued[ahead]
    assert result.steps == 25 and result.chunks == 3

    # Reference: one chunk at a time, each handed over before the next is started.
    reference, s, taken = [], state, 0
    while taken < 25:
        s, (buffers, flags) = run_module.run_chunk(md, s, batch, min(10, 25 - taken), length=10)
        rows, steps, count = buffers[0]
        n = int(count)
        reference.append((np.asarray(steps[:n]).tolist(), np.asarray(rows["energy"][:n]),
                          np.asarray(rows["positions"][:n])))
        taken += int(flags[1])
    assert [r[0] for r in seen] == [r[0] for r in reference]
    for (_, e, p), (_, e_ref, p_ref) in zip(seen, reference):
        np.testing.assert_array_equal(e, e_ref)
        np.testing.assert_array_equal(p, p_ref)
    np.testing.assert_array_equal(result.state.positions, s.positions)


@pytest.mark.parametrize("ahead", [1, 2])
def test_overflow_drops_the_queued_chunk_and_keeps_records_in_order(x64, monkeypatch, ahead):
    """Chunk 1 overflows its neighbor list; the chunks already queued from its result are
    dropped with it. Observers see each due step once, in order, with the values of a run
    that had the grown list from the start (the initial forces, which missed pairs, are
    computed again)."""
    monkeypatch.setattr(run_module, "QUEUED_AHEAD", ahead)
    batch = argon_batch(temperature=30.0)
    seen = []
    md = NVE(model=LJ, dt=3.0, n_steps=9, hooks=[_recording_observer(seen, frequency=2)])
    spec, _ = neighbors.allocate(batch, cutoff=LJ.cutoff, skin=md.skin)
    state = md.init(batch, neighbor_spec=dataclasses.replace(spec, max_neighbors=10))
    result = md.run(batch, state=state, chunk_size=3)
    assert result.regrows == 1 and result.steps == 9
    assert [step for steps, _, _ in seen for step in steps] == [0, 2, 4, 6, 8]

    seen_ref = []
    reference = NVE(model=LJ, dt=3.0, n_steps=9, hooks=[_recording_observer(seen_ref, frequency=2)])
    grown = result.state.neighbors.spec
    out = reference.run(batch, state=reference.init(batch, neighbor_spec=grown), chunk_size=3)
    assert out.regrows == 0
    energies = np.concatenate([e for _, e, _ in seen])
    np.testing.assert_allclose(energies, np.concatenate([e for _, e, _ in seen_ref]), rtol=1e-12)
    np.testing.assert_allclose(result.state.positions, out.state.positions, atol=1e-12)


@pytest.mark.parametrize("fused", [False, True], ids=["engine-worker-thread", "leapfrog-inline"])
def test_a_settled_chunks_start_is_freed_before_the_next_launch(monkeypatch, fused):
    """The run loop holds no state longer than it needs: when chunk k launches, the starts of
    chunks 1 .. k - 2 are gone (chunk k - 1's start is the state it waits on; chunk 0's is
    the caller's). One state more would cost its memory on the device at every launch.
    Both launchers: the engine's chunks from the worker thread, NVE in leapfrog form from
    the caller's."""
    import weakref

    if fused:
        monkeypatch.setenv("NVALCHEMI_JAX_KERNELS", "pallas")
        monkeypatch.setenv("NVALCHEMI_JAX_RESIDENT", "0")
        monkeypatch.setenv("NVALCHEMI_JAX_PERSISTENT", "0")
        monkeypatch.delenv("NVALCHEMI_JAX_LEAPFROG", raising=False)
    else:
        monkeypatch.setenv("NVALCHEMI_JAX_KERNELS", "xla")

    starts, alive_at_launch = [], []
    original = run_module.run_chunk

    def spy(dyn, state, *args, **kwargs):
        alive_at_launch.append([ref() is not None for ref in starts])
        starts.append(weakref.ref(state))
        return original(dyn, state, *args, **kwargs)

    monkeypatch.setattr(run_module, "run_chunk", spy)
    batch = argon_batch(repeats=[(2, 2, 2)], temperature=30.0)
    md = NVE(model=LJ, dt=2.0, n_steps=60)
    assert run_module.fused_paths(md, batch)["fused"] == fused
    result = md.run(batch, state=md.init(batch), chunk_size=10)
    assert result.chunks == 6 and len(alive_at_launch) == 6
    for k, alive in enumerate(alive_at_launch):
        assert not any(alive[1:k - 1]), (k, alive)
