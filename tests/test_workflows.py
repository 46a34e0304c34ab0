"""Workflows: sample conservation through inflight refills, sinks and failures; fused
stages equal sequential runs; refills never recompile; zarr round trips."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import zarr

import nvalchemi_jax as nj
from nvalchemi_jax.datasets import argon_systems, fcc_cluster
from nvalchemi_jax.dynamics import NVE, ConvergenceHook, Criterion, Hook, Stage, status
from nvalchemi_jax.dynamics.sampler import SizeAwareSampler
from nvalchemi_jax.dynamics.sinks import GPUBuffer, HostMemory, ZarrData, read_zarr
from nvalchemi_jax.frames import Frames
from nvalchemi_jax.models import LennardJones

from _helpers import ARGON, argon_batch, count_compilations

LJ = LennardJones(**ARGON, shift=True)


def clusters(count, seed=0, low=4, high=13):
    """Small open argon clusters (cheap to simulate in bulk)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        n = int(rng.integers(low, high))
        p = fcc_cluster(n) + rng.normal(0, 0.05, (n, 3))
        out.append({"positions": p, "atomic_numbers": np.full(n, 18)})
    return out


def staggered_nve(fail_every=None, fail_step=0):
    """NVE whose systems finish after (sample_id % 5) + 1 steps; optionally NaN forces for
    sample ids divisible by ``fail_every`` at their own step ``fail_step``."""
    criterion = Criterion("custom", 0.0, custom=lambda s, b: ((b.sample_id % 5) + 1 - s.step).astype(s.energy.dtype))
    hooks = []
    if fail_every:
        def poison(state, batch, ctx):
            sick = (batch.sample_id % fail_every == 0) & (state.step == fail_step)
            atoms = nj.batch.gather_systems(sick, batch.system_index, False)
            return state.replace(forces=jnp.where(atoms[:, None], jnp.nan, state.forces))
        hooks.append(Hook(poison, stages=(Stage.AFTER_COMPUTE,)))
    return NVE(LJ, dt=2.0, convergence=ConvergenceHook((criterion,)), hooks=hooks)


@pytest.mark.parametrize("refill_frequency", [1, 10])
def test_every_sample_leaves_exactly_once(refill_frequency):
    n = 5000 if refill_frequency == 10 else 1500
    dataset = clusters(n, seed=refill_frequency)
    sampler = SizeAwareSampler(dataset, nj.Capacity(64, 640))
    sinks = [HostMemory(capacity=400), HostMemory(capacity=700), HostMemory()]
    result = staggered_nve(fail_every=97).run(sampler=sampler, sinks=sinks, refill_frequency=refill_frequency)
    assert_each_sample_left_once(result, sinks, dataset, fail_every=97)
    assert len(sinks[0]) == 400 and len(sinks[1]) == 700          # full sinks overflowed to the next


def assert_each_sample_left_once(result, sinks, dataset, fail_every):
    """What an inflight run of :func:`staggered_nve` over ``dataset`` wrote to ``sinks``: every
    sample once, those failed that should, the others after their own number of steps, each
    frame with its own sample's atoms."""
    n = len(dataset)
    frames = Frames.concatenate([s.read() for s in sinks])
    ids = np.sort(frames.sample_id)
    np.testing.assert_array_equal(ids, np.arange(n))            # none lost, none duplicated
    failed = frames.sample_id[frames.status == status.FAILED]
    np.testing.assert_array_equal(np.sort(failed), np.arange(0, n, fail_every))
    assert np.all(frames.failure[frames.status == status.FAILED] == status.Failure.NONFINITE_FORCES)
    ok = frames.status != status.FAILED
    np.testing.assert_array_equal(frames.step[ok], frames.sample_id[ok] % 5 + 1)
    # Each frame holds its own sample's atoms.
    sizes = np.array([len(d["atomic_numbers"]) for d in dataset])
    np.testing.assert_array_equal(frames.n_atoms, sizes[frames.sample_id])
    assert result.written == n and result.failed == len(failed) and result.unfinished == []
    assert 0 < result.padding_efficiency <= 1 and 0 < result.occupancy <= 1
    return frames


def test_full_sinks_apply_back_pressure_and_report():
    dataset = clusters(30)
    sampler = SizeAwareSampler(dataset, nj.Capacity(8, 128))
    with pytest.raises(RuntimeError, match="sinks are full"):
        staggered_nve().run(sampler=sampler, sinks=[HostMemory(capacity=10)], refill_frequency=2)


def test_refill_never_recompiles():
    dataset = clusters(600, seed=5)
    dyn = staggered_nve()
    warm = SizeAwareSampler(dataset[:50], nj.Capacity(16, 200))
    dyn.run(sampler=warm, sinks=[HostMemory()], refill_frequency=1)
    sampler = SizeAwareSampler(dataset, nj.Capacity(16, 200))
    with count_compilations() as n:
        result = dyn.run(sampler=sampler, sinks=[HostMemory()], refill_frequency=1)
    assert result.refills > 100
    assert n[0] == 0


def test_sampler_packs_under_budgets_and_rejects_oversized():
    sizes = [10, 50, 20, 30, 40]
    dataset = clusters(5)
    sampler = SizeAwareSampler(dataset, nj.Capacity(3, 70), sizes=sizes)
    assert sampler.take(3, 70) == [0, 1]          # 10 + 50 fit; 20 would exceed 70
    assert sampler.take(3, 55) == [2, 3]          # lookahead skips nothing it can fit
    assert sampler.take(1, 10) == [] and not sampler.exhausted
    with pytest.raises(ValueError, match="sample 1 has 50 atoms"):
        SizeAwareSampler(dataset, nj.Capacity(3, 40), sizes=sizes)


def test_sampler_takes_as_many_as_free_slots_beyond_lookahead():
    """A big batch refilled after many systems finished gets all it has room for in one
    refill, not just ``lookahead`` of them (W3 ran at 43 % occupancy before this)."""
    sizes = [10] * 1000
    sampler = SizeAwareSampler(list(range(1000)), nj.Capacity(600, 6000), sizes=sizes, lookahead=16)
    assert sampler.take(600, 6000) == list(range(600))
    assert sampler.take(5, 30) == [600, 601, 602]      # the atom budget still binds


def test_frames_select_matches_per_frame_slicing(x64):
    """Whole, contiguous and scattered selections (three code paths) against slicing each
    frame's atoms out of the ragged arrays by hand."""
    batch = argon_batch(repeats=[(2, 2, 2), (2, 2, 3), (2, 3, 3), (1, 2, 2)], sample_ids=[7, 8, 9, 10])
    frames = Frames.from_state(NVE(LJ, dt=2.0).init(batch), batch, np.asarray(batch.system_mask))
    for pick in (slice(None), slice(1, 3), np.array([3, 0, 2]), np.array([False, True, False, True])):
        chosen = np.arange(len(frames))[pick]
        got = frames.select(pick)
        np.testing.assert_array_equal(got.sample_id, frames.sample_id[chosen])
        want = np.concatenate([frames.positions[frames.offsets[i]:frames.offsets[i + 1]] for i in chosen])
        np.testing.assert_array_equal(got.positions, want)
        np.testing.assert_array_equal(got.n_atoms, frames.n_atoms[chosen])


def test_zarr_round_trip_append_and_plain_zarr(tmp_path, x64):
    batch = argon_batch(repeats=[(2, 2, 2), (2, 2, 3), (2, 3, 3)], temperature=20.0, sample_ids=[4, 5, 6])
    state = NVE(LJ, dt=2.0).init(batch)
    frames = Frames.from_state(state, batch, np.asarray(batch.system_mask))
    path = tmp_path / "run.zarr"
    with ZarrData(path, buffer_frames=2) as sink:
        sink.write(frames)
    with ZarrData(path) as sink:                 # a second run appends
        sink.write(frames.select(slice(1, 3)))
    back = read_zarr(path)
    assert len(back) == 5
    np.testing.assert_array_equal(back.select(slice(0, 3)).positions, frames.positions)
    np.testing.assert_array_equal(back.select(slice(3, 5)).energy, frames.energy[1:])
    group = zarr.open_group(str(path), mode="r")          # plain zarr, no library code
    offsets = group["offsets"][:]
    np.testing.assert_array_equal(group["positions"][offsets[1]:offsets[2]],
                                  np.asarray(state.positions)[32:80])
    assert group.attrs["format"] == "nvalchemi_jax.frames"
    atoms = back.to_atoms()
    assert atoms[4].info["sample_id"] == 6 and len(atoms[4]) == 72
    np.testing.assert_allclose(atoms[0].get_forces(), np.asarray(state.forces)[:32])


def test_gpu_buffer_matches_host_path(x64):
    batch = argon_batch(repeats=[(2, 2, 2), (2, 2, 3), (2, 3, 3)], temperature=20.0)
    state = NVE(LJ, dt=2.0).init(batch)
    chosen = np.array([True, False, True] + [False] * (batch.num_systems - 3))
    buffer = GPUBuffer(capacity=3, max_atoms=80)
    assert buffer.write_from_state(state, batch, chosen) == 2
    host = Frames.from_state(state, batch, chosen)
    got = buffer.drain()
    for f in ("positions", "forces", "atomic_numbers", "energy", "cell", "sample_id", "offsets"):
        np.testing.assert_array_equal(getattr(got, f), getattr(host, f))
    assert len(buffer) == 0
    assert buffer.write(host) == 2 and buffer.write(host) == 1 and buffer.is_full


def test_fused_equals_sequential(x64):
    """relax + md in one batch gives each system the same final structure as relaxing it
    alone and then running MD on it alone (same key, same sample id)."""
    from nvalchemi_jax.dynamics import FIRE, NVTLangevin, maxwell_boltzmann

    model = LennardJones(**ARGON, switch_on=7.5)
    relax = FIRE(model, convergence=ConvergenceHook.from_fmax(0.05))
    md = NVTLangevin(model, dt=4.0, temperature=60.0, friction=0.02, n_steps=15)
    fused = relax + md
    key = jax.random.key(7)
    batch = argon_batch(repeats=[(2, 2, 2), (2, 2, 3)], rattle=0.15, sample_ids=[3, 8])
    together = fused.run(batch, key=key, max_steps=2000, chunk_size=50)
    assert together.converged[:2].all()
    for slot, sid in enumerate([3, 8]):
        alone = argon_batch(repeats=[[(2, 2, 2), (2, 2, 3)][slot]], rattle=0.15, sample_ids=[sid])
        if slot == 1:   # the same rattled coordinates as in the mixed batch
            alone = alone.replace(positions=alone.positions.at[:48].set(batch.positions[32:80]))
        else:
            alone = alone.replace(positions=alone.positions.at[:32].set(batch.positions[:32]))
        relaxed = relax.run(alone, key=key, max_steps=2000).state
        velocities = maxwell_boltzmann(alone, 60.0, jax.random.fold_in(key, 0x5354 + 1),
                                       remove_com=md.conserves_momentum)
        start = alone.replace(positions=relaxed.positions, velocities=velocities)
        final = md.run(start, key=key).state
        atoms = np.asarray(batch.system_index) == slot
        n = int(atoms.sum())
        np.testing.assert_allclose(np.asarray(together.state.positions)[atoms],
                                   np.asarray(final.positions)[:n], atol=1e-9)


def test_sub_stage_hooks_touch_only_their_systems():
    """A hook on stage 0 zeroing forces makes its systems fly freely; systems already in
    stage 1 are untouched by it; ON_CONVERGE of stage 0 sees the systems leaving it."""
    batch = argon_batch(repeats=[(2, 2, 2)] * 2, temperature=40.0, sample_ids=[0, 1])
    free_flight = Hook(lambda s, b, ctx: s.replace(forces=jnp.zeros_like(s.forces)), stages=(Stage.AFTER_COMPUTE,))
    left = []
    on_leave = Hook(lambda s, b, ctx: (jax.debug.callback(lambda c: left.append(np.asarray(c).tolist()),
                                                          ctx.converged, ordered=True), s)[1],
                    stages=(Stage.ON_CONVERGE,))
    # Sample 0 leaves stage 0 after 1 step, sample 1 after 3 steps.
    leave = Criterion("custom", 0.0, custom=lambda s, b: (1 + 2 * b.sample_id - s.step).astype(s.energy.dtype))
    first = NVE(LJ, dt=2.0, convergence=ConvergenceHook((leave,)), hooks=[free_flight, on_leave])
    second = NVE(LJ, dt=2.0, n_steps=50)
    fused = first + second
    state = fused.init(batch)
    start = state
    for _ in range(3):
        state = jax.jit(fused.step)(state, batch)
    jax.effects_barrier()
    one = np.asarray(batch.system_index) == 1
    # Sample 1 spent all three steps in stage 0: free flight (the initial forces were zeroed
    # only after the first compute, so the first half kick used real forces).
    v_after_first_kick = np.asarray(start.velocities + 0.5 * 2.0 * start.forces / batch.masses[:, None]
                                    * nj.units.FORCE_TO_ACCELERATION)
    np.testing.assert_allclose(np.asarray(state.velocities)[one], v_after_first_kick[one], atol=1e-6)
    zero = np.asarray(batch.system_index) == 0
    assert not np.allclose(np.asarray(state.velocities)[zero], v_after_first_kick[zero], atol=1e-6)
    assert left[0][:2] == [True, False] and left[-1][:2] == [False, True]
    assert np.asarray(state.status)[:2].tolist() == [1, 1]


def test_frames_to_batch_round_trip():
    batch = argon_batch(repeats=[(2, 2, 2), (2, 2, 3)], temperature=20.0, sample_ids=[4, 9])
    state = NVE(LJ, dt=2.0).init(batch)
    frames = Frames.from_state(state, batch, np.asarray(batch.system_mask))
    again = frames.to_batch(capacity=batch.capacity)
    for f in ("positions", "velocities", "atomic_numbers", "masses", "system_index", "atom_mask", "cell",
              "pbc", "n_atoms", "system_mask", "sample_id"):
        np.testing.assert_array_equal(np.asarray(getattr(again, f)), np.asarray(getattr(batch, f)))
    with pytest.raises(ValueError, match="sample ids repeat"):
        Frames.concatenate([frames, frames]).to_batch()


def test_inflight_hands_each_chunk_over_once_in_order():
    """Observer rows of an inflight run: every engine step once, in step order (a chunk's
    rows are handed over while the next refill and chunk run)."""
    seen = []
    observer = Hook(record=lambda s, b, ctx: {"sample_id": b.sample_id}, frequency=1,
                    on_host=lambda records, due, steps: seen.append(steps.tolist()))
    dyn = staggered_nve()
    dyn = NVE(LJ, dt=2.0, convergence=dyn.convergence, hooks=[observer])
    result = dyn.run(sampler=SizeAwareSampler(clusters(300, seed=3), nj.Capacity(16, 208)),
                     sinks=[HostMemory()], refill_frequency=3)
    assert len(seen) == result.chunks
    assert [s for chunk in seen for s in chunk] == list(range(result.steps))


def test_inflight_refill_that_overflows_the_neighbor_list_regrows(x64):
    """The first batch holds 4-atom clusters (a narrow list); later 13-atom ones overflow it
    at a refill. The list grows, nothing is lost, and every sample ends as it does in one
    fixed batch of all samples (whose list was sized for all of them)."""
    dataset = clusters(16, seed=1, low=4, high=5) + clusters(40, seed=2, low=13, high=14)
    dyn = staggered_nve()
    sink = HostMemory()
    result = dyn.run(sampler=SizeAwareSampler(dataset, nj.Capacity(16, 208)), sinks=[sink], refill_frequency=2)
    assert result.regrows >= 1 and result.written == len(dataset)
    frames = sink.read()
    frames = frames.select(np.argsort(frames.sample_id))
    np.testing.assert_array_equal(frames.sample_id, np.arange(len(dataset)))

    batch = nj.Batch.from_arrays(positions=[d["positions"] for d in dataset],
                                 atomic_numbers=[d["atomic_numbers"] for d in dataset])
    fixed = dyn.run(batch, max_steps=10)
    assert fixed.regrows == 0 and fixed.converged[np.asarray(batch.system_mask)].all()
    reference = Frames.from_state(fixed.state, batch, np.asarray(batch.system_mask))
    np.testing.assert_array_equal(frames.step, reference.step)
    np.testing.assert_allclose(frames.energy, reference.energy, rtol=1e-10)
    np.testing.assert_allclose(frames.positions, reference.positions, atol=1e-10)


def test_sampler_prefetch_gives_the_same_systems_and_leaves_errors_to_systems():
    dataset = clusters(6)
    dataset[4] = {**dataset[4], "positions": np.full_like(dataset[4]["positions"], np.nan)}
    plain = SizeAwareSampler(dataset, nj.Capacity(8, 100))
    ahead = SizeAwareSampler(dataset, nj.Capacity(8, 100))
    ahead.prefetch(6)                               # sample 4 is bad: nothing cached, no error yet
    ahead.prefetch(3)
    assert set(ahead._ready) == {0, 1, 2}
    for a, b in zip(ahead.systems([0, 1, 2]), plain.systems([0, 1, 2])):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert not ahead._ready
    with pytest.raises(ValueError, match=r"sample_id 4\).*non-finite"):
        ahead.systems([3, 4])


def test_frames_from_state_with_scattered_atoms(x64):
    """Atoms of a system need not be contiguous or sorted (inflight refills scatter them):
    each frame holds its system's atoms in index order, frames in slot order."""
    batch = argon_batch(repeats=[(2, 2, 2), (2, 2, 3), (1, 2, 2)], sample_ids=[5, 6, 7])
    rng = np.random.default_rng(0)
    perm = rng.permutation(batch.num_atoms)
    scattered = jax.tree.map(lambda x: x[perm] if x.shape[:1] == (batch.num_atoms,) else x, batch)
    state = NVE(LJ, dt=2.0).init(scattered)
    chosen = np.zeros(batch.num_systems, bool)
    chosen[[0, 2]] = True
    frames = Frames.from_state(state, scattered, chosen)
    index = np.asarray(scattered.system_index)
    for f, slot in enumerate([0, 2]):
        atoms = np.flatnonzero(index == slot)
        np.testing.assert_array_equal(frames.positions[frames.offsets[f]:frames.offsets[f + 1]],
                                      np.asarray(state.positions)[atoms])
    np.testing.assert_array_equal(frames.sample_id, [5, 7])
    np.testing.assert_array_equal(frames.n_atoms, [32, 16])
