"""The pair sums of :mod:`~nvalchemi_jax.models.pair` as one fused GPU kernel (Pallas).

XLA splits the closed-form pass (gather neighbors -> φ, φ' -> energy, force and virial
row sums) into several kernels that write the per-pair values to memory and read them
back. This kernel reads each neighbor row once and keeps everything per pair in
registers: a program takes ``block_rows`` atoms and walks their rows ``block_cols``
neighbors at a time, gathering neighbor positions, lattice shifts and per-species
parameters, and accumulates the row sums.

It is a drop-in for :func:`~nvalchemi_jax.models.pair.pair_sums` (same outputs), used on
GPUs; ``NVALCHEMI_JAX_KERNELS=xla`` turns it off (see :mod:`nvalchemi_jax._pallas`).
Differentiating through it (force fitting, differentiable simulation) falls back to the
XLA formulation, whose derivatives are the same quantities (a custom JVP).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from nvalchemi_jax import _pallas
from nvalchemi_jax.batch import Batch
from nvalchemi_jax.neighbors import PACKED_PADDING, NeighborList, unpack_shift_code

# Block shape (powers of two: Triton's tiles). On an H200 (argon, K = 99) 32 x 16 with 4
# warps was fastest, before (2026-11-28) and after (2026-11-29, whole W1/W2 runs:
# results/pair_kernel_blocks_ab_*) the per-lane accumulators; 64 x 16 x 8 was within 3 %,
# 64 x 16 x 4 and 128 x 16 x 8 14-18 % slower at B >= 1,024. Triton's pipelining of the
# block loop (num_stages 2 vs 1) gained 0-5 % (results/pair_kernel_variants_*); Pallas
# cannot lower an unrolled loop.
BLOCK_ROWS = 32     # atoms per program
BLOCK_COLS = 16     # neighbors per inner step
NUM_WARPS = 4
NUM_STAGES = 2


def frame_rows(frame_ref, system):
    """In a kernel: ``frame[r][a] (B, 1)``, lattice row r, component a, of each atom's
    system, from a flat ``(S * 9,)`` ref."""
    return [[frame_ref[system * 9 + 3 * r + a][:, None] for a in range(3)] for r in range(3)]


def displacements(x_j, x_i, shift, frame):
    """Pair vectors ``d = x_j - x_i + Σ_r shift_r frame_r`` as three components, and |d|²."""
    d = [x_j[a] - x_i[a] + shift[0] * frame[0][a] + shift[1] * frame[1][a]
         + shift[2] * frame[2][a] for a in range(3)]
    return d, d[0] * d[0] + d[1] * d[1] + d[2] * d[2]


def _parameter_refs(params: dict, num_species: int):
    """Tables (symmetric: the caller's job) flattened; scalars as ``(1,)``."""
    names, flat, tables = [], [], []
    for name, value in params.items():
        value = jnp.asarray(value)
        names.append(name)
        if value.ndim == 0:
            flat.append(value.reshape(1))
            tables.append(False)
        else:
            if value.shape != (num_species, num_species):
                raise ValueError(f"pair parameter {name!r} has shape {value.shape}, "
                                 f"expected ({num_species}, {num_species})")
            flat.append(value.reshape(-1))
            tables.append(True)
    return names, flat, tables


def kernel_arguments(term, cutoff: float, params: dict, rows: jax.Array | None, num_species: int,
                     positions: jax.Array, cell: jax.Array, batch: Batch, nl: NeighborList,
                     n_out: int):
    """What :func:`row_sums` needs: its static settings (a dict) and, in the order a kernel
    receives them, the neighbor table, shifts, system index, cells, species rows and pair
    parameters (positions are passed separately, see :func:`pair_sums`)."""
    n, k = nl.indices.shape
    if rows is None:
        rows = jnp.zeros((n,), jnp.int32)
    names, flat, is_table = _parameter_refs(params, num_species)
    settings = dict(n=n, k=k, s=cell.shape[0], num_species=num_species, term=term,
                    names=tuple(names), is_table=tuple(is_table), rc2=float(cutoff) ** 2,
                    n_out=n_out, dtype=positions.dtype, packed=nl.spec.shift_dtype == "packed")
    inputs = [nl.indices.reshape(-1), nl.shifts.reshape(-1), batch.system_index,
              cell.reshape(-1).astype(positions.dtype), rows,
              *[v.astype(positions.dtype) for v in flat]]
    return settings, inputs


def padded_rows(positions: jax.Array) -> jax.Array:
    """Positions as the kernels' rows (x, y, z, 0), flat: a neighbor's position is one
    vector load, not three (H200, float32, 2026-11-29: 5-20 % faster,
    results/pair_kernel_packed_positions_*)."""
    padded = positions if positions.shape[-1] == 4 else jnp.pad(positions, ((0, 0), (0, 1)))
    return padded.reshape(-1)


def pair_sums(term, cutoff: float, params: dict, rows: jax.Array | None, num_species: int,
              positions: jax.Array, cell: jax.Array, batch: Batch, nl: NeighborList,
              stress: bool, interpret: bool | None = None) -> list[jax.Array]:
    """Per-atom row sums ``[½Σφ, 2Σφ'dx, 2Σφ'dy, 2Σφ'dz]`` (+ ``Σφ'd_a d_b`` for
    ``ab`` in xx, xy, xz, yy, yz, zz with ``stress``), each ``(N,)``. ``positions`` may be
    ``(N, 3)`` or already the kernel's ``(N, 4)`` rows (x, y, z, 0).

    term: ``term(r2, p) -> φ`` elementwise, ``p`` the per-pair values of ``params``.
    rows: ``(N,) int32`` each atom's row in the ``(num_species, num_species)`` parameter
        tables (-1: no parameters), or ``None`` for scalar parameters only.
    interpret: run in Pallas' interpreter (default: when not on a GPU).
    """
    n = nl.indices.shape[0]
    n_out = 10 if stress else 4
    settings, inputs = kernel_arguments(term, cutoff, params, rows, num_species, positions, cell,
                                        batch, nl, n_out)
    interpret = _pallas.interpreted(interpret)
    extra = _pallas.spare(interpret)      # masked-out lanes go to index n
    out_shape = [jax.ShapeDtypeStruct((n + extra,), positions.dtype)] * n_out
    call = _pallas.call(functools.partial(_kernel, **settings), out_shape, -(-n // BLOCK_ROWS),
                        NUM_WARPS, "pair_sums", interpret, NUM_STAGES)
    outs = call(padded_rows(positions), *inputs)
    return [out[:n] for out in outs]


def row_sums(i, live, pos_ref, offset, idx_ref, shift_ref, sys_ref, cell_ref, rows_ref, param_refs, *,
             n, k, s, num_species, term, names, is_table, rc2, n_out, dtype, packed,
             block_cols=None):
    """In a kernel: the ``n_out`` row sums of :func:`pair_sums` for atoms ``i`` (``(R,)``,
    clamped to real atoms; ``live`` marks the real ones), walking their rows ``block_cols``
    neighbors at a time (default ``BLOCK_COLS``); positions are the rows (x, y, z, 0) at
    ``pos_ref[offset:]``; only the blocks of columns that hold entries (:func:`used_blocks`)."""
    block_cols = block_cols or BLOCK_COLS
    x_i = [pos_ref[offset + i * 4 + a][:, None] for a in range(3)]
    system = jnp.clip(sys_ref[i], 0, s - 1)
    cell = frame_rows(cell_ref, system)          # image = Σ_r shift_r · cell[r]
    row_i = rows_ref[i][:, None]
    scalars = {name: ref[0] for name, ref, table in zip(names, param_refs, is_table) if not table}

    def block(b, acc):
        col = b * block_cols + jnp.arange(block_cols, dtype=jnp.int32)
        inside = live[:, None] & (col[None, :] < k)
        flat = jnp.where(inside, i[:, None] * k + col[None, :], 0)
        j = _pallas.load(idx_ref, flat, inside, n)
        real = j < n
        j = jnp.where(real, j, 0)
        if packed:      # one byte per neighbor: base-5 digits n_a + 2 (neighbors.NeighborSpec)
            code = _pallas.load(shift_ref, flat, inside, PACKED_PADDING).astype(jnp.int32)
            shift = [c.astype(dtype) for c in unpack_shift_code(code)]
        else:
            shift = [_pallas.load(shift_ref, flat * 3 + r, inside, 0).astype(dtype)
                     for r in range(3)]
        lane = jnp.arange(4, dtype=jnp.int32)[None, None, :]    # one vector load per neighbor,
        row = pos_ref[offset + j[:, :, None] * 4 + lane]         # its lanes split in registers
        x_j = [jnp.sum(jnp.where(lane == a, row, 0.0), axis=2) for a in range(3)]
        d, r2 = displacements(x_j, x_i, shift, cell)
        within = real & (r2 < rc2)
        r2 = jnp.where(within, r2, rc2)
        p = dict(scalars)
        if len(scalars) < len(names):
            row_j = rows_ref[j]
            known = (row_i >= 0) & (row_j >= 0)
            pair_row = jnp.where(known, row_i * num_species + row_j, 0)
            for name, ref, table in zip(names, param_refs, is_table):
                if table:
                    p[name] = jnp.where(known, ref[pair_row], jnp.nan)
        phi, dphi = jax.jvp(lambda x: term(x, p), (r2,), (jnp.ones_like(r2),))
        phi = jnp.where(within, phi, 0.0)
        dphi = jnp.where(within, dphi, 0.0)
        terms = [0.5 * phi] + [2.0 * dphi * d[a] for a in range(3)]
        if n_out > 4:
            terms += [dphi * d[a] * d[c] for a in range(3) for c in range(a, 3)]
        return tuple(total + t for total, t in zip(acc, terms))

    # Per-lane accumulators, summed over the columns once at the end: a row sum at every
    # block step would cost cross-thread shuffles per term and step.
    zero = jnp.zeros((i.shape[0], block_cols), dtype)
    acc = jax.lax.fori_loop(0, used_blocks(i, live, idx_ref, n=n, k=k, block_cols=block_cols), block,
                            (zero,) * n_out)
    return [jnp.sum(value, axis=1) for value in acc]


def used_blocks(i, live, idx_ref, *, n, k, block_cols):
    """In a kernel: how many blocks of ``block_cols`` columns hold entries in the rows of
    atoms ``i``. Rows are filled from the front (:func:`~nvalchemi_jax.neighbors.build`;
    padding = ``n`` after a row's last entry), so a block is used when its first column is
    in some row. A table has spare columns beyond its longest row (its capacity, and the
    last block's round-up): W2's argon at a 1.3 Å skin has 119 columns, rows of 104 at
    most, so these rows take 7 blocks of 16, not 8. One gather of a column per block."""
    blocks = -(-k // block_cols)
    if blocks == 1:
        return 1
    b = jnp.arange(1 << (blocks - 1).bit_length(), dtype=jnp.int32)     # Triton: powers of two
    inside = live[:, None] & (b[None, :] < blocks)
    first = _pallas.load(idx_ref, jnp.where(inside, i[:, None] * k + b[None, :] * block_cols, 0), inside, n)
    return jnp.max(jnp.sum((first < n).astype(jnp.int32), axis=1))


def _kernel(pos_ref, idx_ref, shift_ref, sys_ref, cell_ref, rows_ref, *refs, **settings):
    from jax.experimental import pallas as pl
    names, n = settings["names"], settings["n"]
    param_refs, out_refs = refs[:len(names)], refs[len(names):]
    i = pl.program_id(0) * BLOCK_ROWS + jnp.arange(BLOCK_ROWS, dtype=jnp.int32)
    live = i < n
    i = jnp.where(live, i, 0)
    sums = row_sums(i, live, pos_ref, 0, idx_ref, shift_ref, sys_ref, cell_ref, rows_ref, param_refs,
                    **settings)
    for ref, value in zip(out_refs, sums):
        _pallas.store(ref, jnp.where(live, i, n), value, live)
