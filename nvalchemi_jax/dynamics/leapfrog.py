"""NVE of neighbor-listed systems with one fused GPU kernel per step (velocity Verlet in
leapfrog form).

A step of the general engine is the pair kernel plus some twenty small kernels (the half
kicks and the drift, the Verlet test, failure flags, per-system sums), a few µs each
whatever the size: for one crystal of 32,000 atoms they cost twice the pair kernel. Here
the kernel that evaluates the forces F_t at x_t also finishes step t and starts step
t + 1, the same arithmetic as the engine's two half steps::

    v_t     = v_{t-1/2} + dt F_t / 2m        (the second half kick of step t)
    v_{t+½} = v_t       + dt F_t / 2m        (the first half kick of step t + 1)
    x_{t+1} = x_t + dt v_{t+½}               (its drift)

and reports, per block of atoms, the largest displacement since the neighbor list's
build and whether a value it checked is non-finite. Between two kernels there remain one
small reduction and one conditional: nothing, a rebuild of the neighbor list, or the
failure handling of the engine (the system goes back to its last finite step, marked
failed; the others go on). A chunk of L steps is L + 1 kernel calls: the first
re-evaluates the chunk's starting forces (the first half kick needs them in the kernel),
the last evaluates the final forces and only kicks.

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
from nvalchemi_jax.dynamics import resident, status as status_codes
from nvalchemi_jax.models import pair_kernel


#: The integration inside the pair kernel (True) or after it, in XLA (False).
IN_KERNEL = True


def enabled() -> bool:
    return os.environ.get("NVALCHEMI_JAX_LEAPFROG", "1") != "0"


def plan(dyn, batch: Batch) -> bool:
    """Host side: whether ``dyn`` runs ``batch`` with :func:`steps` (call after
    :func:`~nvalchemi_jax.dynamics.resident.plan`, which takes precedence)."""
    return enabled() and resident.fused_nve(dyn, batch)


def steps(dyn, state, batch: Batch, limit, length: int):
    """Up to ``limit`` (at most ``length``) NVE steps of every running system, one kernel
    call per step; returns ``(state, steps taken)`` as the chunk's scan would."""
    from nvalchemi_jax.models.pair import species_table, symmetric
    start = state
    model = dyn.model
    active = dyn.running(state, batch)
    count = resident.step_counts(dyn, state, batch, limit)
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
    evaluate = functools.partial(call if IN_KERNEL else call_xla, model.pair_term, float(model.cutoff), params, rows,
                                 num_species, kick=kick, dt=state.stage.system["dt"], cell=state.cell,
                                 batch=batch)
    skin = state.neighbors.spec.skin
    nl = neighbors.update(state.neighbors, state.positions, state.cell, batch)

    def keep(out, nl, _):
        return out, nl

    def rebuild(out, nl, _):
        return out, neighbors.rebuild(nl, out[0][:, :3], state.cell, batch)

    def fail(out, nl, before):
        """The engine's failure handling for the systems whose values at x_i (this call's
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
    (out, _, nl), _ = jax.lax.scan(body, (out, x4, nl), jnp.arange(length + 1, dtype=jnp.int32))
    x4, v, f, e, e_prev, count, status, failure = out

    ran = trips > 0
    energy = jnp.where(ran, sum_systems(e, batch), state.energy)
    # The engine's compute sets the previous energy of every system, moved or not.
    previous = jnp.where(count > 0, sum_systems(e_prev, batch),
                         jnp.where(ran, energy, state.previous_energy))
    state = state.replace(positions=x4[:, :3], velocities=v, forces=f, energy=energy,
                          previous_energy=previous, status=status, failure=failure, neighbors=nl,
                          step=state.step + count)
    state, _ = dyn._converge(state, batch, active)
    # A failed step counts as a step taken (the engine's scan took it).
    failed = (status == status_codes.FAILED) & (start.status != status_codes.FAILED)
    taken = jnp.max(jnp.where(failed, count + 1, count))
    return state.replace(global_step=state.global_step + taken), taken


def call_xla(term, cutoff, params, rows, num_species, x4, v, e, e_prev, count, index, nl, *, kick, dt,
             cell, batch):
    """:func:`call` as the pair kernel followed by the integration in XLA (a fusion or two)."""
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


def call(term, cutoff, params, rows, num_species, x4, v, e, e_prev, count, index, nl, *, kick, dt,
         cell, batch, interpret=None):
    """One kernel call at step index ``index`` of a chunk (see the module docstring).

    x4: ``(N, 4)`` positions x_i as rows (x, y, z, 0); v: ``(N, 3)`` velocities (v_0 at
    index 0, then v_{i-½}); e, e_prev: ``(N,)`` per-atom energies at x_{i-1} and x_{i-2};
    count: ``(S,) int32`` steps each system takes in the chunk; kick: ``(N,)`` the
    acceleration per unit force (0: does not move); dt: ``(S,)`` fs.

    Returns x_{i+1} ``(N, 4)``, x_i ``(N, 4)`` (a copy, for the failure handling of the
    next call), velocities, forces at x_i, per-atom energies at x_i and at x_{i-1},
    ``(G,)`` each block's largest squared displacement since the list's build, and
    ``(G,) int32`` whether a block has a non-finite value where the engine checks one.
    """
    n = nl.indices.shape[0]
    dtype = x4.dtype
    settings, inputs = pair_kernel.kernel_arguments(term, cutoff, params, rows, num_species, x4,
                                                    cell, batch, nl, 4)
    interpret = _pallas.interpreted(interpret)
    extra = _pallas.spare(interpret)
    blocks = -(-n // pair_kernel.BLOCK_ROWS)
    shape = lambda size, kind=dtype: jax.ShapeDtypeStruct((size,), kind)
    out_shape = [shape(4 * (n + extra)), shape(4 * (n + extra)), shape(3 * (n + extra)),
                 shape(3 * (n + extra)), shape(n + extra), shape(n + extra), shape(blocks),
                 shape(blocks, jnp.int32)]
    run = _pallas.call(functools.partial(_kernel, **settings), out_shape, blocks,
                       pair_kernel.NUM_WARPS, "leapfrog_nve", interpret, pair_kernel.NUM_STAGES)
    outs = run(*inputs, v.reshape(-1), nl.reference_positions.reshape(-1).astype(dtype), e, e_prev,
               kick, dt.astype(dtype), count, jnp.reshape(index, (1,)).astype(jnp.int32))
    x_new, x_now, v, f, e, e_prev, moved, bad = outs
    return (x_new[:4 * n].reshape(n, 4), x_now[:4 * n].reshape(n, 4), v[:3 * n].reshape(n, 3),
            f[:3 * n].reshape(n, 3), e[:n], e_prev[:n], moved, bad)


def _kernel(pos_ref, idx_ref, shift_ref, sys_ref, cell_ref, rows_ref, *refs, **settings):
    from jax.experimental import pallas as pl
    names, n, s, dtype = settings["names"], settings["n"], settings["s"], settings["dtype"]
    param_refs = refs[:len(names)]
    v_ref, ref_ref, e_ref, ep_ref, kick_ref, dt_ref, count_ref, index_ref = refs[len(names):len(names) + 8]
    xo_ref, xn_ref, vo_ref, fo_ref, eo_ref, epo_ref, moved_ref, bad_ref = refs[len(names) + 8:]
    i, live = pair_kernel.block_atoms(n)
    energy, *force = pair_kernel.row_sums(i, live, pos_ref, idx_ref, shift_ref, sys_ref, cell_ref,
                                          rows_ref, param_refs, **settings)
    system = jnp.clip(sys_ref[i], 0, s - 1)
    dt = dt_ref[system]
    count = count_ref[system]
    step = index_ref[0]
    kick = kick_ref[i]
    force = [jnp.where(kick > 0, force[a], 0.0) for a in range(3)]   # fixed atoms: none
    half = 0.5 * dt * kick
    finish = live & (step > 0) & (step <= count)     # the second half kick of step i - 1
    move = live & (step < count)                     # the first half kick and drift of step i
    x = [pos_ref[i * 4 + a] for a in range(3)]
    v = [v_ref[i * 3 + a] + jnp.where(finish, half * force[a], 0.0) for a in range(3)]
    ok = jnp.isfinite(energy)
    for a in range(3):
        ok &= jnp.isfinite(force[a]) & jnp.isfinite(x[a]) & jnp.isfinite(v[a])
    v = [v[a] + jnp.where(move, half * force[a], 0.0) for a in range(3)]
    x_new = [x[a] + jnp.where(move, dt * v[a], 0.0) for a in range(3)]
    reference = [ref_ref[i * 3 + a] for a in range(3)]
    moved = sum((x_new[a] - reference[a]) ** 2 for a in range(3))
    moved = jnp.where(live & (moved == moved), moved, 0.0)   # NaN: caught as a failure next call

    target = jnp.where(live, i, n)
    zero = jnp.zeros((pair_kernel.BLOCK_ROWS,), dtype)
    for a in range(4):
        _pallas.store(xo_ref, target * 4 + a, x_new[a] if a < 3 else zero, live)
        _pallas.store(xn_ref, target * 4 + a, x[a] if a < 3 else zero, live)
    for a in range(3):
        _pallas.store(vo_ref, target * 3 + a, v[a], live)
        _pallas.store(fo_ref, target * 3 + a, force[a], live)
    _pallas.store(eo_ref, target, energy, live)
    _pallas.store(epo_ref, target, jnp.where(finish, e_ref[i], ep_ref[i]), live)
    block = pl.program_id(0)
    moved_ref[block] = jnp.max(moved)
    bad_ref[block] = jnp.max((finish & ~ok).astype(jnp.int32))
