"""Inflight batching: finished systems leave for the sinks and free slots are refilled
from a sampler between chunks, with fixed shapes (no recompilation) and no data lost.

Every ``refill_frequency`` steps (one compiled chunk), on the host:

1. systems at the exit status or FAILED are copied out as :class:`Frames` and
   offered to the sinks in priority order; those no sink can take keep their
   slots (back-pressure) and are offered again next time;
2. written slots are freed and the sampler hands out samples that fit the free
   slots and atoms;
3. one jitted :func:`refill` clears the freed slots and scatters the new
   systems into free atom slots (atoms of a system need not be contiguous),
   initialises their stage variables, marks their neighbor rows stale and
   computes their forces.

Every sample that enters leaves exactly once: written to a sink (failed ones
with their failure code), or, if ``max_steps`` stops the run first, reported
in ``result.unfinished``.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from nvalchemi_jax import neighbors
from nvalchemi_jax.batch import gather_systems
from nvalchemi_jax.dynamics import status as status_codes
from nvalchemi_jax.dynamics.base import blend_stage
from nvalchemi_jax.dynamics.run import _Progress, advance, regrown
from nvalchemi_jax.dynamics.sinks import write_all
from nvalchemi_jax.frames import Frames


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


@jax.jit
def refill(dyn, state, batch, freed, incoming):
    """Clear ``freed (S,)`` slots and write ``incoming`` systems (host-built, padded to the
    capacity; entries with target index S or N are dropped). Fixed shapes: never recompiles."""
    n_sys, n_atoms = batch.num_systems, batch.num_atoms
    atom_freed = gather_systems(freed, batch.system_index, False)
    clear = lambda x, fill: jnp.where(atom_freed.reshape(atom_freed.shape + (1,) * (x.ndim - 1)), fill, x)
    sys_clear = lambda x, fill: jnp.where(freed.reshape(freed.shape + (1,) * (x.ndim - 1)), fill, x)
    dst, slot = incoming["atom_dst"], incoming["slot"]
    put = lambda x, v: x.at[dst].set(v.astype(x.dtype), mode="drop")
    put_s = lambda x, v: x.at[slot].set(v.astype(x.dtype), mode="drop")
    batch = batch.replace(
        positions=put(clear(batch.positions, 0.0), incoming["positions"]),
        velocities=put(clear(batch.velocities, 0.0), incoming["velocities"]),
        atomic_numbers=put(clear(batch.atomic_numbers, 0), incoming["atomic_numbers"]),
        masses=put(clear(batch.masses, 1.0), incoming["masses"]),
        system_index=put(clear(batch.system_index, n_sys), incoming["atom_system"]),
        atom_mask=put(clear(batch.atom_mask, False), jnp.ones(n_atoms, bool)),
        fixed=put(clear(batch.fixed, False), incoming["fixed"]),
        tags=put(clear(batch.tags, 0), incoming["tags"]),
        charges=put(clear(batch.charges, 0.0), incoming["charges"]),
        cell=put_s(sys_clear(batch.cell, 0.0), incoming["cell"]),
        pbc=put_s(sys_clear(batch.pbc, False), incoming["pbc"]),
        n_atoms=put_s(sys_clear(batch.n_atoms, 0), incoming["n_atoms"]),
        system_mask=put_s(sys_clear(batch.system_mask, False), jnp.ones(n_sys, bool)),
        sample_id=put_s(sys_clear(batch.sample_id, -1), incoming["sample_id"]),
    )
    new = jnp.zeros(n_sys, bool).at[slot].set(True, mode="drop")
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
        step=jnp.where(new | freed, 0, state.step),
        previous_energy=jnp.where(new, jnp.inf, state.previous_energy), neighbors=nl)
    state = state.replace(stage=blend_stage(new, dyn.init_stage(state, batch), state.stage, batch))
    state = dyn.compute(state, batch)
    state = state.replace(previous_energy=jnp.where(new, jnp.inf, state.previous_energy))
    return dyn._mark_failures(state, state, batch, new), batch


def _incoming_arrays(systems, slots, atom_slots, capacity, dtype):
    """Host-side padded arrays for :func:`refill`."""
    n_sys, n_atoms = capacity.num_systems, capacity.num_atoms
    out = {
        "atom_dst": np.full(n_atoms, n_atoms, np.int32), "atom_system": np.full(n_atoms, n_sys, np.int32),
        "positions": np.zeros((n_atoms, 3), dtype), "velocities": np.zeros((n_atoms, 3), dtype),
        "atomic_numbers": np.zeros(n_atoms, np.int32), "masses": np.ones(n_atoms, dtype),
        "fixed": np.zeros(n_atoms, bool), "tags": np.zeros(n_atoms, np.int32), "charges": np.zeros(n_atoms, dtype),
        "slot": np.full(n_sys, n_sys, np.int32), "cell": np.zeros((n_sys, 3, 3), dtype),
        "pbc": np.zeros((n_sys, 3), bool), "n_atoms": np.zeros(n_sys, np.int32),
        "sample_id": np.full(n_sys, -1, np.int32)}
    m = 0
    for k, (system, slot) in enumerate(zip(systems, slots)):
        n = len(system["atomic_numbers"])
        idx = slice(m, m + n)
        out["atom_dst"][idx] = atom_slots[m:m + n]
        out["atom_system"][idx] = slot
        for f in ("positions", "velocities", "atomic_numbers", "masses", "fixed", "tags", "charges"):
            out[f][idx] = system[f]
        out["slot"][k] = slot
        out["cell"][k] = system["cell"]
        out["pbc"][k] = system["pbc"]
        out["n_atoms"][k] = n
        out["sample_id"][k] = system["sample_id"]
        m += n
    return {k: jnp.asarray(v) for k, v in out.items()}


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
    capacity, dtype = batch.capacity, np.dtype(batch.dtype)
    exit_status = dyn.exit_status
    bar = _Progress(len(sampler), batch, unit="samples") if progress else None
    taken = chunks = refills = regrows = written = failed = 0
    occupancy, padding = [], []
    try:
        while True:
            status = np.asarray(state.status)
            mask = np.asarray(batch.system_mask)
            finished = mask & ((status == exit_status) | (status == status_codes.FAILED))
            freed = np.zeros_like(mask)
            if finished.any():
                frames = Frames.from_state(state, batch, finished)
                rest = write_all(frames, sinks)
                n_written = len(frames) - len(rest)
                slots = np.flatnonzero(finished)[:n_written]
                freed[slots] = True
                written += n_written
                failed += int((frames.status[:n_written] == status_codes.FAILED).sum())
            atom_mask = np.asarray(batch.atom_mask)
            atom_freed = np.isin(np.asarray(batch.system_index), np.flatnonzero(freed))
            free_atoms = np.flatnonzero(~atom_mask | atom_freed)
            free_slots = np.flatnonzero(~mask | freed)
            indices = sampler.take(len(free_slots), len(free_atoms)) if len(free_slots) else []
            if freed.any() or indices:
                systems = sampler.systems(indices)
                incoming = _incoming_arrays(systems, free_slots[:len(systems)], free_atoms, capacity, dtype)
                state, batch = refill(dyn, state, batch, jnp.asarray(freed), incoming)
                refills += 1
                if bool(state.neighbors.overflow):
                    state = _recompute(dyn, regrown(state, state, batch), batch)
                    regrows += 1
            if bar is not None:
                bar.update_samples(written, state, dyn)
            running = bool(jnp.any(dyn.running(state, batch)))
            if not running:
                status = np.asarray(state.status)
                mask = np.asarray(batch.system_mask)
                waiting = mask & ((status == exit_status) | (status == status_codes.FAILED))
                if sampler.exhausted and not mask.any():
                    break
                if waiting.any() and not indices and not freed.any():
                    raise RuntimeError(f"the sinks are full: {int(waiting.sum())} finished systems cannot be "
                                       "written; add a sink or drain one")
                continue
            if max_steps is not None and taken >= max_steps:
                break
            limit = refill_frequency if max_steps is None else min(refill_frequency, max_steps - taken)
            state, went, regrew = advance(dyn, state, batch, limit, refill_frequency)
            chunks += 1
            regrows += regrew
            if regrew:
                continue
            taken += went
            mask = np.asarray(batch.system_mask)
            occupancy.append(mask.mean())
            padding.append(np.asarray(batch.atom_mask).mean())
    finally:
        if bar is not None:
            bar.close()
    for sink in sinks:
        if hasattr(sink, "flush"):
            sink.flush()
    mask = np.asarray(batch.system_mask)
    unfinished = np.asarray(batch.sample_id)[mask].tolist()
    return InflightResult(state=state, batch=batch, steps=taken, written=written, failed=failed,
                          unfinished=unfinished, seconds=time.perf_counter() - t0, chunks=chunks,
                          refills=refills, regrows=regrows,
                          occupancy=float(np.mean(occupancy)) if occupancy else 0.0,
                          padding_efficiency=float(np.mean(padding)) if padding else 0.0)


@jax.jit
def _recompute(dyn, state, batch):
    return dyn.compute(state, batch)
