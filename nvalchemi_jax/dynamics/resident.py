"""Many NVE steps of small periodic systems inside one GPU kernel ("resident" systems).

A step of the general engine is some twenty small kernels (neighbor-list test, pair
kernel, integrator, bookkeeping), each a few µs to launch however small the batch, so a
single 256-atom crystal cannot step in under ~50 µs that way. In a periodic cell at
least twice the cutoff wide (every perpendicular width), each pair within the cutoff is
the nearest image of one of the n² pairs of atoms, so a system of a few hundred atoms
fits in one kernel program with no neighbor list at all: the program holds its system,
evaluates all pairs tile by tile (minimum image, closed-form pair forces) and integrates
velocity Verlet for as many steps as asked, without leaving the kernel. One program
per system; thousands of systems fill the GPU.

:func:`plan` decides on the host whether a run qualifies (NVE, a pair potential, no
hooks, a step budget as the only convergence test, fully periodic cells wide enough,
at most ``MAX_ATOMS`` atoms per system, on a GPU); :func:`steps` then replaces a
chunk's scan. Results equal the step-by-step engine's within float tolerance (tests).
A system that goes non-finite inside a kernel call is marked failed and put back to
its configuration at the start of that call (the step-by-step engine keeps its last
finite step instead).
"""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from nvalchemi_jax import _pallas, neighbors, units
from nvalchemi_jax._linalg import inv3
from nvalchemi_jax.batch import Batch

#: Largest system (atoms) held in one program: all-pairs work grows as n². At 256 atoms
#: (argon, cutoff 8.5 Å) it does 2.6x the pair terms of a neighbor list and still runs
#: 1.1x the engine's speed at B >= 1,024 and 1.7x at B = 1 on an H200 (2026-11-29,
#: results/w1_resident_*); larger systems were not measured and stay with the engine.
MAX_ATOMS = 256
#: The all-pairs pass takes ROWS atoms at a time (fewer in smaller systems) and walks
#: their partners COLS at a time; Triton warps per program. H200, W1 at B = 1, 1,024 and
#: 4,096 (results/w1_resident_tiles_h200_2026-11-29.jsonl): 128 x 16 x 8 and 64 x 16 x 4
#: led (1.12-1.15e9 atom-steps/s at B >= 1,024); 8 warps were faster at B = 1 (6.9e6 vs
#: 5.6e6); 256 x 16 x 8, 64 x 32 x 4 and 128 x 16 x 4 were 15-25 % slower.
ROWS = 128
COLS = 16
NUM_WARPS = 8
#: Smallest padded system (a power of two, as Triton's tiles are).
MIN_WIDTH = 32
#: Few systems leave most of the GPU idle (one program each): then each system is split
#: over several programs (see :func:`parts_for`), at most PER_SM per multiprocessor, each
#: with the forces on at least SPLIT_ROWS atoms. A program takes all its pairs in one block
#: when they number at most WHOLE_TILE, else walks its partners SPLIT_COLS at a time (COLS
#: when it has more than 16 rows); SPLIT_WARPS per program, SMALL_WARPS for blocks of at
#: most SMALL_BLOCK pairs. The step is bound by latency (the barrier among programs, memory
#: round trips), so more, smaller programs and fewer blocks win. H200, device time per step
#: (results/probe_resident_h200_2026-11-30_variants*.jsonl): B = 1 2.70 µs in 256 programs
#: of one row, one block, 2 warps (4.41 µs in 32 programs of 8 rows walked 32 columns at
#: a time, as before); B = 4 3.87 against 4.56 µs (64 programs of 4 rows); B = 64 18.2
#: against 28.6 µs (4 programs of 64 rows; unsplit 28.2). PER_SM programs must fit on a
#: multiprocessor at once whatever their registers: 2 x 4 warps x 32 threads x 255
#: registers fit in its 65,536 (more warps may not, and the barrier would then give up).
SPLIT_ROWS = 1
PER_SM = 2
SPLIT_COLS = 32
SPLIT_WARPS = 4
WHOLE_TILE = 2048
SMALL_BLOCK = 256
SMALL_WARPS = 2


def enabled() -> bool:
    """``NVALCHEMI_JAX_RESIDENT=0`` turns the resident path off (it also needs the fused
    kernels, see :mod:`nvalchemi_jax._pallas`)."""
    return os.environ.get("NVALCHEMI_JAX_RESIDENT", "1") != "0"


def fused_nve(dyn, batch: Batch) -> bool:
    """Host side: whether ``dyn`` is a run the fused NVE kernels can take (this module's and
    :mod:`~nvalchemi_jax.dynamics.leapfrog`'s): exact NVE with a pair potential, no hooks,
    no stress, a step budget as the only convergence test, concrete inputs, fused kernels
    wanted (see :mod:`nvalchemi_jax._pallas`)."""
    from nvalchemi_jax.dynamics.integrators.nve import NVE
    from nvalchemi_jax.models.pair import PairPotential
    if type(dyn) is not NVE or dyn.hooks or dyn.wants_stress:
        return False
    if not isinstance(dyn.model, PairPotential):
        return False
    conv = dyn.convergence
    if conv is not None and any(c.key != "step" for c in conv.criteria):
        return False
    return not isinstance(batch.positions, jax.core.Tracer) and _pallas.wanted(batch.num_atoms)


def plan(dyn, batch: Batch) -> int:
    """Host side: the padded atoms per program (a power of two) if ``dyn`` can run ``batch``
    resident, else 0."""
    if not enabled() or not fused_nve(dyn, batch):
        return 0
    mask = np.asarray(batch.system_mask)
    if not mask.any():
        return 0
    n_atoms = np.asarray(batch.n_atoms)[mask]
    if n_atoms.max() > MAX_ATOMS or not np.asarray(batch.pbc)[mask].all():
        return 0
    cell = np.asarray(batch.cell, np.float64)[mask]
    widths = 1.0 / np.linalg.norm(np.linalg.inv(cell), axis=-2)
    if not (widths >= 2.0 * float(dyn.model.cutoff)).all():
        return 0
    return max(MIN_WIDTH, 1 << int(n_atoms.max() - 1).bit_length())


def parts_for(num_systems: int, width: int) -> int:
    """Host side: programs per system of the split kernel (:func:`call_split`), 0 for one
    program per system (:func:`call`). Split (a power of two) when every program of the grid
    still runs at once (``PER_SM`` per multiprocessor: a program of a few warps and
    registers leaves room for more) with at least ``SPLIT_ROWS`` rows each; never off GPUs.
    ``NVALCHEMI_JAX_RESIDENT_PARTS`` overrides it: 0 never splits, 1 runs the split kernel
    with one part (tests: Pallas' interpreter runs programs one after another, so more parts
    need a GPU)."""
    forced = os.environ.get("NVALCHEMI_JAX_RESIDENT_PARTS")
    if forced:
        parts = int(forced)
        if parts < 0 or parts & (parts - 1) or parts > width:
            raise ValueError(f"NVALCHEMI_JAX_RESIDENT_PARTS must be 0 or a power of two up to {width}, "
                             f"got {forced!r}")
        if parts > 1 and not _pallas.on_gpu():
            raise ValueError("NVALCHEMI_JAX_RESIDENT_PARTS > 1 needs a GPU (its programs must run at once)")
        return parts
    sms = _pallas.multiprocessors()
    parts = 1
    while 2 * parts * num_systems <= PER_SM * sms and width // (2 * parts) >= SPLIT_ROWS:
        parts *= 2
    return parts if parts > 1 else 0


def split_shape(width: int, parts: int) -> tuple[int, int, int]:
    """Host side: rows, column block and warps of each program of the split kernel."""
    rows = width // parts
    cols = width if rows * width <= WHOLE_TILE else min(SPLIT_COLS if rows <= 16 else COLS, width)
    warps = SMALL_WARPS if rows * cols <= SMALL_BLOCK else SPLIT_WARPS
    if PER_SM * warps * 32 * 255 > 65536:       # threads x most registers each, per multiprocessor
        raise ValueError(f"{PER_SM} programs of {warps} warps may not fit on a multiprocessor at once, "
                         "as the split kernel's barrier needs")
    return rows, cols, warps


def step_counts(dyn, state, batch: Batch, limit) -> jax.Array:
    """``(S,) int32``: steps each system takes in a chunk of at most ``limit``: 0 for those
    not running, fewer where the step budget (the only convergence test, see
    :func:`fused_nve`) ends sooner."""
    active = dyn.running(state, batch)
    conv = dyn.convergence_hook
    count = jnp.full(active.shape, limit, jnp.int32)
    if conv is not None:
        # Step criteria only: all of them hold from the largest threshold on.
        budget = math.ceil(max(c.threshold for c in conv.criteria))
        count = jnp.minimum(count, jnp.maximum(budget - state.step, 0))
    return jnp.where(active, count, 0)


def atom_table(batch: Batch, width: int) -> jax.Array:
    """``(S, width) int32``: each system's atoms in order (``num_atoms`` pads the rows)."""
    n, s = batch.num_atoms, batch.num_systems
    # system_segments unrolls its search on GPUs: jnp.searchsorted's default loop ran from
    # the host there, 9 graph launches a chunk.
    order, first, _ = neighbors.system_segments(batch)
    owner = batch.system_index[order]
    rank = jnp.arange(n, dtype=jnp.int32) - first[jnp.minimum(owner, s - 1)]
    table = jnp.full((s, width), n, jnp.int32)
    return table.at[owner, rank].set(order.astype(jnp.int32), mode="drop")


def steps(dyn, state, batch: Batch, limit, width: int, parts: int = 0):
    """Up to ``limit`` NVE steps of every running system in one kernel call (split over
    ``parts`` programs per system if not 0, see :func:`parts_for`); returns ``(state, steps
    taken)`` as the chunk's scan would."""
    from nvalchemi_jax.models.pair import species_table, symmetric
    start = state
    model = dyn.model
    active = dyn.running(state, batch)
    count = step_counts(dyn, state, batch, limit)

    table = atom_table(batch, width)
    present = table < batch.num_atoms
    at = jnp.minimum(table, batch.num_atoms - 1)
    dtype = state.positions.dtype
    species = species_table(model.species)
    kind = jnp.zeros_like(table) if species is None else jnp.asarray(species)[batch.atomic_numbers[at]]
    kind = jnp.where(present, kind, -1)
    mobile = present & batch.atom_mask[at] & ~batch.fixed[at]
    inv_mass = jnp.where(mobile, units.FORCE_TO_ACCELERATION / batch.masses[at], 0.0).astype(dtype)
    planar = lambda x: jnp.where(present[..., None], x[at], 0.0).transpose(0, 2, 1).reshape(-1)
    params = {name: symmetric(v) for name, v in model.pair_parameters().items()}
    num_species = 1 if species is None else int(np.max(species)) + 1
    args = (model.pair_term, float(model.cutoff), params, num_species, planar(state.positions),
            planar(state.velocities), planar(state.forces), kind.reshape(-1), inv_mass.reshape(-1),
            state.cell, state.stage.system["dt"], count, state.energy, width)
    if parts:
        x, v, f, energy, previous = call_split(*args, parts=parts)
    else:
        x, v, f, energy, previous = call(*args)

    back = lambda flat, old: old.at[table.reshape(-1)].set(
        flat.reshape(-1, 3, width).transpose(0, 2, 1).reshape(-1, 3), mode="drop")
    moved = count > 0
    state = state.replace(positions=back(x, state.positions), velocities=back(v, state.velocities),
                          forces=back(f, state.forces), energy=energy,
                          previous_energy=jnp.where(moved, previous, state.previous_energy),
                          step=state.step + count)
    state = dyn._mark_failures(start, state, batch, active)
    state, _ = dyn._converge(state, batch, active)
    taken = jnp.max(count)
    return state.replace(global_step=state.global_step + taken), taken


def _inputs(params, num_species, cell, dtype, interpret):
    """What both kernels take besides the atoms: the pair parameters as flat refs, the cells
    and their inverses, whether Pallas interprets, and its spare output entries."""
    from nvalchemi_jax.models.pair_kernel import _parameter_refs
    names, flat, is_table = _parameter_refs(params, num_species)
    cell = cell.astype(dtype)
    interpret = _pallas.interpreted(interpret)
    return (names, [p.astype(dtype) for p in flat], is_table, cell, inv3(cell), interpret,
            _pallas.spare(interpret))


def _frame(ref, system):
    """In a kernel: the 3 x 3 matrix of ``system`` from a flat ``(S * 9,)`` ref, as scalars."""
    return [[ref[system * 9 + 3 * r + a] for a in range(3)] for r in range(3)]


def _fractional(x, inverse):
    return [x[0] * inverse[0][b] + x[1] * inverse[1][b] + x[2] * inverse[2][b] for b in range(3)]


def _pair_block(acc, atoms, partners, x_i, s_i, kind_i, x_j, s_j, kind_j, cell, rc2, term, scalars,
                tables, num_species):
    """One tile of the all-pairs pass: rows ``atoms`` against columns ``partners`` (Cartesian
    ``x``, fractional ``s`` and species rows ``kind``, -1: no atom), each lane adding its own
    pair's energy and force terms to ``acc`` (4 tiles: φ, then φ'·d per component).
    ``tables``: ``(name, ref)`` of the per-species parameters."""
    # The nearest image from fractional separations, the vector from Cartesian ones
    # (x_j - x_i - n·cell, as the neighbor-list kernel forms it: rounding of the positions,
    # not of a lattice-scaled fraction, ~1e-5 of the force).
    n = [jnp.floor(s_j[c] - s_i[c] + 0.5) for c in range(3)]
    d = [x_j[a] - x_i[a] - n[0] * cell[0][a] - n[1] * cell[1][a] - n[2] * cell[2][a] for a in range(3)]
    r2 = d[0] * d[0] + d[1] * d[1] + d[2] * d[2]
    pair = (kind_i >= 0) & (kind_j >= 0) & (atoms[:, None] != partners[None, :]) & (r2 < rc2)
    r2 = jnp.where(pair, r2, rc2)
    p = dict(scalars)
    if tables:
        index = jnp.where(pair, kind_i * num_species + kind_j, 0)
        p.update({name: ref[index] for name, ref in tables})
    phi, dphi = jax.jvp(lambda y: term(y, p), (r2,), (jnp.ones_like(r2),))
    dphi = jnp.where(pair, dphi, 0.0)
    return (acc[0] + jnp.where(pair, phi, 0.0),) + tuple(acc[1 + a] + dphi * d[a] for a in range(3))


def call(term, cutoff, params, num_species, x, v, f, kind, inv_mass, cell, dt, count, energy,
         width, interpret=None):
    """The kernel on planar arrays ``(S * 3 * width,)`` (system, component, atom): ``dt``
    ``(S,)`` in fs, velocities in Å/fs, ``inv_mass`` in (Å/fs²)/(eV/Å) (0: does not move),
    ``count (S,)`` steps per system. Returns positions, velocities, forces (planar), and
    ``(S,)`` the energy after the last step and the one before it."""
    s = cell.shape[0]
    dtype = x.dtype
    names, flat, is_table, cell, inverse, interpret, extra = _inputs(params, num_species, cell, dtype,
                                                                     interpret)
    kernel = functools.partial(_kernel, width=width, rows=min(ROWS, width),
                               cols=min(COLS, width), term=term, names=tuple(names),
                               is_table=tuple(is_table), rc2=cutoff * cutoff,
                               num_species=num_species, dtype=dtype, interpret=interpret)
    planar = jax.ShapeDtypeStruct((x.shape[0] + extra,), dtype)
    per_system = jax.ShapeDtypeStruct((s + extra,), dtype)
    run = _pallas.call(kernel, [planar, planar, planar, per_system, per_system, planar], s, NUM_WARPS,
                       "resident_nve", interpret)
    outs = run(x, v, f, kind, inv_mass, cell.reshape(-1), inverse.reshape(-1), dt.astype(dtype),
               count, energy.astype(dtype), *flat)
    n = x.shape[0]
    return outs[0][:n], outs[1][:n], outs[2][:n], outs[3][:s], outs[4][:s]


def _kernel(x_ref, v_ref, f_ref, kind_ref, im_ref, cell_ref, inv_ref, dt_ref, count_ref, e_ref,
            *refs, width, rows, cols, term, names, is_table, rc2, num_species, dtype, interpret):
    from jax.experimental import pallas as pl
    param_refs = refs[:len(names)]
    xo_ref, vo_ref, fo_ref, eo_ref, ep_ref, so_ref = refs[len(names):]
    system = pl.program_id(0)
    lanes = jnp.arange(width, dtype=jnp.int32)
    base = system * 3 * width
    comp = lambda ref, a: ref[base + a * width + lanes]
    kind = kind_ref[system * width + lanes]
    present = kind >= 0
    inv_mass = im_ref[system * width + lanes]
    cell, inverse = _frame(cell_ref, system), _frame(inv_ref, system)
    dt = dt_ref[system]
    scalars = {name: ref[0] for name, ref, table in zip(names, param_refs, is_table) if not table}
    tables = [(name, ref) for name, ref, table in zip(names, param_refs, is_table) if table]
    barrier = (lambda: None) if interpret else _barrier

    def write(ref, a, value, atoms=None):
        index = base + a * width + (lanes if atoms is None else atoms)
        _pallas.store(ref, index, value, jnp.ones(index.shape, bool))

    def forces():
        """Forces and energy at the positions in ``xo_ref`` (Cartesian) and ``so_ref``
        (fractional), the scratch the step writes: ``rows`` atoms at a time, their partners
        ``cols`` at a time, each lane accumulating its own column (one row sum per tile,
        not one cross-thread reduction per block)."""

        def tile(t, energy):
            atoms = t * rows + jnp.arange(rows, dtype=jnp.int32)
            x_i = [xo_ref[base + a * width + atoms][:, None] for a in range(3)]
            s_i = [so_ref[base + a * width + atoms][:, None] for a in range(3)]
            kind_i = kind_ref[system * width + atoms][:, None]

            def block(b, acc):
                partners = b * cols + jnp.arange(cols, dtype=jnp.int32)
                x_j = [xo_ref[base + a * width + partners][None, :] for a in range(3)]
                s_j = [so_ref[base + a * width + partners][None, :] for a in range(3)]
                kind_j = kind_ref[system * width + partners][None, :]
                return _pair_block(acc, atoms, partners, x_i, s_i, kind_i, x_j, s_j, kind_j, cell, rc2,
                                   term, scalars, tables, num_species)

            zero = jnp.zeros((rows, cols), dtype)
            acc = jax.lax.fori_loop(0, width // cols, block, (zero,) * 4)
            mobile = im_ref[system * width + atoms] > 0
            for a in range(3):
                write(fo_ref, a, jnp.where(mobile, 2.0 * jnp.sum(acc[1 + a], axis=1), 0.0), atoms)
            return energy + acc[0]

        energy = jax.lax.fori_loop(0, width // rows, tile, jnp.zeros((rows, cols), dtype))
        barrier()
        return [comp(fo_ref, a) for a in range(3)], 0.5 * jnp.sum(energy)

    def step(_, carry):
        x, v, f, energy, previous = carry
        v = [v[a] + 0.5 * dt * inv_mass * f[a] for a in range(3)]
        x = [x[a] + dt * v[a] for a in range(3)]
        frac = _fractional(x, inverse)
        for a in range(3):
            write(xo_ref, a, x[a])
            write(so_ref, a, frac[a])
        barrier()
        f, new = forces()
        v = [v[a] + 0.5 * dt * inv_mass * f[a] for a in range(3)]
        return x, v, f, new, energy

    x = [comp(x_ref, a) for a in range(3)]
    v = [comp(v_ref, a) for a in range(3)]
    f = [comp(f_ref, a) for a in range(3)]
    for a in range(3):
        write(fo_ref, a, f[a])
    energy = e_ref[system]
    x, v, f, energy, previous = jax.lax.fori_loop(0, count_ref[system], step,
                                                  (x, v, f, energy, energy))
    for a in range(3):
        write(xo_ref, a, jnp.where(present, x[a], 0.0))
        write(vo_ref, a, v[a])
    del f
    eo_ref[system] = energy
    ep_ref[system] = previous


def call_split(term, cutoff, params, num_species, x, v, f, kind, inv_mass, cell, dt, count, energy,
               width, parts, interpret=None):
    """:func:`call` with each system split over ``parts`` programs (see :func:`_split_kernel`)."""
    s = cell.shape[0]
    dtype = x.dtype
    names, flat, is_table, cell, inverse, interpret, extra = _inputs(params, num_species, cell, dtype,
                                                                     interpret)
    _, cols, warps = split_shape(width, parts)
    kernel = functools.partial(_split_kernel, width=width, parts=parts, cols=cols, term=term,
                               names=tuple(names), is_table=tuple(is_table), rc2=cutoff * cutoff,
                               num_species=num_species, dtype=dtype, interpret=interpret)
    n = x.shape[0]
    shape = lambda size, dt=dtype: jax.ShapeDtypeStruct((size + extra,), dt)
    out_shape = [shape(n), shape(n), shape(n), shape(s * parts * 2), shape(n * parts), shape(n * parts),
                 shape(2 * n), shape(s, jnp.int32)]
    run = _pallas.call(kernel, out_shape, s * parts, warps, "resident_nve_split", interpret,
                       aliases={10: 7})
    counter = jnp.zeros((s + extra,), jnp.int32)
    outs = run(x, v, f, kind, inv_mass, cell.reshape(-1), inverse.reshape(-1), dt.astype(dtype),
               count, energy.astype(dtype), counter, *flat)
    partial = outs[3][:s * parts * 2].reshape(s, parts, 2).sum(axis=1)
    # A system that moved ends at the sum of its programs' energies; one that took a single
    # step was at its input energy before it.
    energy = energy.astype(dtype)
    last = jnp.where(count > 0, partial[:, 0], energy)
    before = jnp.where(count > 1, partial[:, 1], energy)
    return outs[0][:n], outs[1][:n], outs[2][:n], last, before


def _split_kernel(x_ref, v_ref, f_ref, kind_ref, im_ref, cell_ref, inv_ref, dt_ref, count_ref, e_ref,
                  counter_in, *refs, width, parts, cols, term, names, is_table, rc2, num_species, dtype,
                  interpret):
    """:func:`_kernel` for few systems: program ``p`` of a system evaluates the forces on its
    ``width / parts`` rows against every atom, writes them to a shared buffer, and waits at a
    barrier for the system's other programs (:func:`~nvalchemi_jax._pallas.barrier`, which
    gives up after ``_pallas.MAX_SPIN`` spins: the programs could only wait that long if they
    were not all running at once, which :func:`parts_for` rules out; the system then ends
    non-finite and is failed); then every program reads all forces (volatile
    loads: a cached line of another program's writes could be stale) and integrates the whole
    system itself, so all of them hold the same positions without exchanging them. One
    barrier per step; the forces buffer alternates between two halves by step, so a program
    that runs ahead cannot overwrite forces another one still reads."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu
    param_refs = refs[:len(names)]
    xo_ref, vo_ref, fo_ref, eo_ref, xs_ref, ss_ref, fx_ref, counter = refs[len(names):]
    del counter_in          # the same buffer as `counter` (aliased), zeros at the start
    program = pl.program_id(0)
    system, part = program // parts, program % parts
    rows = width // parts
    lanes = jnp.arange(width, dtype=jnp.int32)
    atoms = part * rows + jnp.arange(rows, dtype=jnp.int32)          # this program's rows
    base = system * 3 * width
    own = program * 3 * width                                         # its scratch copy
    comp = lambda ref, a: ref[base + a * width + lanes]
    kind = kind_ref[system * width + lanes]
    present = kind >= 0
    inv_mass = im_ref[system * width + lanes]
    kind_i = kind_ref[system * width + atoms][:, None]
    mobile_i = im_ref[system * width + atoms] > 0
    cell, inverse = _frame(cell_ref, system), _frame(inv_ref, system)
    dt = dt_ref[system]
    scalars = {name: ref[0] for name, ref, table in zip(names, param_refs, is_table) if not table}
    tables = [(name, ref) for name, ref, table in zip(names, param_refs, is_table) if table]
    barrier = (lambda: None) if interpret else _barrier
    put = lambda ref, index, value: _pallas.store(ref, index, value, jnp.ones(index.shape, bool))

    def block(b, acc):
        partners = b * cols + jnp.arange(cols, dtype=jnp.int32)
        x_i = [xs_ref[own + a * width + atoms][:, None] for a in range(3)]
        s_i = [ss_ref[own + a * width + atoms][:, None] for a in range(3)]
        x_j = [xs_ref[own + a * width + partners][None, :] for a in range(3)]
        s_j = [ss_ref[own + a * width + partners][None, :] for a in range(3)]
        kind_j = kind_ref[system * width + partners][None, :]
        return _pair_block(acc, atoms, partners, x_i, s_i, kind_i, x_j, s_j, kind_j, cell, rc2, term,
                           scalars, tables, num_species)

    def arrive_and_wait(t, stuck):
        """The system's barrier of step ``t``: True if it gave up waiting (now or before:
        then it no longer waits, and its results are NaN, see below)."""
        if interpret:       # one part there (programs run one after another; no atomics)
            return stuck
        return stuck | ~_pallas.barrier(counter, system, (t + 1) * parts, skip=stuck)

    def step(t, carry):
        x, v, f, energy, previous, stuck = carry
        v = [v[a] + 0.5 * dt * inv_mass * f[a] for a in range(3)]
        x = [x[a] + dt * v[a] for a in range(3)]
        frac = _fractional(x, inverse)
        for a in range(3):
            put(xs_ref, own + a * width + lanes, x[a])
            put(ss_ref, own + a * width + lanes, frac[a])
        barrier()
        zero = jnp.zeros((rows, cols), dtype)
        acc = jax.lax.fori_loop(0, width // cols, block, (zero,) * 4)
        half = (system * 2 + (t & 1)) * 3 * width
        for a in range(3):
            put(fx_ref, half + a * width + atoms, jnp.where(mobile_i, 2.0 * jnp.sum(acc[1 + a], axis=1), 0.0))
        barrier()           # every thread's rows are written before the program arrives
        stuck = arrive_and_wait(t, stuck)
        f = [plgpu.load(fx_ref.at[half + a * width + lanes], volatile=True) for a in range(3)]
        v = [v[a] + 0.5 * dt * inv_mass * f[a] for a in range(3)]
        return x, v, f, 0.5 * jnp.sum(acc[0]), energy, stuck

    x = [comp(x_ref, a) for a in range(3)]
    v = [comp(v_ref, a) for a in range(3)]
    f = [comp(f_ref, a) for a in range(3)]
    zero = jnp.zeros((), dtype)
    x, v, f, energy, previous, stuck = jax.lax.fori_loop(
        0, count_ref[system], step, (x, v, f, zero, zero, jnp.zeros((), bool)))
    nan = jnp.asarray(jnp.nan, dtype)
    # Every program holds the same system; the first writes it out.
    mine = jnp.full((width,), part == 0)
    spare = xo_ref.shape[0] - 1 if interpret else 0       # where the interpreter writes masked lanes
    for a in range(3):
        index = jnp.where(mine, base + a * width + lanes, spare)
        _pallas.store(xo_ref, index, jnp.where(stuck, nan, jnp.where(present, x[a], 0.0)), mine)
        _pallas.store(vo_ref, index, v[a], mine)
        _pallas.store(fo_ref, index, f[a], mine)
    # A program that gave up waiting read forces of another step: every program reports it
    # through its energy (the system's sum goes NaN and the system fails), not only the first.
    eo_ref[program * 2] = jnp.where(stuck, nan, energy)
    eo_ref[program * 2 + 1] = jnp.where(stuck, nan, previous)


def _barrier():
    """All threads of the program reach this point, and their memory writes are visible."""
    from jax.experimental.pallas import triton as plgpu
    plgpu.debug_barrier()
