"""NVE of neighbor-listed systems in few kernels per step (velocity Verlet in leapfrog form).

A step of the general engine is the pair kernel plus some twenty small kernels and two
or three conditionals (the half kicks and the drift, each blended per system, the Verlet
test, failure flags, per-system sums), each a few µs whatever the size: for one crystal
of 32,000 atoms they cost more than the pair kernel. Here one pass after the pair kernel,
at the forces F_t of x_t, finishes step t and starts step t + 1, the same arithmetic as
the engine's two half steps::

    v_t     = v_{t-½} + dt F_t / 2m          (the second half kick of step t)
    v_{t+½} = v_t     + dt F_t / 2m          (the first half kick of step t + 1)
    x_{t+1} = x_t + dt v_{t+½}               (its drift)

and finds, over all atoms at once, the largest displacement since the neighbor list's
build and whether a value the engine checks is not finite. One conditional follows:
nothing, a rebuild of the list, or the engine's failure handling (the system goes back
to its last finite step, marked failed; the others go on). A chunk of L steps evaluates
the forces L + 1 times: first at the chunk's start (the first kick needs them in the
loop), last at its end (only the final half kick follows).

On an H200 (W2, 2026-11-29, results/w2_leapfrog_ab_*): 32,000 atoms 3.45e8 -> 3.72e8
atom-steps/s, 256,000 atoms 8.0e8 -> 8.2e8. Doing the integration inside the pair kernel
instead (commit 62c0161) made the kernel 1.8x slower at 256,000 atoms.

:func:`plan` decides on the host whether a run qualifies (the runs of
:func:`~nvalchemi_jax.dynamics.resident.fused_nve` that are not resident); :func:`steps`
then replaces a chunk's scan. Results equal the engine's within float rounding.
``NVALCHEMI_JAX_LEAPFROG=0`` turns it off.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from nvalchemi_jax import _pallas, neighbors, units
from nvalchemi_jax.batch import Batch, gather_systems, sum_systems
from nvalchemi_jax.dynamics import persistent, resident, status as status_codes
from nvalchemi_jax.models import pair_kernel


def enabled() -> bool:
    return os.environ.get("NVALCHEMI_JAX_LEAPFROG", "1") != "0"


def plan(dyn, batch: Batch) -> bool:
    """Host side: whether ``dyn`` runs ``batch`` with :func:`steps` (call after
    :func:`~nvalchemi_jax.dynamics.resident.plan`, which takes precedence)."""
    return enabled() and resident.fused_nve(dyn, batch)


def steps(dyn, state, batch: Batch, limit, length: int, grid: int = 0):
    """Up to ``limit`` (at most ``length``) NVE steps of every running system; returns
    ``(state, steps taken)`` as the chunk's scan would. With ``grid`` (programs, see
    :func:`~nvalchemi_jax.dynamics.persistent.programs`) the steps run in the persistent
    kernel between rebuilds, else one XLA step at a time."""
    from nvalchemi_jax.models.pair import species_table, symmetric
    start = state
    model = dyn.model
    active = dyn.running(state, batch)
    count = planned = resident.step_counts(dyn, state, batch, limit)
    most = jnp.max(count)
    trips = jnp.where(most > 0, most + 1, 0)
    dtype = state.positions.dtype
    n = batch.num_atoms

    mobile = batch.atom_mask & ~batch.fixed
    kick = jnp.where(mobile, units.FORCE_TO_ACCELERATION / jnp.where(mobile, batch.masses, 1.0),
                     0.0).astype(dtype)
    species = species_table(model.species)
    rows = None if species is None else jnp.asarray(species)[batch.atomic_numbers]
    num_species = 1 if species is None else int(np.max(species)) + 1
    params = {name: symmetric(v) for name, v in model.pair_parameters().items()}
    evaluate = functools.partial(evaluate_and_step, model.pair_term, float(model.cutoff), params, rows,
                                 num_species, kick=kick, dt=state.stage.system["dt"], cell=state.cell,
                                 batch=batch)
    skin = state.neighbors.spec.skin
    nl = neighbors.update(state.neighbors, state.positions, state.cell, batch)

    def keep(out, nl, _):
        return out, nl

    def rebuild(out, nl, _):
        return out, neighbors.rebuild(nl, out[0][:, :3], state.cell, batch)

    def fail(out, nl, before):
        """The engine's failure handling for the systems whose values at x_i (this step's
        input) are not finite: back to x_{i-1}, velocities and forces zeroed, marked failed."""
        x, v, f, e, e_prev, count, status, failure = out
        i, x_before, x_prev, e_before, e_prev_before = before
        checked = (i > 0) & (i <= count)
        then = start.replace(positions=x_prev[:, :3], energy=sum_systems(e_before, batch),
                             previous_energy=sum_systems(e_prev_before, batch), status=status,
                             failure=failure)
        now = then.replace(positions=x_before[:, :3], velocities=v, forces=f,
                           energy=sum_systems(e, batch))
        marked = dyn._mark_failures(then, now, batch, checked)
        failed = (marked.status == status_codes.FAILED) & (status != status_codes.FAILED)
        atoms = gather_systems(failed, batch.system_index, False)
        back = lambda old, new: jnp.where(atoms.reshape((-1,) + (1,) * (new.ndim - 1)), old, new)
        x = back(x_prev, x)
        out = (x, back(0.0, v), back(0.0, f), back(e_before, e), back(e_prev_before, e_prev),
               jnp.where(failed, i - 1, count), marked.status, marked.failure)
        # The list must cover the positions put back (the engine tests them at its next step).
        return out, neighbors.update(nl, x[:, :3], state.cell, batch)

    def advance(carry, i):
        out, x_prev, nl = carry
        x, v, f, e, e_prev, count, status, failure = out
        x_new, x_now, v, f, e_new, e_prev_new, moved, bad = evaluate(x, v, e, e_prev, count, i, nl)
        far = neighbors.beyond_skin(2.0 * jnp.sqrt(jnp.max(moved)), skin)
        branch = jnp.where(jnp.any(bad > 0), 2, far.astype(jnp.int32))
        out = (x_new, v, f, e_new, e_prev_new, count, status, failure)
        out, nl = jax.lax.switch(branch, (keep, rebuild, fail), out, nl, (i, x, x_prev, e, e_prev))
        return out, x_now, nl

    def body(carry, i):
        # A scan of fixed length with a skip test: a GPU runs both as CUDA graph nodes, where
        # a loop of data-dependent length read its test on the host at every step.
        return jax.lax.cond(i < trips, advance, lambda carry, i: carry, carry, i), None

    x4 = jnp.pad(state.positions, ((0, 0), (0, 1)))
    zero = jnp.zeros(n, dtype)
    out = (x4, state.velocities, state.forces, zero, zero, count, state.status, state.failure)
    stuck = None
    if grid:
        out, nl, stuck, most = _persistent_steps(
            advance, out, nl, trips, grid, batch, skin=skin, kick=kick, dt=state.stage.system["dt"],
            model=model, params=params, rows=rows, num_species=num_species, cell=state.cell)
    else:
        (out, _, nl), _ = jax.lax.scan(body, (out, x4, nl), jnp.arange(length + 1, dtype=jnp.int32))
    x4, v, f, e, e_prev, count, status, failure = out

    ran = trips > 0
    energy = jnp.where(ran, sum_systems(e, batch), state.energy)
    # The engine's compute sets the previous energy of every system at every step, moved or
    # not: a system whose last step (or the step it failed at) came before the chunk's last
    # ends with its energy as the previous one; one that stepped (or failed) at the last
    # step keeps the energy before it (before the chunk, if that was its first step).
    failed_now = (status == status_codes.FAILED) & (start.status != status_codes.FAILED)
    last = jnp.where(failed_now, count + 1, count)
    at_end = (last == most) & (last > 0)
    previous = jnp.where(at_end & (count > 0), sum_systems(e_prev, batch),
                         jnp.where(at_end | ~ran, state.previous_energy, energy))
    state = state.replace(positions=x4[:, :3], velocities=v, forces=f, energy=energy,
                          previous_energy=previous, status=status, failure=failure, neighbors=nl,
                          step=state.step + count)
    if stuck is not None:
        # The list stays the chunk's own, marked stale (rebuilt at its next update), rather
        # than selected back from the start's: a select of every entry cost ~25 µs a chunk
        # (H200, 32,000 atoms, results/profile_step_persistent_h200_2026-11-30_hlo.jsonl).
        lost = _barrier_lost(start, batch, planned, state.neighbors)
        state = jax.tree.map(lambda a, b: jnp.where(stuck, a, b), lost, state)
        count = jnp.where(stuck, 0, count)
    state, _ = dyn._converge(state, batch, active)
    # A failed step counts as a step taken (the engine's scan took it).
    failed = (state.status == status_codes.FAILED) & (start.status != status_codes.FAILED)
    taken = jnp.max(jnp.where(failed, count + 1, count))
    return state.replace(global_step=state.global_step + taken), taken


def evaluate_and_step(term, cutoff, params, rows, num_species, x4, v, e, e_prev, count, index, nl, *,
                      kick, dt, cell, batch):
    """Step index ``index`` of a chunk: the pair kernel at x_i, then the kicks and the drift
    (see the module docstring), which XLA fuses with the displacement and finiteness tests.

    x4: ``(N, 4)`` positions x_i as the kernel's rows (x, y, z, 0); v: ``(N, 3)`` velocities
    (v_0 at index 0, then v_{i-½}); e, e_prev: ``(N,)`` per-atom energies at x_{i-1} and
    x_{i-2}; count: ``(S,) int32`` steps each system takes in the chunk; kick: ``(N,)``
    acceleration per unit force (0: does not move); dt: ``(S,)`` fs.

    Returns x_{i+1} ``(N, 4)``, x_i, the velocities, forces at x_i, per-atom energies at
    x_i and x_{i-1}, the largest squared displacement since the list's build ``(1,)``, and
    ``(1,) int32`` whether a value the engine checks (at x_i, after step i - 1) is not finite.
    """
    dtype = x4.dtype
    sums = pair_kernel.pair_sums(term, cutoff, params, rows, num_species, x4, cell, batch, nl, False)
    energy = sums[0]
    force = jnp.where((kick > 0)[:, None], jnp.stack(sums[1:4], axis=-1), 0.0)
    dt_atom = gather_systems(dt.astype(dtype), batch.system_index)
    count_atom = gather_systems(count, batch.system_index)
    half = (0.5 * dt_atom * kick)[:, None]
    finish = ((index > 0) & (index <= count_atom))[:, None]
    move = (index < count_atom)[:, None]
    x = x4[:, :3]
    v = v + jnp.where(finish, half * force, 0.0)
    ok = jnp.isfinite(energy) & jnp.all(jnp.isfinite(force) & jnp.isfinite(x) & jnp.isfinite(v), axis=-1)
    v = v + jnp.where(move, half * force, 0.0)
    x_new = x + jnp.where(move, dt_atom[:, None] * v, 0.0)
    moved = jnp.sum((x_new - nl.reference_positions) ** 2, axis=-1)
    moved = jnp.where(moved == moved, moved, 0.0)
    bad = jnp.any(finish[:, 0] & ~ok)
    return (jnp.pad(x_new, ((0, 0), (0, 1))), x4, v, force, energy,
            jnp.where(finish[:, 0], e, e_prev), jnp.max(moved)[None], bad.astype(jnp.int32)[None])


def _persistent_steps(advance, out, nl, trips, grid, batch, *, skin, kick, dt, model, params, rows,
                      num_species, cell):
    """The chunk's indices ``0 .. trips - 1`` as :func:`steps`' scan takes them, in calls of
    the persistent kernel (:mod:`~nvalchemi_jax.dynamics.persistent`): after a call that
    stopped for a rebuild, the list is rebuilt; after one that met a non-finite value at
    index i, the chunk ends there: index i is taken by ``advance`` (the engine's failure
    handling) as the chunk's last (``end_early``), and the run loop goes on. Also returns
    whether the kernel's barrier ran out (see :func:`_barrier_lost`), and the chunk's last
    index (``trips - 1``, or earlier when its segments ran out: then each system's ``count``
    is cut to it, see ``end_early``)."""
    x4, v, f, e, e_prev, count, status, failure = out
    n = x4.shape[0]
    spare = _pallas.spare(_pallas.interpreted(None))     # the interpreter's row for masked stores
    dtype = x4.dtype
    pad = lambda a: jnp.pad(a, ((0, spare),) + ((0, 0),) * (a.ndim - 1))
    rings = persistent.rings_at_start(x4, v, e, e_prev, spare)
    dt_atom = pad(gather_systems(dt.astype(dtype), batch.system_index))
    kick_m = pad(kick)

    def run_kernel(carry):
        rings, f, nl, i, count, status, failure, _ = carry
        count_atom = pad(gather_systems(count, batch.system_index))
        rings, f, i, code = persistent.call(
            model.pair_term, float(model.cutoff), params, rows, num_species, rings, i, trips,
            kick=kick_m, dt_atom=dt_atom, count_atom=count_atom,
            reference=nl.reference_positions.astype(dtype), skin=skin, cell=cell, batch=batch, nl=nl,
            grid=grid)
        x_next = rings[0][i % 3, :n, :3]
        nl = jax.lax.cond(code == persistent.REBUILD,
                          lambda nl: neighbors.rebuild(nl, x_next, cell, batch), lambda nl: nl, nl)
        return rings, f, nl, i, count, status, failure, code

    def one_step(carry):
        (x_ring, v_ring, e_ring, ep_ring), f, nl, i, count, status, failure, _ = carry
        out = (x_ring[i % 3, :n], v_ring[i % 2, :n], f[:n], e_ring[i % 2, :n], ep_ring[i % 2, :n],
               count, status, failure)
        (x4, v, f_new, e, e_prev, count, status, failure), _, nl = advance(
            (out, x_ring[(i + 2) % 3, :n], nl), i)
        rings = (x_ring.at[(i + 1) % 3, :n].set(x4), v_ring.at[(i + 1) % 2, :n].set(v),
                 e_ring.at[(i + 1) % 2, :n].set(e), ep_ring.at[(i + 1) % 2, :n].set(e_prev))
        return rings, f.at[:n].set(f_new), nl, i + 1, count, status, failure, jnp.int32(persistent.DONE)

    def go_on(carry):
        i, code = carry[3], carry[7]
        return (i < trips) & (code != persistent.STUCK)

    def maybe_segment(carry, _):
        # A non-finite step ends the chunk (``end_early`` takes it with the engine's failure
        # handling), so the segments' graph holds the kernel and the rebuild only.
        branch = (go_on(carry) & (carry[7] != persistent.NONFINITE)).astype(jnp.int32)
        return jax.lax.switch(branch, (lambda c: c, run_kernel), carry), None

    def end_early(carry):
        """Index i as the chunk's last: the systems still moving take no step past it
        (their step i - 1 is finished, or failed, by the engine's step at i)."""
        rings, f, nl, i, count, status, failure, code = carry
        return one_step((rings, f, nl, i, jnp.minimum(count, i), status, failure, code))

    carry = (rings, pad(f), nl, jnp.int32(0), count, status, failure, jnp.int32(persistent.DONE))
    # A fixed number of skippable segments, which a GPU runs as CUDA graph conditionals: a
    # loop of data-dependent length read its test on the host, and so did a conditional
    # holding a loop; the next chunk's launch waited for them (H200, W2 at 32,000 atoms,
    # chunks of 100 steps: ~2 ms per chunk), and a skipped segment costs ~7 µs. A chunk
    # whose segments are all taken before its last index ends early, at a step's end; the
    # run loop goes on from there.
    carry, _ = jax.lax.scan(maybe_segment, carry, None, length=persistent.SEGMENTS)
    early = go_on(carry)
    last = jnp.where(early, carry[3], jnp.maximum(trips - 1, 0))
    carry = jax.lax.cond(early, end_early, lambda c: c, carry)
    (x_ring, v_ring, e_ring, ep_ring), f, nl, i, count, status, failure, code = carry
    out = (x_ring[i % 3, :n], v_ring[i % 2, :n], f[:n], e_ring[i % 2, :n], ep_ring[i % 2, :n], count,
           status, failure)
    return out, nl, code == persistent.STUCK, last


def _barrier_lost(start, batch, count, nl):
    """The chunk's outcome when the persistent kernel's barrier ran out: its programs may
    have stopped at different steps, so nothing in the rings can be trusted. The whole batch
    goes back to the chunk's ``start`` but keeps the chunk's list ``nl``, marked stale (the
    next update rebuilds it); the systems that were to run (``count > 0``) fail as the
    engine fails one (velocities and forces zeroed)."""
    running = (count > 0) & (start.status != status_codes.FAILED)
    atoms = gather_systems(running, batch.system_index, False)[:, None]
    lost = start.replace(neighbors=neighbors.mark_stale(nl, batch.system_mask),
                         status=jnp.where(running, status_codes.FAILED, start.status),
                         failure=jnp.where(running, int(status_codes.Failure.KERNEL_BARRIER), start.failure),
                         velocities=jnp.where(atoms, 0.0, start.velocities),
                         forces=jnp.where(atoms, 0.0, start.forces))
    return lost
