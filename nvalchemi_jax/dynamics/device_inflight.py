"""Inflight batching with the dataset on the device: refills decided inside the compiled loop.

:mod:`~nvalchemi_jax.dynamics.inflight` refills between chunks on the host: it reads the
finished systems, builds the next batch and uploads it, and keeps one chunk queued ahead so
the device does not wait, so a finished system's slot stays idle for one to two chunks.
When the dataset fits in device memory, ``run(sampler=..., on_device=True)`` instead
uploads every sample once (the *pool*: one padded batch of all samples, each sample's atoms
contiguous) and runs many periods of ``refill_frequency`` steps in one compiled call:

1. the period's steps (the engine's scan: hooks, records and convergence as in any run);
2. systems that finished (exit status or FAILED) copy their results into per-sample
   buffers on the device and free their slots;
3. the next samples of the pool, in dataset order, as many as fit the free slots and
   atoms (a prefix: a sample that does not fit waits for room), take the free slots in
   slot order and the free atom slots in atom order; their stage variables are set and
   the forces computed (:func:`~nvalchemi_jax.dynamics.inflight.refill_state`, as the
   host loop does).

The host waits once per call (about ``chunk_size`` steps) for a few numbers: whether the
neighbor list overflowed (the call is then redone from its start with a larger list), the
steps taken, what is left. Observers get their records after each call. Frames reach the
sinks when the run ends, in dataset order (a full sink never drops them: what no sink takes
is kept on the error raised). The pool's shapes are rounded up (at most 1/8 more), so
datasets of similar sizes share one compilation.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from nvalchemi_jax import _validation
from nvalchemi_jax.neighbors import _search_method
from nvalchemi_jax.batch import ATOM_FIELDS, PADDING, Batch, gather_systems
from nvalchemi_jax.capacity import Capacity
from nvalchemi_jax.dynamics import status as status_codes
from nvalchemi_jax.dynamics.inflight import InflightResult, refill_state
from nvalchemi_jax.dynamics.run import (CHUNK_COMPILER_OPTIONS, _observers, _Progress, chunk_steps,
                                        hand_over, regrown)
from nvalchemi_jax.dynamics.sinks import write_all
from nvalchemi_jax.frames import Frames

SYSTEM_FIELDS = ("cell", "pbc", "n_atoms", "system_mask", "sample_id")
UNLIMITED = 2**30          # steps of a run without a budget (and the most one call's budget holds)


@struct.dataclass
class Results:
    """Per-sample results on the device, in pool order: what a frame holds that the pool
    does not. ``done``: the sample finished (converged, left the last stage, or failed)."""

    positions: jax.Array
    velocities: jax.Array
    forces: jax.Array
    cell: jax.Array
    stress: jax.Array
    energy: jax.Array
    status: jax.Array
    failure: jax.Array
    step: jax.Array
    done: jax.Array


@struct.dataclass
class Slots:
    """What the compiled loop carries besides the state: the batch, which pool sample each
    system slot (``source (S,)``, -1: empty) and atom slot (``pool_atom (N,)``) holds, the
    next pool sample to start (``cursor``) and the results so far."""

    batch: Batch
    source: jax.Array
    pool_atom: jax.Array
    cursor: jax.Array
    results: Results


def bucket(n: int) -> int:
    """``n`` rounded up to a multiple of an eighth of its power of two (at most 1/8 more)."""
    step = 1 << max(0, int(n).bit_length() - 4)
    return -(-int(n) // step) * step


def _record(slots: Slots, state, finished) -> Slots:
    """The finished systems' results written to their samples' places."""
    batch, res = slots.batch, slots.results
    n_samples, n_pool_atoms = res.energy.shape[0], res.positions.shape[0]
    sample = jnp.where(finished, slots.source, n_samples)          # past the end: dropped
    atom = jnp.where(gather_systems(finished, batch.system_index, False), slots.pool_atom, n_pool_atoms)
    per_atom = lambda out, x: out.at[atom].set(x.astype(out.dtype), mode="drop")
    per_sample = lambda out, x: out.at[sample].set(x.astype(out.dtype), mode="drop")
    return slots.replace(results=res.replace(
        positions=per_atom(res.positions, state.positions), velocities=per_atom(res.velocities, state.velocities),
        forces=per_atom(res.forces, state.forces), cell=per_sample(res.cell, state.cell),
        stress=per_sample(res.stress, state.stress), energy=per_sample(res.energy, state.energy),
        status=per_sample(res.status, state.status), failure=per_sample(res.failure, state.failure),
        step=per_sample(res.step, state.step), done=per_sample(res.done, finished)))


def _room(slots: Slots, pool: Batch, count, free, atom_free):
    """How many of the next pool samples fit the free slots and atoms (a prefix), and the
    running atom count of the next ``S`` samples."""
    n_sys = free.shape[0]
    ahead = slots.cursor + jnp.arange(n_sys, dtype=jnp.int32)
    exists = ahead < count
    # Past the last sample: size 1 (the running sum stays within int32), never taken.
    sizes = jnp.where(exists, pool.n_atoms[jnp.minimum(ahead, pool.num_systems - 1)], 1)
    running = jnp.cumsum(sizes)
    fits = exists & (jnp.arange(n_sys) < jnp.sum(free)) & (running <= jnp.sum(atom_free))
    return jnp.sum(fits, dtype=jnp.int32), sizes, running


def _blend(put, value, clear, fill, old):
    """``value`` where ``put``, ``fill`` where ``clear``, else ``old`` (masks over the first axis)."""
    mask = lambda m: m.reshape(m.shape + (1,) * (old.ndim - 1))
    return jnp.where(mask(put), value, jnp.where(mask(clear), jnp.asarray(fill, old.dtype), old))


def _place(slots: Slots, pool: Batch, starts, taken, sizes, running, finished):
    """The batch with ``finished`` slots cleared and ``taken`` next pool samples placed:
    the k-th new sample takes the k-th free slot and atoms ``running[k-1]..running[k]`` of
    the free atoms in order. Returns ``(slots, new (S,))``."""
    batch = slots.batch
    n_sys = batch.num_systems
    atom_finished = gather_systems(finished, batch.system_index, False)
    free = ~batch.system_mask | finished
    atom_free = ~batch.atom_mask | atom_finished
    free_count = jnp.cumsum(free.astype(jnp.int32))
    new = free & (free_count <= taken)
    source = slots.cursor + free_count - 1                            # pool sample of a new slot
    rank = jnp.cumsum(atom_free.astype(jnp.int32)) - 1
    total = jnp.where(taken > 0, running[jnp.maximum(taken - 1, 0)], 0)
    gets = atom_free & (rank < total)
    # Which new sample an atom slot gets, its atom within that sample, and the sample's slot
    # (the k-th free one).
    k = jnp.clip(jnp.searchsorted(running, rank, side="right", method=_search_method()), 0, n_sys - 1)
    pool_atom = starts[jnp.minimum(slots.cursor + k, starts.shape[0] - 1)] + rank - (running[k] - sizes[k])
    pool_atom = jnp.where(gets, pool_atom, 0)
    slot = jnp.searchsorted(free_count, k + 1, side="left", method=_search_method()).astype(jnp.int32)
    cleared_atom, cleared = atom_finished & ~gets, finished & ~new
    pick = jnp.clip(source, 0, pool.num_systems - 1)
    fields = {f: _blend(gets, getattr(pool, f)[pool_atom], cleared_atom, PADDING[f], getattr(batch, f))
              for f in ATOM_FIELDS}
    fields.update({f: _blend(new, getattr(pool, f)[pick], cleared, PADDING[f], getattr(batch, f))
                   for f in SYSTEM_FIELDS})
    fields["system_index"] = _blend(gets, slot, cleared_atom, n_sys, batch.system_index)
    fields["atom_mask"] = _blend(gets, True, cleared_atom, False, batch.atom_mask)
    slots = slots.replace(
        batch=batch.replace(**fields), source=_blend(new, source, cleared, -1, slots.source),
        pool_atom=_blend(gets, pool_atom, cleared_atom, -1, slots.pool_atom), cursor=slots.cursor + taken)
    return slots, new


def _period(dyn, pool, starts, count, length, carry, _):
    """One period: up to ``length`` steps, then the refill (skipped when nothing finished and
    nothing fits, or once the call stopped)."""
    state, slots, budget, stopped = carry
    batch = slots.batch
    limit = jnp.where(stopped, 0, jnp.minimum(length, budget))
    state, (buffers, flags) = chunk_steps(dyn, state, batch, limit, length)
    overflow, went = flags[0] > 0, flags[1]
    finished = batch.system_mask & ((state.status == dyn.exit_status) | (state.status == status_codes.FAILED))
    free = ~batch.system_mask | finished
    atom_free = ~batch.atom_mask | gather_systems(finished, batch.system_index, False)
    budget = budget - went
    taken, sizes, running = _room(slots, pool, count, free, atom_free)
    taken = jnp.where(budget > 0, taken, 0)        # no new samples once the step budget is spent
    go = ~stopped & ~overflow & (jnp.any(finished) | (taken > 0))

    def refill(state, slots):
        slots = _record(slots, state, finished)
        slots, new = _place(slots, pool, starts, taken, sizes, running, finished)
        return refill_state(dyn, state, batch, slots.batch, finished, new), slots

    state, slots = jax.lax.cond(go, refill, lambda state, slots: (state, slots), state, slots)
    left = jnp.any(slots.batch.system_mask) | (slots.cursor < count)
    ran = went > 0
    stats = (buffers, went, go, jnp.where(ran, jnp.mean(batch.system_mask), 0.0),
             jnp.where(ran, jnp.mean(batch.atom_mask), 0.0), ran)
    return (state, slots, budget, stopped | overflow | (budget <= 0) | ~left), (overflow, stats)


@functools.partial(jax.jit, static_argnames=("length", "periods"), compiler_options=CHUNK_COMPILER_OPTIONS)
def advance(dyn, state, slots: Slots, pool: Batch, starts, count, budget, length: int, periods: int):
    """``periods`` periods of ``length`` steps and a refill each, in one compiled call.
    Returns ``(state, slots, budget, flags, stats)``; ``flags (5,) int32`` = (neighbor-list
    overflow, steps taken, systems in the batch, next pool sample, samples done)."""
    body = functools.partial(_period, dyn, pool, starts, count, length)
    init = (state, slots, budget, budget <= 0)
    (state, slots, budget, _), (overflow, stats) = jax.lax.scan(body, init, None, length=periods)
    flags = jnp.stack([jnp.any(overflow).astype(jnp.int32), jnp.sum(stats[1], dtype=jnp.int32),
                       jnp.sum(slots.batch.system_mask, dtype=jnp.int32), slots.cursor,
                       jnp.sum(slots.results.done, dtype=jnp.int32)])
    return state, slots, budget, flags, stats


def _pool(systems) -> tuple[Batch, np.ndarray]:
    """All samples in one batch (shapes rounded up by :func:`bucket`) and each sample's
    first atom ``(P,)``."""
    sizes = _validation.sizes_of(systems)
    capacity = Capacity(bucket(len(sizes)), bucket(int(sizes.sum())))
    pool = Batch._pack(systems, capacity)
    starts = np.zeros(capacity.num_systems, np.int32)
    starts[:len(sizes)] = np.cumsum(sizes) - sizes
    starts[len(sizes):] = sizes.sum()
    return pool, starts


def _empty_results(pool: Batch, dtype) -> Results:
    n_samples, n_atoms = pool.num_systems, pool.num_atoms
    z = lambda *shape, dt=dtype: jnp.zeros(shape, dt)
    return Results(positions=z(n_atoms, 3), velocities=z(n_atoms, 3), forces=z(n_atoms, 3),
                   cell=z(n_samples, 3, 3), stress=z(n_samples, 3, 3), energy=z(n_samples),
                   status=z(n_samples, dt=jnp.int32), failure=z(n_samples, dt=jnp.int32),
                   step=z(n_samples, dt=jnp.int32), done=z(n_samples, dt=bool))


def _frames(results: Results, pool_host, sizes) -> Frames:
    """The done samples as frames, in pool order (results and pool on the host)."""
    count = len(sizes)
    done = np.asarray(results.done[:count])
    chosen = np.flatnonzero(done)
    total = int(sizes.sum())
    atoms = np.repeat(done, sizes)
    whole = bool(done.all())
    take_atoms = lambda x: np.asarray(x)[:total] if whole else np.asarray(x)[:total][atoms]
    take = lambda x: np.asarray(x)[chosen]
    p = pool_host
    return Frames(
        positions=take_atoms(results.positions), velocities=take_atoms(results.velocities),
        forces=take_atoms(results.forces), atomic_numbers=take_atoms(p.atomic_numbers),
        masses=take_atoms(p.masses), fixed=take_atoms(p.fixed), tags=take_atoms(p.tags),
        charges=take_atoms(p.charges), cell=take(results.cell), pbc=take(p.pbc),
        energy=take(results.energy), stress=take(results.stress),
        sample_id=take(p.sample_id).astype(np.int64), status=take(results.status),
        failure=take(results.failure), step=take(results.step).astype(np.int64),
        offsets=np.concatenate([[0], np.cumsum(sizes[chosen])]).astype(np.int64))


def start(dyn, sampler, indices, key=None, min_distance: float | None = 0.5):
    """The pool of the samples ``indices`` of ``sampler``, the first batch (the longest
    prefix that fits, as every refill takes them) and its state: ``(state, slots, pool,
    starts, sizes)``."""
    if not indices:
        raise ValueError("the sampler has no samples left")
    systems = sampler.systems(indices)
    sizes = _validation.sizes_of(systems)
    capacity = sampler.capacity
    first = int(min(capacity.num_systems, np.searchsorted(np.cumsum(sizes), capacity.num_atoms, "right")))
    batch = Batch._pack(systems[:first], capacity)
    pool, starts = _pool(systems)
    if min_distance is not None:
        _validation.check_close_atoms(pool, min_distance, "error")
    state = dyn.init(batch, key)
    n_first = int(sizes[:first].sum())
    source = np.full(capacity.num_systems, -1, np.int32)
    source[:first] = np.arange(first)
    pool_atom = np.full(capacity.num_atoms, -1, np.int32)
    pool_atom[:n_first] = np.arange(n_first)
    slots = Slots(batch=batch, source=jnp.asarray(source), pool_atom=jnp.asarray(pool_atom),
                  cursor=jnp.int32(first), results=_empty_results(pool, batch.positions.dtype))
    return state, slots, pool, jnp.asarray(starts), sizes


def _run(dyn, sampler, indices, key, refill_frequency, max_steps, progress, min_distance, chunk_size):
    """The compiled calls of :func:`run_on_device` until every sample finished or the step
    budget is spent: ``(state, slots, pool, sizes, counters)``."""
    state, slots, pool, starts, sizes = start(dyn, sampler, indices, key, min_distance)
    count = jnp.int32(len(sizes))
    remaining = UNLIMITED if max_steps is None else int(max_steps)
    budget = jnp.int32(min(remaining, UNLIMITED))
    observers = _observers(dyn)
    periods = -(-chunk_size // refill_frequency)
    bar = _Progress(len(sizes), slots.batch, unit="samples") if progress else None
    taken = chunks = refills = regrows = 0
    occupancy = padding = 0.0
    try:
        while True:
            new_state, new_slots, new_budget, flags, stats = advance(
                dyn, state, slots, pool, starts, count, budget, length=refill_frequency, periods=periods)
            overflow, went, live, cursor, done = (int(x) for x in np.asarray(flags))
            if overflow:
                # Redo the call from its start with a list large enough for what it needed.
                regrows += 1
                state = regrown(dyn, state, new_state, slots.batch)
                continue
            buffers, _, refilled, occ, pad, ran = jax.device_get(stats)
            if observers:
                for p in range(periods):
                    hand_over(observers, jax.tree.map(lambda x: x[p], buffers))
            state, slots, budget = new_state, new_slots, new_budget
            taken += went
            remaining -= went
            chunks += int(ran.sum())
            refills += int(refilled.sum())
            occupancy += float(occ.sum())
            padding += float(pad.sum())
            if bar is not None:
                bar.update_samples(done, np.asarray(state.status))
            if (live == 0 and cursor >= len(sizes)) or remaining <= 0:
                break
    finally:
        if bar is not None:
            bar.close()
    return state, slots, pool, sizes, (taken, chunks, refills, regrows, occupancy, padding, cursor)


def run_on_device(dyn, sampler, sinks, key=None, refill_frequency: int = 10, max_steps: int | None = None,
                  progress: bool = False, min_distance: float | None = 0.5,
                  chunk_size: int = 100) -> InflightResult:
    """Run ``dyn`` over every sample of ``sampler`` (a
    :class:`~nvalchemi_jax.dynamics.sampler.SizeAwareSampler`: all its pending samples are
    taken at once, and those not run are given back) with the dataset on the device (see
    the module docstring); ``chunk_size`` steps (rounded up to whole periods of
    ``refill_frequency``) per compiled call."""
    if refill_frequency < 1:
        raise ValueError(f"refill_frequency must be >= 1, got {refill_frequency}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not sinks:
        raise ValueError("an inflight run needs at least one sink")
    t0 = time.perf_counter()
    indices = sampler.take_all()
    try:
        state, slots, pool, sizes, stats = _run(dyn, sampler, indices, key, refill_frequency, max_steps,
                                                progress, min_distance, chunk_size)
    except BaseException:
        # Results reach the sinks only at the end: none was written, every sample can run again.
        sampler.give_back(indices)
        raise
    taken, chunks, refills, regrows, occupancy, padding, cursor = stats
    pool_host, results = jax.device_get((pool, slots.results))
    sampler.give_back(indices[cursor:])             # never started (max_steps ended the run)
    frames = _frames(results, pool_host, sizes)
    rest = write_all(frames, sinks)
    for sink in sinks:
        if hasattr(sink, "flush"):
            sink.flush()
    if len(rest):
        error = RuntimeError(f"the sinks are full: {len(rest)} finished systems cannot be written; "
                             "they are in this error's `frames`")
        error.frames = rest
        raise error
    failed = int((frames.status == status_codes.FAILED).sum())
    host_batch = jax.device_get(slots.batch)
    return InflightResult(state=state, batch=slots.batch, steps=taken, written=len(frames), failed=failed,
                          unfinished=host_batch.sample_id[host_batch.system_mask].tolist(),
                          seconds=time.perf_counter() - t0, chunks=chunks, refills=refills,
                          regrows=regrows, occupancy=occupancy / max(chunks, 1),
                          padding_efficiency=padding / max(chunks, 1))
