"""Leapfrog NVE of neighbor-listed systems in one persistent GPU kernel between rebuilds.

:mod:`~nvalchemi_jax.dynamics.leapfrog` takes a step in the pair kernel and a few XLA
kernels and conditionals; at 32,000 atoms on an H200 they cost three times the pair
kernel itself (89 µs per step, 21 in the pair kernel). Here one kernel runs the steps: at
most one program per multiprocessor, each owning a contiguous range of atoms, and per step

1. the pair sums of its atoms at x_t (neighbors' positions gathered from all ranges),
2. the same leapfrog update as :func:`~nvalchemi_jax.dynamics.leapfrog.evaluate_and_step`
   for its atoms (x_{t+1} written to a ring of three position buffers, velocities and
   per-atom energies to rings of two), with the largest displacement since the list's
   build and whether a checked value is not finite,
3. a grid-wide barrier (an atomic counter in global memory; its acquire makes the other
   programs' x_{t+1} visible), after which every program reads the step's verdict.

The kernel returns when the steps are done, when an atom moved past half the skin (the
list is rebuilt in XLA, then the next kernel goes on), or when a value went non-finite:
then step t's inputs are still in the rings, and XLA redoes step t with the engine's
failure handling (:func:`leapfrog.steps`' ``advance``) as the chunk's last; the run loop
goes on. A chunk makes at most ``SEGMENTS`` calls; one that needs more ends early too.
Keeping the engine's step out of the segments' loop body made W2 at 32,000 atoms in
chunks of 100 steps 5 % faster (H200, 2026-11-30, results/w2_lean_segments_ab_*:
9.84-9.88e8 -> 1.033-1.034e9 atom-steps/s) and its compilation 24 -> 18 s. The barrier
needs every program running at once: the grid is at most one program per multiprocessor,
and Triton compiles a program to fit one. Should a wait still run out (the GPU shared with
another kernel), the chunk's running systems end failed (``Failure.KERNEL_BARRIER``),
never silently wrong.

On an H200 (W2, float32, 2026-11-29) the kernel steps 32,000 atoms in 26 µs and 256,000
in 197-208 µs (~1.3e9 atom-steps/s, against 21 and 149 µs for the pair kernel alone);
with a 1 Å skin whole runs were bound by the rebuilds between calls (~0.5 ms at 32,000
atoms, every ~30 steps): 32,000 atoms 1.13-1.18x the XLA steps, 256,000 atoms 0.91x. With
a 1.3 Å skin (no rebuild in 1,000 steps at 32,000 atoms) 32,000 atoms run at 8.8e8
atom-steps/s in chunks of 100 steps, 9.6e8 in chunks of 1,000 (see AUTO_MAX_ATOMS).

``NVALCHEMI_JAX_PERSISTENT``: ``auto`` (on GPUs, batches up to ``AUTO_MAX_ATOMS`` atoms),
``0`` (never), ``1`` (always; off a GPU with one program in Pallas' interpreter, for tests).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

from nvalchemi_jax import _pallas
from nvalchemi_jax.models import pair_kernel

#: Atoms per pair-sum tile and neighbors per inner step, Triton warps per program, atoms per
#: block of the update pass, programs per multiprocessor (more than one may not all fit),
#: Triton's pipelining stages.
ROWS = 128
COLS = 16
WARPS = 16
ATOMS = 512
PER_SM = 1
STAGES = 2
#: Largest batch (atoms) that takes the kernel by default. H200, W2, 1,000 steps, skin 1 Å
#: (results/w2_persistent_ab_h200_2026-11-29_*): 32,000 atoms 4.2-4.4e8 atom-steps/s against
#: 3.7e8 for leapfrog steps in XLA; 256,000 atoms 7.4e8 against 8.2e8. Skin 1.3 Å
#: (results/w2_skin_*, w2_single_*_k_*): 256,000 atoms 8.7-9.3e8 against 1.01-1.03e9 for
#: the XLA steps, which gain more from fewer rebuilds; chunks that end early and spare
#: columns skipped: 1.07e9 against 1.05-1.09e9 (results/w2_skin_persistent_*_d_*, session
#: 14), level, so the XLA steps stay the default there. The kernel itself is as fast per
#: step at both sizes (~1.3e9, results/probe_persistent_*). Sizes in between were not
#: measured.
AUTO_MAX_ATOMS = 65_536
#: Kernel calls per chunk, as a fixed sequence of skippable segments (a rebuild or a
#: non-finite step ends a call); a chunk that needs more ends early. XLA runs the segments
#: as a loop on the host, one CUDA graph launch each. 4 against 8 (H200, 2026-11-30, W2 at
#: 32,000 atoms in chunks of 100, same calls, alternating; results/w2_segments_ab_h200_
#: 2026-11-30_{c,d}*): 1.031-1.046e9 -> 1.051-1.063e9 atom-steps/s with a 1.3 Å skin (no
#: rebuild), 6.66-6.71e8 -> 6.71-6.75e8 with 1 Å (a rebuild every ~30 steps), where 2 fell
#: to 6.13e8 (its chunks end early); the chunk's host time per launch 1.65 -> 1.44 ms (one
#: process each, probe_dispatch_..._launches_segments*).
SEGMENTS = 4
#: Parts of a step left out, for timing probes only (benchmarks/probe_persistent.py):
#: "pairs" (the pair sums), "barrier" (the grid barrier and verdicts: results are wrong).
_SKIP: frozenset = frozenset()

# Verdicts of a kernel call (``code``).
DONE, REBUILD, NONFINITE, STUCK = 0, 1, 2, 3


def programs(n_atoms: int) -> int:
    """Host side: programs of the persistent kernel for a batch of ``n_atoms`` (at most
    ``PER_SM`` per multiprocessor, each owning whole tiles of rows), 0 when it is not used
    (``auto``: on GPUs, up to ``AUTO_MAX_ATOMS``)."""
    mode = os.environ.get("NVALCHEMI_JAX_PERSISTENT", "auto")
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"NVALCHEMI_JAX_PERSISTENT must be auto, 0 or 1, got {mode!r}")
    if mode == "0" or n_atoms == 0 or (mode == "auto" and n_atoms > AUTO_MAX_ATOMS):
        return 0
    sms = _pallas.multiprocessors()
    if not sms:
        return 1 if mode == "1" else 0
    grid = min(sms * PER_SM, -(-n_atoms // ROWS))
    return -(-n_atoms // rows_per_program(n_atoms, grid))    # programs that own atoms


def rows_per_program(n: int, grid: int) -> int:
    return -(-n // (grid * ROWS)) * ROWS


def rings_at_start(x4, v, e, e_prev, spare: int = 0):
    """The rings :func:`call` takes, holding index 0's inputs: positions ``x4 (N, 4)``
    (kernel rows), velocities ``(N, 3)``, per-atom energies ``e, e_prev (N,)``; each slot
    ``spare`` rows longer (Pallas' interpreter writes masked-out lanes there)."""
    pad = lambda a: jnp.pad(a, ((0, spare),) + ((0, 0),) * (a.ndim - 1))
    slots = lambda a, k: jnp.zeros((k,) + pad(a).shape, a.dtype).at[0].set(pad(a))
    return slots(x4, 3), slots(v, 2), slots(e, 2), slots(e_prev, 2)


def call(term, cutoff, params, rows, num_species, rings, start, trips, *, kick, dt_atom,
         count_atom, reference, skin, cell, batch, nl, grid, interpret=None):
    """Steps ``start .. trips - 1`` (chunk indices) until done or a verdict.

    rings: ``(x (3, M, 4), v (2, M, 3), e (2, M), e_prev (2, M))`` with ``M = N + spare``:
    the positions x_t as kernel rows in slot ``t % 3``, the velocities v_{t-½} (v_0 at 0)
    and per-atom energies at x_{t-1} and x_{t-2} in slot ``t % 2``.
    kick, dt_atom, count_atom: per atom (see ``evaluate_and_step``); reference: ``(N, 3)``
    the positions of the list's build.

    Returns the rings, the forces at the last x evaluated, the next index and the verdict
    (``DONE``, ``REBUILD`` at the next index, ``NONFINITE`` at the next index (not taken),
    ``STUCK``).
    """
    interpret = _pallas.interpreted(interpret)
    n = nl.indices.shape[0]
    x_ring, v_ring, e_ring, ep_ring = rings
    m = x_ring.shape[1]
    dtype = x_ring.dtype
    settings, inputs = pair_kernel.kernel_arguments(term, cutoff, params, rows, num_species, reference,
                                                    cell, batch, nl, 4)
    per = rows_per_program(n, grid)
    grid = -(-n // per)
    kernel = functools.partial(_kernel, **settings, m=m, per=per, skin=float(skin), interpret=interpret)
    words = jnp.zeros((4,), jnp.int32)          # barrier counter, the verdicts of even / odd steps
    shape = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)
    flat = lambda a: a.reshape(-1)
    first = len(inputs) + 6                     # where the aliased inputs start
    run = _pallas.call(kernel, [shape(flat(x_ring)), shape(flat(v_ring)), shape(flat(e_ring)),
                                shape(flat(ep_ring)), shape(words),
                                jax.ShapeDtypeStruct((3 * m,), dtype),
                                jax.ShapeDtypeStruct((4 * m,), dtype),
                                jax.ShapeDtypeStruct((2,), jnp.int32)],
                       grid, WARPS, "persistent_nve", interpret, STAGES,
                       aliases={first + a: a for a in range(5)})
    outs = run(*inputs, reference.reshape(-1).astype(dtype), kick, dt_atom, count_atom,
               jnp.reshape(start, (1,)).astype(jnp.int32), jnp.reshape(trips, (1,)).astype(jnp.int32),
               flat(x_ring), flat(v_ring), flat(e_ring), flat(ep_ring), words)
    x_ring, v_ring, e_ring, ep_ring, _, f, _, result = outs
    rings = (x_ring.reshape(3, m, 4), v_ring.reshape(2, m, 3), e_ring.reshape(2, m), ep_ring.reshape(2, m))
    return rings, f.reshape(m, 3), result[0], result[1]


def _kernel(idx_ref, shift_ref, sys_ref, cell_ref, rows_ref, *refs, n, m, per, skin, interpret,
            **settings):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu
    names, dtype = settings["names"], settings["dtype"]
    param_refs = refs[:len(names)]
    (ref_ref, kick_ref, dt_ref, count_ref, start_ref, trips_ref, _x, _v, _e, _ep, _w,
     x_ring, v_ring, e_ring, ep_ring, words, f_out, sums, result) = refs[len(names):]
    program = pl.program_id(0)
    grid = pl.num_programs(0)
    lo = program * per
    hi = jnp.minimum(lo + per, n)
    start, trips = start_ref[0], trips_ref[0]
    put = lambda ref, index, value, live: _pallas.store(ref, jnp.where(live, index, ref.shape[0] - 1)
                                                        if interpret else index, value, live)

    def pair_pass(t):
        xs = (t % 3) * m * 4

        def tile(b, carry):
            i = lo + b * ROWS + jnp.arange(ROWS, dtype=jnp.int32)
            live = i < hi
            i = jnp.where(live, i, 0)
            out = pair_kernel.row_sums(i, live, x_ring, xs, idx_ref, shift_ref, sys_ref, cell_ref,
                                       rows_ref, param_refs, n=n, block_cols=COLS, **settings)
            for a, value in enumerate(out):
                put(sums, a * m + i, value, live)
            return carry

        jax.lax.fori_loop(0, per // ROWS, tile, 0)

    def update(t):
        """The leapfrog update of this program's atoms at index t; returns the largest
        squared displacement since the build and whether a checked value is not finite."""
        xs, xn = (t % 3) * m * 4, ((t + 1) % 3) * m * 4
        vs, vn = (t % 2) * m * 3, ((t + 1) % 2) * m * 3
        es, en = (t % 2) * m, ((t + 1) % 2) * m

        def block(c, carry):
            far, bad = carry
            i = lo + c * ATOMS + jnp.arange(ATOMS, dtype=jnp.int32)
            live = i < hi
            i = jnp.where(live, i, 0)
            kick = kick_ref[i]
            energy = sums[i]
            force = [jnp.where(kick > 0, sums[(1 + a) * m + i], 0.0) for a in range(3)]
            dt, count = dt_ref[i], count_ref[i]
            half = 0.5 * dt * kick
            finish = live & (t > 0) & (t <= count)      # the second half kick of step t - 1
            move = live & (t < count)                   # the first half kick and drift of step t
            x = [x_ring[xs + i * 4 + a] for a in range(3)]
            v = [v_ring[vs + i * 3 + a] + jnp.where(finish, half * force[a], 0.0) for a in range(3)]
            ok = jnp.isfinite(energy)
            for a in range(3):
                ok &= jnp.isfinite(force[a]) & jnp.isfinite(x[a]) & jnp.isfinite(v[a])
            v = [v[a] + jnp.where(move, half * force[a], 0.0) for a in range(3)]
            x_new = [x[a] + jnp.where(move, dt * v[a], 0.0) for a in range(3)]
            moved = sum((x_new[a] - ref_ref[i * 3 + a]) ** 2 for a in range(3))
            moved = jnp.where(live & (moved == moved), moved, 0.0)   # NaN: caught as non-finite
            for a in range(4):
                put(x_ring, xn + i * 4 + a, x_new[a] if a < 3 else jnp.zeros_like(energy), live)
            for a in range(3):
                put(v_ring, vn + i * 3 + a, v[a], live)
                put(f_out, i * 3 + a, force[a], live)
            put(e_ring, en + i, energy, live)
            put(ep_ring, en + i, jnp.where(finish, e_ring[es + i], ep_ring[es + i]), live)
            # (Triton has no boolean reductions.)
            return jnp.maximum(far, jnp.max(moved)), jnp.maximum(bad, jnp.max((finish & ~ok).astype(jnp.int32)))

        zero = jnp.zeros((), dtype)
        return jax.lax.fori_loop(0, pl.cdiv(per, ATOMS), block, (zero, jnp.int32(0)))


    def body(carry):
        t, _ = carry
        if "pairs" not in _SKIP:
            pair_pass(t)
        if not interpret:
            plgpu.debug_barrier()       # the sums are written before they are read back
        far, bad = update(t)
        drift = 2.0 * jnp.sqrt(far)
        beyond = drift > skin if skin > 0 else drift > 0
        mine = jnp.maximum(NONFINITE * jnp.minimum(bad, 1), REBUILD * beyond.astype(jnp.int32))
        if "pairs" in _SKIP:        # forces from an unwritten buffer: no verdict
            mine = mine * 0
        word = 1 + t % 2
        if interpret:           # one program, run alone (no atomics in Pallas' interpreter loops)
            return t + 1, mine
        if "barrier" in _SKIP:
            return t + 1, mine * 0
        plgpu.debug_barrier()   # every thread's writes happen before the program arrives
        plgpu.atomic_max(words, word, mine, mask=mine > 0)
        met = _pallas.barrier(words, 0, (t - start + 1) * grid)   # after index t
        code = plgpu.atomic_add(words, word, jnp.int32(0))
        code = jnp.where(met, code, STUCK)
        # A program that gave up tells the others (arriving later) to stop too.
        plgpu.atomic_max(words, word, jnp.int32(STUCK), mask=~met)
        return t + 1, code

    t, code = jax.lax.while_loop(lambda c: (c[0] < trips) & (c[1] == DONE), body,
                                 (start, jnp.int32(DONE)))

    @pl.when(program == 0)
    def _():
        # A non-finite value at index t - 1: that step is redone by XLA from its inputs.
        result[0] = jnp.where(code == NONFINITE, t - 1, t)
        result[1] = code
