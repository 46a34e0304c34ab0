"""The cell-list build's candidate scan as one fused GPU kernel (Pallas).

XLA's form scans the stencil of bins one offset at a time, each pass scattering into the
whole ``(N, K)`` table (27 passes over ~180 MB at 256,000 atoms: ~16 ms per build on an
H200). Here a program takes ``BLOCK_ROWS`` atoms, walks their stencil bins in registers,
and appends each accepted neighbor to its row (a prefix sum over the bin's candidates
gives the slots), then pads the rest of the row. The bins' ranges come from XLA
(:func:`~nvalchemi_jax.neighbors._build_cell_list`), so the output is the same list, in
the same order, as the XLA form.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from nvalchemi_jax import _pallas

BLOCK_ROWS = 32
NUM_WARPS = 4


def scan_bins(positions, frame, system_index, order, floor, lo, count, base, *, rc: float,
              max_neighbors: int, max_atoms_per_bin: int, shift_dtype, interpret=None):
    """Rows of the neighbor table from the candidates of each atom's stencil bins.

    positions ``(N, 3)``; frame ``(S, 3, 3)`` (lattice rows; shift n -> n @ frame);
    system_index ``(N,)``; order ``(N,)`` atoms sorted by bin; floor ``(N, 3) int32`` each
    atom's cell of origin; for each atom and stencil offset t: ``lo (N, T)`` the bin's
    first position in ``order``, ``count (N, T)`` its atoms to scan (0 = skip), ``base
    (N, T, 3) int32`` the bin's lattice image plus the atom's own ``floor``.

    Returns ``indices (N, K) int32`` (padding N), ``shifts (N, K, 3)`` (``shift_dtype``,
    clipped to its range), ``total (N,) int32`` neighbors found (may exceed K: overflow)
    and ``reach (N, 3) int32`` each row's largest ``|shift|`` per axis.
    """
    n, t = lo.shape
    k = max_neighbors
    tile = 1 << max(0, (max_atoms_per_bin - 1).bit_length())      # power of two >= bin size
    most = int(jnp.iinfo(shift_dtype).max)
    kernel = functools.partial(_kernel, n=n, k=k, t=t, s=frame.shape[0], tile=tile,
                               rc2=float(rc) ** 2, most=most, shift_dtype=shift_dtype)
    interpret = _pallas.interpreted(interpret)
    extra = _pallas.spare(interpret)      # masked-out lanes go to index n * k
    out_shape = [jax.ShapeDtypeStruct((n * k + extra,), jnp.int32),
                 jax.ShapeDtypeStruct((n * k * 3 + 3 * extra,), shift_dtype),
                 jax.ShapeDtypeStruct((n + extra,), jnp.int32),
                 jax.ShapeDtypeStruct((n * 3 + 3 * extra,), jnp.int32)]
    call = _pallas.call(kernel, out_shape, -(-n // BLOCK_ROWS), NUM_WARPS, "cell_list_scan",
                        interpret)
    indices, shifts, total, reach = call(
        positions.reshape(-1), positions[order].reshape(-1),
        frame.reshape(-1).astype(positions.dtype), system_index, order,
        floor[order].reshape(-1), lo.reshape(-1), count.reshape(-1), base.reshape(-1))
    return (indices[:n * k].reshape(n, k), shifts[:n * k * 3].reshape(n, k, 3), total[:n],
            reach[:n * 3].reshape(n, 3))


def _kernel(pos_ref, sorted_pos_ref, frame_ref, sys_ref, order_ref, sorted_floor_ref, lo_ref,
            count_ref, base_ref, idx_out, shift_out, total_out, reach_out, *, n, k, t, s, tile,
            rc2, most, shift_dtype):
    from jax.experimental import pallas as pl
    r = pl.program_id(0) * BLOCK_ROWS + jnp.arange(BLOCK_ROWS, dtype=jnp.int32)
    live = r < n
    i = order_ref[jnp.where(live, r, 0)]          # this program's atoms, in bin order
    x_i = [pos_ref[i * 3 + a][:, None] for a in range(3)]
    system = jnp.clip(sys_ref[i], 0, s - 1)
    frame = [[frame_ref[system * 9 + 3 * r + a][:, None] for a in range(3)] for r in range(3)]
    m = jnp.arange(tile, dtype=jnp.int32)[None, :]

    def offset(o, carry):
        total, reach = carry
        at = i * t + o
        lo = lo_ref[at][:, None]
        valid = live[:, None] & (m < count_ref[at][:, None])
        q = jnp.where(valid, lo + m, 0)           # candidates: contiguous in bin order
        j = _pallas.load(order_ref, q, valid, 0)
        shift = [base_ref[at * 3 + a][:, None] - _pallas.load(sorted_floor_ref, q * 3 + a, valid, 0)
                 for a in range(3)]
        d = [_pallas.load(sorted_pos_ref, q * 3 + a, valid, 0.0) - x_i[a]
             + shift[0] * frame[0][a] + shift[1] * frame[1][a] + shift[2] * frame[2][a]
             for a in range(3)]
        d2 = d[0] * d[0] + d[1] * d[1] + d[2] * d[2]
        self_pair = (j == i[:, None]) & (shift[0] == 0) & (shift[1] == 0) & (shift[2] == 0)
        ok = valid & (d2 < rc2) & ~self_pair
        slot = total[:, None] + jnp.cumsum(ok, axis=1, dtype=jnp.int32) - 1
        keep = ok & (slot < k)
        where = jnp.where(keep, i[:, None] * k + slot, n * k)
        _pallas.store(idx_out, where, j, keep)
        for a in range(3):
            value = jnp.clip(shift[a], -most, most).astype(shift_dtype)
            _pallas.store(shift_out, where * 3 + a, value, keep)
        reach = tuple(jnp.maximum(r, jnp.max(jnp.where(ok, jnp.abs(shift[a]), 0), axis=1))
                      .astype(jnp.int32) for a, r in enumerate(reach))
        return total + jnp.sum(ok, axis=1, dtype=jnp.int32), reach

    zero = jnp.zeros((BLOCK_ROWS,), jnp.int32)
    total, reach = jax.lax.fori_loop(0, t, offset, (zero, (zero, zero, zero)))
    # The rest of each row is padding (its slots were not written above).
    pad = 32

    def fill(b, carry):
        col = b * pad + jnp.arange(pad, dtype=jnp.int32)[None, :]
        empty = live[:, None] & (col >= total[:, None]) & (col < k)
        where = jnp.where(empty, i[:, None] * k + col, n * k)
        _pallas.store(idx_out, where, jnp.full(where.shape, n, jnp.int32), empty)
        for a in range(3):
            _pallas.store(shift_out, where * 3 + a, jnp.zeros(where.shape, shift_dtype), empty)
        return carry

    jax.lax.fori_loop(0, -(-k // pad), fill, 0)
    row = jnp.where(live, i, n)
    _pallas.store(total_out, row, total, live)
    for a in range(3):
        _pallas.store(reach_out, row * 3 + a, reach[a], live)
