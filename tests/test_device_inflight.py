"""Inflight runs with the dataset on the device (``run(sampler=..., on_device=True)``): every
sample leaves exactly once, each ends as it does in a fixed batch, failures stay in their
system, and the run's bookkeeping (records, budgets, full sinks, regrowth) holds."""

import jax
import numpy as np
import pytest

import nvalchemi_jax as nj
from nvalchemi_jax.dynamics import FIRE, NVE, ConvergenceHook, Hook, NVTLangevin, status
from nvalchemi_jax.dynamics.device_inflight import bucket
from nvalchemi_jax.dynamics.sampler import SizeAwareSampler
from nvalchemi_jax.dynamics.sinks import HostMemory
from nvalchemi_jax.frames import Frames
from nvalchemi_jax.models import LennardJones

from _helpers import ARGON, count_compilations, fcc_crystal
from test_workflows import assert_each_sample_left_once, clusters, staggered_nve


def by_sample(frames):
    return frames.select(np.argsort(frames.sample_id))


def crystals(count, seed=0):
    """Rattled periodic argon crystals of 32 to 72 atoms, as dataset dicts."""
    rng = np.random.default_rng(seed)
    shapes = [(2, 2, 2), (2, 2, 3), (2, 3, 3)]
    out = []
    for _ in range(count):
        p, c = fcc_crystal(shapes[rng.integers(len(shapes))])
        out.append({"positions": p + rng.normal(0, 0.1, p.shape), "atomic_numbers": np.full(len(p), 18),
                    "cell": c, "pbc": np.ones(3, bool)})
    return out


def fixed_reference(dyn, dataset, key=None, max_steps=2000):
    """Every sample in one fixed batch (the list sized for all of them), as frames."""
    batch = nj.Batch.from_arrays(**{k: [d[k] for d in dataset] for k in dataset[0]})
    result = dyn.run(batch, key=key, max_steps=max_steps, chunk_size=50)
    mask = np.asarray(batch.system_mask)
    assert result.converged[mask].all()
    return Frames.from_state(result.state, batch, mask)


@pytest.mark.parametrize("refill_frequency", [1, 4])
def test_every_sample_leaves_exactly_once(refill_frequency):
    n = 700
    dataset = clusters(n, seed=refill_frequency)
    sampler = SizeAwareSampler(dataset, nj.Capacity(64, 640))
    sinks = [HostMemory(capacity=100), HostMemory(capacity=150), HostMemory()]
    result = staggered_nve(fail_every=97).run(sampler=sampler, sinks=sinks, refill_frequency=refill_frequency,
                                              on_device=True, chunk_size=24)
    frames = assert_each_sample_left_once(result, sinks, dataset, fail_every=97)
    assert len(sinks[0]) == 100 and len(sinks[1]) == 150
    # The failed ones are where they started.
    for f in np.flatnonzero(frames.status == status.FAILED)[:3]:
        np.testing.assert_allclose(frames.positions[frames.offsets[f]:frames.offsets[f + 1]],
                                   dataset[frames.sample_id[f]]["positions"], atol=1e-5)
    assert sampler.exhausted


def test_relaxation_matches_a_fixed_batch_and_the_host_loop(x64):
    """FIRE over periodic crystals of three sizes: every sample ends with the steps,
    positions and energy it has in one fixed batch, as in the host-driven inflight run."""
    model = LennardJones(**ARGON, switch_on=7.5)
    dyn = FIRE(model, convergence=ConvergenceHook.from_fmax(0.02))
    dataset = crystals(14)
    reference = fixed_reference(dyn, dataset)
    for on_device in (True, False):
        sink = HostMemory()
        result = dyn.run(sampler=SizeAwareSampler(dataset, nj.Capacity(4, 200)), sinks=[sink],
                         refill_frequency=3, on_device=on_device, chunk_size=12)
        frames = by_sample(sink.read())
        assert result.written == len(dataset) and result.refills > 3
        np.testing.assert_array_equal(frames.sample_id, np.arange(len(dataset)))
        np.testing.assert_array_equal(frames.step, reference.step)
        np.testing.assert_allclose(frames.positions, reference.positions, atol=1e-9)
        np.testing.assert_allclose(frames.forces, reference.forces, atol=1e-9)
        np.testing.assert_allclose(frames.energy, reference.energy, rtol=1e-10)
        np.testing.assert_array_equal(frames.cell, reference.cell)


def test_fused_relax_then_md_matches_a_fixed_batch(x64):
    """FIRE -> NVT Langevin: entering the MD stage draws velocities from the sample id, so
    each sample ends as in a fixed batch whatever slot and period it ran in."""
    model = LennardJones(**ARGON, switch_on=7.5)
    fused = FIRE(model, convergence=ConvergenceHook.from_fmax(0.05)) + NVTLangevin(
        model, dt=4.0, temperature=60.0, friction=0.02, n_steps=12)
    dataset = crystals(8, seed=3)
    key = jax.random.key(11)
    reference = fixed_reference(fused, dataset, key=key)
    sink = HostMemory()
    fused.run(sampler=SizeAwareSampler(dataset, nj.Capacity(3, 150)), sinks=[sink], key=key,
              refill_frequency=2, on_device=True, chunk_size=10)
    frames = by_sample(sink.read())
    assert np.all(frames.status == fused.exit_status)
    np.testing.assert_array_equal(frames.step, reference.step)
    np.testing.assert_allclose(frames.positions, reference.positions, atol=1e-9)
    np.testing.assert_allclose(frames.velocities, reference.velocities, atol=1e-9)


def test_refill_that_overflows_the_neighbor_list_regrows(x64):
    """The first batch holds 4-atom clusters (a narrow list); 13-atom ones placed later
    overflow it. The call is redone with a larger list; every sample ends as in a fixed batch."""
    dataset = clusters(16, seed=1, low=4, high=5) + clusters(40, seed=2, low=13, high=14)
    dyn = staggered_nve()
    sink = HostMemory()
    result = dyn.run(sampler=SizeAwareSampler(dataset, nj.Capacity(16, 208)), sinks=[sink],
                     refill_frequency=2, on_device=True, chunk_size=8)
    assert result.regrows >= 1 and result.written == len(dataset)
    frames = by_sample(sink.read())
    reference = fixed_reference(dyn, dataset, max_steps=10)
    np.testing.assert_array_equal(frames.step, reference.step)
    np.testing.assert_allclose(frames.energy, reference.energy, rtol=1e-10)
    np.testing.assert_allclose(frames.positions, reference.positions, atol=1e-10)


def test_observers_get_every_step_once_in_order():
    seen = []
    observer = Hook(record=lambda s, b, ctx: {"sample_id": b.sample_id}, frequency=1,
                    on_host=lambda records, due, steps: seen.append(steps.tolist()))
    dyn = NVE(LennardJones(**ARGON, shift=True), dt=2.0, convergence=staggered_nve().convergence,
              hooks=[observer])
    result = dyn.run(sampler=SizeAwareSampler(clusters(200, seed=3), nj.Capacity(16, 208)),
                     sinks=[HostMemory()], refill_frequency=3, on_device=True, chunk_size=9)
    assert len(seen) == result.chunks
    assert [s for chunk in seen for s in chunk] == list(range(result.steps))


def test_step_budget_reports_unfinished_and_returns_unstarted_samples():
    dataset = clusters(100, seed=4)
    sampler = SizeAwareSampler(dataset, nj.Capacity(8, 104))
    sink = HostMemory()
    result = staggered_nve().run(sampler=sampler, sinks=[sink], refill_frequency=2, max_steps=6,
                                 on_device=True, chunk_size=4)
    assert result.steps == 6
    done = set(sink.read().sample_id.tolist())
    unfinished = set(result.unfinished)
    assert done and unfinished and not done & unfinished
    # Only samples that stepped are unfinished: none was placed after the budget was spent.
    assert np.all(np.asarray(result.state.step)[np.asarray(result.batch.system_mask)] > 0)
    # What never started is back in the sampler, in dataset order, for a later run.
    rest = list(sampler._pending)
    assert rest == sorted(set(range(100)) - done - unfinished)
    assert sampler.handed_out == len(done) + len(unfinished)


def test_full_sinks_raise_with_the_frames_they_could_not_take():
    dataset = clusters(30)
    sink = HostMemory(capacity=10)
    with pytest.raises(RuntimeError, match="sinks are full") as info:
        staggered_nve().run(sampler=SizeAwareSampler(dataset, nj.Capacity(8, 128)), sinks=[sink],
                            refill_frequency=2, on_device=True)
    kept = info.value.frames
    assert len(sink) == 10 and len(kept) == 20
    np.testing.assert_array_equal(np.sort(np.concatenate([sink.read().sample_id, kept.sample_id])),
                                  np.arange(30))


def test_similar_datasets_share_one_compilation():
    dyn = staggered_nve()
    run = lambda data: dyn.run(sampler=SizeAwareSampler(data, nj.Capacity(16, 200)), sinks=[HostMemory()],
                               refill_frequency=2, on_device=True, chunk_size=8)
    run(clusters(300, seed=5))
    with count_compilations() as n:
        result = run(clusters(290, seed=6))
    assert result.written == 290 and result.refills > 20
    assert n[0] == 0
    assert [bucket(n) for n in (1, 15, 16, 17, 290, 300)] == [1, 15, 16, 18, 320, 320]


def test_a_run_that_raises_gives_every_sample_back():
    """Results reach the sinks at the end: when the run stops on an error (here two atoms
    of sample 7 on top of each other, found before any step) no sample is lost from the
    sampler."""
    dataset = clusters(20, seed=8)
    dataset[7] = {**dataset[7], "positions": np.concatenate([dataset[7]["positions"][:1],
                                                             dataset[7]["positions"][:-1]])}
    sampler = SizeAwareSampler(dataset, nj.Capacity(8, 104))
    with pytest.raises(ValueError, match=r"(?s)closer than.*sample_id 7\)"):
        staggered_nve().run(sampler=sampler, sinks=[HostMemory()], on_device=True)
    assert sampler.remaining == 20 and sampler.handed_out == 0
