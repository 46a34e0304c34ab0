"""Inflight batching: finished systems leave for the sinks and free slots are refilled
from a sampler between chunks, with fixed shapes (no recompilation) and no data lost.

Every ``refill_frequency`` steps (one compiled chunk), on the host:

1. systems at the exit status or FAILED are copied out as :class:`Frames` and
   offered to the sinks in priority order; those no sink can take keep their
   slots (back-pressure) and are offered again next time;
2. written slots are freed and the sampler hands out samples that fit the free
   slots and atoms;
3. the host writes the new batch (it keeps the only copy the host reads: the
   device's batch changes only through refills, so it never needs fetching) and
   one jitted :func:`refill` clears the freed slots of the state, places the new
   systems (atoms of a system need not be contiguous), initialises their stage
   variables, marks their neighbor rows stale and computes their forces.

Host and device overlap: the refill and the next chunk are launched together from
the run loop's worker thread, one chunk ahead: while the device runs chunk k + 1,
the host reads chunk k, writes its finished systems and builds the refill that
follows chunk k + 1 (a slot is reused one chunk after its system finished, and the
device never waits for the host's batch building); it also hands the last records
to observers and validates the next samples then. It waits once per chunk, for the
per-system fields it needs (per-atom ones are copied in the background and read
only when a system finished).

Every sample that enters leaves exactly once: written to a sink (failed ones
with their failure code), or, if ``max_steps`` stops the run first, reported
in ``result.unfinished``.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

from nvalchemi_jax._validation import sizes_of
from nvalchemi_jax.batch import ATOM_FIELDS, PADDING, Batch, gather_systems
from nvalchemi_jax.dynamics import status as status_codes
from nvalchemi_jax.dynamics.base import blend_stage
from nvalchemi_jax.dynamics.run import CHUNK_COMPILER_OPTIONS, _observers, _Progress, dispatch, hand_over, regrown
from nvalchemi_jax.dynamics.sinks import write_all
from nvalchemi_jax.frames import Frames
from nvalchemi_jax import neighbors


@dataclasses.dataclass
class InflightResult:
    """What an inflight run returns. written: frames written to the sinks (graduated and
    failed); failed: how many of those failed; unfinished: sample ids still in the batch when
    ``max_steps`` ended the run; occupancy: mean fraction of system slots filled;
    padding_efficiency: mean fraction of atom slots holding real atoms."""

    state: object
    batch: object
    steps: int
    written: int
    failed: int
    unfinished: list
    seconds: float
    chunks: int
    refills: int
    regrows: int
    occupancy: float
    padding_efficiency: float


def refill_state(dyn, state, old, batch, freed, new):
    """The state for ``batch`` (the refilled batch, built on the host or, in
    :mod:`~nvalchemi_jax.dynamics.device_inflight`, on the device): ``freed (S,)`` slots
    of ``old`` cleared, ``new (S,)`` slots started. Fixed shapes: never recompiles.
    The new systems' neighbor rows may overflow the list: the next chunk's flags tell."""
    n_atoms = batch.num_atoms
    atom_freed = gather_systems(freed, old.system_index, False)
    new_atom = gather_systems(new, batch.system_index, False)
    rows_cleared = atom_freed & ~new_atom
    nl = state.neighbors
    nl = neighbors.mark_stale(nl.replace(indices=jnp.where(rows_cleared[:, None], n_atoms, nl.indices)), new)
    code = jnp.where(new, dyn.status_code, jnp.where(freed, status_codes.EMPTY, state.status))
    state = state.replace(
        positions=jnp.where(new_atom[:, None], batch.positions, jnp.where(atom_freed[:, None], 0.0, state.positions)),
        velocities=jnp.where(new_atom[:, None], batch.velocities,
                             jnp.where(atom_freed[:, None], 0.0, state.velocities)),
        cell=jnp.where(new[:, None, None], batch.cell, state.cell),
        status=code.astype(jnp.int32), failure=jnp.where(new | freed, 0, state.failure),
        step=jnp.where(new | freed, 0, state.step), neighbors=nl)
    state = state.replace(stage=blend_stage(new, dyn.init_stage(state, batch), state.stage, batch))
    state = dyn.compute(state, batch)
    state = state.replace(previous_energy=jnp.where(new, jnp.inf, state.previous_energy))
    return dyn._mark_failures(state, state, batch, new)


# Launched with the next chunk from the same worker: compiled like the chunks, so that its
# neighbor-list rebuild (a conditional) does not hold the launch up on a GPU.
refill = jax.jit(refill_state, compiler_options=CHUNK_COMPILER_OPTIONS)


def refilled_batch(host: Batch, freed: np.ndarray, systems: list[dict], slots: np.ndarray,
                   atom_slots: np.ndarray) -> Batch:
    """The batch after a refill, built on the host (numpy leaves): ``freed (S,)`` slots
    cleared, ``systems`` (validated sampler output) written into ``slots`` and, atom by
    atom in order, into the free atom slots ``atom_slots``. Whole-field copies, no loop
    over systems."""
    n_sys = host.num_systems
    sizes = sizes_of(systems)
    dst = atom_slots[:int(sizes.sum())]
    # Freed atoms that no new system takes (usually few): the only ones set to the fill.
    atom_freed = np.append(freed, False)[host.system_index]
    atom_freed[dst] = False
    cleared = np.flatnonzero(atom_freed)
    out = {}
    for field in ATOM_FIELDS:
        x = np.array(getattr(host, field))
        x[cleared] = PADDING[field]
        if systems:
            x[dst] = np.concatenate([s[field] for s in systems])
        out[field] = x
    system_index = np.array(host.system_index)
    system_index[cleared] = n_sys
    system_index[dst] = np.repeat(slots, sizes)
    atom_mask = np.array(host.atom_mask)
    atom_mask[cleared] = PADDING["atom_mask"]
    atom_mask[dst] = True
    values = {"cell": [s["cell"] for s in systems], "pbc": [s["pbc"] for s in systems], "n_atoms": sizes,
              "system_mask": True, "sample_id": [s["sample_id"] for s in systems]}
    for field in values:
        x = np.array(getattr(host, field))
        x[freed] = PADDING[field]
        if systems:
            x[slots] = values[field]
        out[field] = x
    return host.replace(system_index=system_index, atom_mask=atom_mask, **out)


_VIEW_FIELDS = ("status", "failure", "step", "energy", "cell", "stress")


def _view(state, flags=None):
    """What the host reads of ``state`` between chunks: the per-system fields and ``flags``
    in one wait; the per-atom fields' copies start now and are waited for only if read
    (:meth:`Frames.from_state` reads them when systems finished)."""
    for x in (state.positions, state.velocities, state.forces):
        x.copy_to_host_async()
    small, flags = jax.device_get(({f: getattr(state, f) for f in _VIEW_FIELDS}, flags))
    view = types.SimpleNamespace(positions=state.positions, velocities=state.velocities,
                                 forces=state.forces, **small)
    return view, flags


@dataclasses.dataclass
class _Launch:
    """A launched chunk, and what the host needs to redo it or to read around it."""

    chunk: object           # run.Chunk
    batch: object           # the batch it runs with (after its refill)
    prepare: object         # its refill, or None
    limit: int
    freed: np.ndarray       # slots its refill cleared / started
    new: np.ndarray


def _refilled_status(view, dyn, freed, new):
    """``view.status`` as a refill sets it (new systems failing at once show up later)."""
    view.status = np.where(new, dyn.status_code,
                           np.where(freed, status_codes.EMPTY, view.status)).astype(view.status.dtype)


def run_inflight(dyn, sampler, sinks, key=None, refill_frequency: int = 10, max_steps: int | None = None,
                 progress: bool = False, min_distance: float | None = 0.5) -> InflightResult:
    """Run ``dyn`` over every sample of ``sampler``, writing finished systems to ``sinks``."""
    if refill_frequency < 1:
        raise ValueError(f"refill_frequency must be >= 1, got {refill_frequency}")
    if not sinks:
        raise ValueError("an inflight run needs at least one sink")
    t0 = time.perf_counter()
    batch = sampler.initial_batch(min_distance)
    state = dyn.init(batch, key)
    host = jax.device_get(batch)            # the host's copy of the batch, kept in step by refills
    exit_status = dyn.exit_status
    observers = _observers(dyn)
    bar = _Progress(len(sampler), batch, unit="samples") if progress else None
    taken = chunks = refills = regrows = written = failed = 0
    occupancy, padding = [], []
    view, _ = _view(state)
    records = None                          # the last chunk's observer rows, not yet handed over
    # Chunks launched and not yet read, oldest first. One is kept queued ahead: the host
    # builds the next refill from the last chunk read while the device runs the next one,
    # and the refill is applied after that one (a finished system's slot is reused one
    # chunk later, and the device does not wait for the host).
    launched: list[_Launch] = []
    try:
        while True:
            mask = host.system_mask
            # Slots a launched refill changes: `view` predates it, so they are not read here.
            touched = np.zeros_like(mask)
            for launch in launched:
                touched |= launch.freed | launch.new
            finished = mask & ~touched & ((view.status == exit_status) | (view.status == status_codes.FAILED))
            freed = np.zeros_like(mask)
            if finished.any():
                frames = Frames.from_state(view, host, finished)
                rest = write_all(frames, sinks)
                n_written = len(frames) - len(rest)
                freed[np.flatnonzero(finished)[:n_written]] = True
                written += n_written
                failed += int((frames.status[:n_written] == status_codes.FAILED).sum())
            atom_freed = np.append(freed, False)[host.system_index]
            free_atoms = np.flatnonzero(~host.atom_mask | atom_freed)
            free_slots = np.flatnonzero(~mask | freed)
            indices = sampler.take(len(free_slots), len(free_atoms)) if len(free_slots) else []
            new = np.zeros_like(mask)
            prepare = None          # the refill, launched with the next chunk
            if freed.any() or indices:
                systems = sampler.systems(indices)
                slots = free_slots[:len(systems)]
                new[slots] = True
                new_host = refilled_batch(host, freed, systems, slots, free_atoms)
                new_batch, freed_d, new_d = jax.device_put((new_host, freed, new))
                prepare = functools.partial(refill, dyn, old=batch, batch=new_batch, freed=freed_d, new=new_d)
                batch, host = new_batch, new_host
                refills += 1
                _refilled_status(view, dyn, freed, new)
            if bar is not None:
                bar.update_samples(written, view.status)
            running = np.any(dyn.running(view, host))
            planned = lambda: taken + sum(x.limit for x in launched)    # steps taken or launched
            room = lambda: max_steps is None or planned() < max_steps
            if (running or prepare is not None) and room():
                # A chunk with nothing to step still applies its refill (its steps are skipped).
                limit = refill_frequency if max_steps is None else min(refill_frequency, max_steps - planned())
                start = launched[-1].chunk if launched else state
                launched.append(_Launch(dispatch(dyn, start, batch, limit, refill_frequency, prepare=prepare),
                                        batch, prepare, limit, freed, new))
            if len(launched) == 1 and running and room():
                continue            # keep one chunk queued ahead before waiting
            if not launched:
                waiting = host.system_mask & ((view.status == exit_status) | (view.status == status_codes.FAILED))
                if (sampler.exhausted and not host.system_mask.any()) or (max_steps is not None and taken >= max_steps):
                    break
                if waiting.any() and not indices and not freed.any():
                    hand_over(observers, records)
                    records = None
                    raise RuntimeError(f"the sinks are full: {int(waiting.sum())} finished systems cannot be "
                                       "written; add a sink or drain one")
                continue
            # Host work while the device runs: the last records, the next samples' validation.
            hand_over(observers, records)
            records = None
            if hasattr(sampler, "prefetch"):
                sampler.prefetch(len(indices))
            oldest = launched.pop(0)
            view, flags = _view(oldest.chunk.state, oldest.chunk.flags)
            overflowed, went, _ = (int(x) for x in flags)
            chunks += went > 0      # (a refill with nothing to step launches an empty chunk)
            if overflowed:
                # Redo the chunk from a larger list (forces again too if its refill overflowed),
                # and the chunk queued after it.
                regrows += 1
                start = regrown(dyn, oldest.chunk.start, oldest.chunk.state, oldest.batch)
                none = np.zeros_like(oldest.freed)     # its refill is in `start` already
                redo = [_Launch(dispatch(dyn, start, oldest.batch, oldest.limit, refill_frequency),
                                oldest.batch, None, oldest.limit, none, none)]
                for launch in launched:
                    redo.append(dataclasses.replace(launch, chunk=dispatch(
                        dyn, redo[-1].chunk, launch.batch, launch.limit, refill_frequency, prepare=launch.prepare)))
                launched = redo
                view, _ = _view(start)
                for launch in launched[1:]:
                    _refilled_status(view, dyn, launch.freed, launch.new)
                continue
            taken += went
            state, records = oldest.chunk.state, oldest.chunk.buffers
            for launch in launched:                 # refills the view does not show yet
                _refilled_status(view, dyn, launch.freed, launch.new)
            occupancy.append(host.system_mask.mean())
            padding.append(host.atom_mask.mean())
        hand_over(observers, records)
    finally:
        if bar is not None:
            bar.close()
    for sink in sinks:
        if hasattr(sink, "flush"):
            sink.flush()
    unfinished = host.sample_id[host.system_mask].tolist()
    return InflightResult(state=state, batch=batch, steps=taken, written=written, failed=failed,
                          unfinished=unfinished, seconds=time.perf_counter() - t0, chunks=chunks,
                          refills=refills, regrows=regrows,
                          occupancy=float(np.mean(occupancy)) if occupancy else 0.0,
                          padding_efficiency=float(np.mean(padding)) if padding else 0.0)

