"""The neighbor-list builds' candidate scans as fused GPU kernels (Pallas).

XLA's forms scan candidates one block at a time, each pass scattering into the whole
``(N, K)`` table (the cell list's 27 stencil passes moved ~180 MB each at 256,000 atoms:
~16 ms per build on an H200). Here a program takes ``BLOCK_ROWS`` atoms, examines their
candidates in registers and appends each accepted neighbor to its row (a prefix sum over
the candidates gives the slots), then pads the rest of the row. Candidates, their order and
their lattice shifts are those of the XLA forms in :mod:`~nvalchemi_jax.neighbors` (which
computes each system's or bin's range), so the tables are identical.

* :func:`scan_bins` (cell list): programs take atoms in bin order, and candidates are
  read from positions sorted by bin, so a bin's atoms are contiguous in memory and a
  program's atoms share their bins (cache hits).
* :func:`scan_systems` (all pairs): each atom's candidates are its system's atoms times
  the system's periodic images.

Both can rebuild some rows only (``todo``): the previous table is aliased to the output,
rows not to do are never written, and a program with no row to do skips its scan, so a
partial rebuild costs about what its rows need.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nvalchemi_jax import _pallas

BLOCK_ROWS = 32
NUM_WARPS = 4


def scan_bins(positions, frame, system_index, order, floor, lo, count, base, *, rc: float,
              max_neighbors: int, max_atoms_per_bin: int, shift_dtype, todo=None, previous=None,
              interpret=None):
    """Rows of the neighbor table from the candidates of each atom's stencil bins.

    positions ``(N, 3)``; frame ``(S, 3, 3)`` (lattice rows; shift n -> n @ frame);
    system_index ``(N,)``; order ``(N,)`` atoms sorted by bin; floor ``(N, 3) int32`` each
    atom's cell of origin; for each atom and stencil offset t: ``lo (N, T)`` the bin's
    first position in ``order``, ``count (N, T)`` its atoms to scan (0 = skip), ``base
    (N, T, 3) int32`` the bin's lattice image plus the atom's own ``floor``.

    todo ``(N,) bool`` (optional): the rows to build; the others are ``previous``'s
    ``(indices, shifts)`` unchanged (and their ``total`` and ``reach`` are undefined).

    Returns ``indices (N, K) int32`` (padding N), ``shifts (N, K, 3)`` (``shift_dtype``,
    clipped to its range), ``total (N,) int32`` neighbors found (may exceed K: overflow)
    and ``reach (N, 3) int32`` each row's largest ``|shift|`` per axis.
    """
    n, t = lo.shape
    tile = 1 << max(0, (max_atoms_per_bin - 1).bit_length())      # power of two >= bin size
    return _scan(_bins_kernel, "cell_list_scan", n, max_neighbors, shift_dtype, todo, previous, interpret,
                 dict(t=t, s=frame.shape[0], tile=tile, rc2=float(rc) ** 2),
                 positions.reshape(-1), positions[order].reshape(-1),
                 frame.reshape(-1).astype(positions.dtype), system_index, order,
                 floor[order].reshape(-1), lo.reshape(-1), count.reshape(-1), base.reshape(-1))


def scan_systems(positions, frac, frame, system_index, order, start, candidates, images, radix,
                 reach, flip, periodic, *, rc: float, max_neighbors: int, shift_dtype, todo=None,
                 previous=None, interpret=None):
    """Rows of the neighbor table from each atom's system: with ``count_i = candidates_i //
    images_i`` atoms in it, candidate ``m`` of atom i is atom ``order[start_i + m % count_i]``
    in image ``m // count_i`` (mixed radix ``radix_i``; see
    :func:`~nvalchemi_jax.neighbors._build_all_pairs` for the image rule).

    Per atom: positions, frac ``(N, 3)``; start, candidates, images ``(N,)``; radix, reach
    ``(N, 3) int32``; flip ``(N,) bool``; periodic ``(N, 3) bool``. frame ``(S, 3, 3)``.
    todo, previous: as for :func:`scan_bins`. Returns what :func:`scan_bins` returns.
    """
    n = positions.shape[0]
    return _scan(_systems_kernel, "all_pairs_scan", n, max_neighbors, shift_dtype, todo, previous, interpret,
                 dict(s=frame.shape[0], tile=64, rc2=float(rc) ** 2),
                 positions.reshape(-1), frac.reshape(-1), frame.reshape(-1).astype(positions.dtype),
                 system_index, order, start, candidates, images, radix.reshape(-1),
                 reach.reshape(-1), flip.astype(jnp.int32), periodic.astype(jnp.int32).reshape(-1))


def _scan(kernel, name, n, k, shift_dtype, todo, previous, interpret, static, *inputs):
    interpret = _pallas.interpreted(interpret)
    extra = _pallas.spare(interpret)      # masked-out lanes go to the entry after the table
    shift_dtype = jnp.dtype(shift_dtype)
    most = int(jnp.iinfo(shift_dtype).max)
    out_shape = [jax.ShapeDtypeStruct((n * k + extra,), jnp.int32),
                 jax.ShapeDtypeStruct((n * k * 3 + 3 * extra,), shift_dtype),
                 jax.ShapeDtypeStruct((n + extra,), jnp.int32),
                 jax.ShapeDtypeStruct((n * 3 + 3 * extra,), jnp.int32)]
    n_in = len(inputs)
    todo = jnp.ones(n, jnp.int32) if todo is None else todo.astype(jnp.int32)
    inputs = inputs + (todo,)
    aliases = {}
    if previous is not None:              # rows not to do keep the previous table's entries
        spare = lambda x, size: jnp.concatenate([x.reshape(-1), jnp.zeros(size, x.dtype)])
        aliases = {n_in + 1: 0, n_in + 2: 1}
        inputs = inputs + (spare(previous[0], extra), spare(previous[1].astype(shift_dtype), 3 * extra))

    def body(*refs):    # the aliased previous tables are only there to be kept
        kernel(*refs[:n_in], *refs[len(inputs):], todo_ref=refs[n_in],
               rows=_Rows(n, k, most, shift_dtype), **static)

    call = _pallas.call(body, out_shape, -(-n // BLOCK_ROWS), NUM_WARPS, name, interpret, aliases)
    indices, shifts, total, reach = call(*inputs)
    return (indices[:n * k].reshape(n, k), shifts[:n * k * 3].reshape(n, k, 3), total[:n],
            reach[:n * 3].reshape(n, 3))


class _Rows:
    """Appending to the rows of ``BLOCK_ROWS`` atoms ``i``: running ``total`` and ``reach``
    per row, entries written to the output refs; then the padding."""

    def __init__(self, n, k, most, shift_dtype):
        self.n, self.k, self.most, self.shift_dtype = n, k, most, shift_dtype

    def start(self):
        zero = jnp.zeros((BLOCK_ROWS,), jnp.int32)
        return zero, (zero, zero, zero)

    def append(self, outs, i, carry, j, shift, ok):
        """Candidates ``j (B, T)`` with shifts ``shift`` (3 of ``(B, T)``) where ``ok``."""
        idx_out, shift_out = outs[0], outs[1]
        total, reach = carry
        n, k = self.n, self.k
        slot = total[:, None] + jnp.cumsum(ok, axis=1, dtype=jnp.int32) - 1
        keep = ok & (slot < k)
        where = jnp.where(keep, i[:, None] * k + slot, n * k)
        _pallas.store(idx_out, where, j, keep)
        for a in range(3):
            value = jnp.clip(shift[a], -self.most, self.most).astype(self.shift_dtype)
            _pallas.store(shift_out, where * 3 + a, value, keep)
        reach = tuple(jnp.maximum(r, jnp.max(jnp.where(ok, jnp.abs(shift[a]), 0), axis=1))
                      .astype(jnp.int32) for a, r in enumerate(reach))
        return total + jnp.sum(ok, axis=1, dtype=jnp.int32), reach

    def finish(self, outs, i, live, carry):
        """Pad each row after its entries (slots not written above); store the counts."""
        idx_out, shift_out, total_out, reach_out = outs
        total, reach = carry
        n, k, pad = self.n, self.k, 32

        def fill(b, _):
            col = b * pad + jnp.arange(pad, dtype=jnp.int32)[None, :]
            empty = live[:, None] & (col >= total[:, None]) & (col < k)
            where = jnp.where(empty, i[:, None] * k + col, n * k)
            _pallas.store(idx_out, where, jnp.full(where.shape, n, jnp.int32), empty)
            for a in range(3):
                _pallas.store(shift_out, where * 3 + a, jnp.zeros(where.shape, self.shift_dtype),
                              empty)
            return 0

        jax.lax.fori_loop(0, -(-k // pad), fill, 0)
        row = jnp.where(live, i, n)
        _pallas.store(total_out, row, total, live)
        for a in range(3):
            _pallas.store(reach_out, row * 3 + a, reach[a], live)


def frame_rows(frame_ref, system):
    """In a kernel: ``frame[r][a] (B, 1)``, lattice row r, component a, of each atom's
    system, from a flat ``(S * 9,)`` ref."""
    return [[frame_ref[system * 9 + 3 * r + a][:, None] for a in range(3)] for r in range(3)]


def displacements(x_j, x_i, shift, frame):
    """Pair vectors ``d = x_j - x_i + Σ_r shift_r frame_r`` as three components, and |d|²."""
    d = [x_j[a] - x_i[a] + shift[0] * frame[0][a] + shift[1] * frame[1][a]
         + shift[2] * frame[2][a] for a in range(3)]
    return d, d[0] * d[0] + d[1] * d[1] + d[2] * d[2]


def image_digits(image, radix_1, radix_2):
    """Mixed-radix digits (per axis) of an all-pairs image number."""
    return [image // (radix_1 * radix_2), (image // radix_2) % radix_1, image % radix_2]


def image_shift(dfrac, digit, periodic, flip, reach):
    """All-pairs lattice shift along one axis (elementwise; the XLA form and the kernel
    share it): the nearest image of a fractional separation ``dfrac`` (floor(x + ½):
    Triton has no round-half-even), then digit 0 and 1 = that image and the one on its
    far side in one-flip systems, else digits 0 .. 2 reach = shifts -reach .. reach."""
    nearest = jnp.where(periodic, -jnp.floor(dfrac + 0.5), 0.0)
    away = jnp.where(dfrac + nearest >= 0, -1, 1)
    return nearest.astype(jnp.int32) + jnp.where(flip, digit * away, digit - reach)


def _when_any(live, scan):
    """Run ``scan()`` only if some row of the program is live (a partial rebuild's other
    programs do nothing)."""
    from jax.experimental import pallas as pl
    pl.when(jnp.max(live.astype(jnp.int32)) > 0)(scan)


def _bins_kernel(pos_ref, sorted_pos_ref, frame_ref, sys_ref, order_ref, sorted_floor_ref,
                 lo_ref, count_ref, base_ref, *outs, todo_ref, rows, t, s, tile, rc2):
    from jax.experimental import pallas as pl
    at_row = pl.program_id(0) * BLOCK_ROWS + jnp.arange(BLOCK_ROWS, dtype=jnp.int32)
    i = order_ref[jnp.where(at_row < rows.n, at_row, 0)]   # this program's atoms, in bin order
    live = (at_row < rows.n) & (todo_ref[i] != 0)
    _when_any(live, lambda: _scan_bins(pos_ref, sorted_pos_ref, frame_ref, sys_ref, order_ref,
                                       sorted_floor_ref, lo_ref, count_ref, base_ref, outs, i, live,
                                       rows, t, s, tile, rc2))


def _scan_bins(pos_ref, sorted_pos_ref, frame_ref, sys_ref, order_ref, sorted_floor_ref, lo_ref,
               count_ref, base_ref, outs, i, live, rows, t, s, tile, rc2):
    x_i = [pos_ref[i * 3 + a][:, None] for a in range(3)]
    frame = frame_rows(frame_ref, jnp.clip(sys_ref[i], 0, s - 1))
    m = jnp.arange(tile, dtype=jnp.int32)[None, :]

    def offset(o, carry):
        at = i * t + o
        valid = live[:, None] & (m < count_ref[at][:, None])
        q = jnp.where(valid, lo_ref[at][:, None] + m, 0)     # contiguous in bin order
        j = _pallas.load(order_ref, q, valid, 0)
        shift = [base_ref[at * 3 + a][:, None] - _pallas.load(sorted_floor_ref, q * 3 + a, valid, 0)
                 for a in range(3)]
        x_j = [_pallas.load(sorted_pos_ref, q * 3 + a, valid, 0.0) for a in range(3)]
        _, d2 = displacements(x_j, x_i, shift, frame)
        self_pair = (j == i[:, None]) & (shift[0] == 0) & (shift[1] == 0) & (shift[2] == 0)
        return rows.append(outs, i, carry, j, shift, valid & (d2 < rc2) & ~self_pair)

    rows.finish(outs, i, live, jax.lax.fori_loop(0, t, offset, rows.start()))


def _systems_kernel(pos_ref, frac_ref, frame_ref, sys_ref, order_ref, start_ref, cand_ref,
                    images_ref, radix_ref, reach_ref, flip_ref, periodic_ref, *outs, todo_ref, rows,
                    s, tile, rc2):
    from jax.experimental import pallas as pl
    i = pl.program_id(0) * BLOCK_ROWS + jnp.arange(BLOCK_ROWS, dtype=jnp.int32)
    inside = i < rows.n
    i = jnp.where(inside, i, 0)
    live = inside & (todo_ref[i] != 0)
    _when_any(live, lambda: _scan_systems(pos_ref, frac_ref, frame_ref, sys_ref, order_ref, start_ref,
                                          cand_ref, images_ref, radix_ref, reach_ref, flip_ref,
                                          periodic_ref, outs, i, live, rows, s, tile, rc2))


def _scan_systems(pos_ref, frac_ref, frame_ref, sys_ref, order_ref, start_ref, cand_ref, images_ref,
                  radix_ref, reach_ref, flip_ref, periodic_ref, outs, i, live, rows, s, tile, rc2):
    col = lambda ref: ref[i][:, None]
    x_i = [pos_ref[i * 3 + a][:, None] for a in range(3)]
    f_i = [frac_ref[i * 3 + a][:, None] for a in range(3)]
    frame = frame_rows(frame_ref, jnp.clip(sys_ref[i], 0, s - 1))
    start, cand, images, flip = col(start_ref), col(cand_ref), col(images_ref), col(flip_ref)
    radix = [radix_ref[i * 3 + a][:, None] for a in range(3)]
    reach = [reach_ref[i * 3 + a][:, None] for a in range(3)]
    periodic = [periodic_ref[i * 3 + a][:, None] != 0 for a in range(3)]
    m0 = jnp.arange(tile, dtype=jnp.int32)[None, :]
    # Blocks of `tile` atoms of the row's system, image by image: the image and its digits
    # are per row (no per-candidate division), and each program runs only as many blocks
    # as its rows' systems need (small systems of a mixed batch finish early).
    count = cand // jnp.maximum(images, 1)
    tiles = jnp.maximum((count + tile - 1) // tile, 1)
    blocks = jnp.where(live[:, None], tiles * images, 0)

    def block(b, carry):
        image = b // tiles
        atom = (b % tiles) * tile + m0
        valid = (b < blocks) & (atom < count)
        digit = image_digits(image, radix[1], radix[2])
        j = _pallas.load(order_ref, jnp.where(valid, start + atom, 0), valid, 0)
        shift = [image_shift(_pallas.load(frac_ref, j * 3 + a, valid, 0.0) - f_i[a], digit[a],
                             periodic[a], flip != 0, reach[a]) for a in range(3)]
        x_j = [_pallas.load(pos_ref, j * 3 + a, valid, 0.0) for a in range(3)]
        _, d2 = displacements(x_j, x_i, shift, frame)
        self_pair = (j == i[:, None]) & (shift[0] == 0) & (shift[1] == 0) & (shift[2] == 0)
        return rows.append(outs, i, carry, j, shift, valid & (d2 < rc2) & ~self_pair)

    rows.finish(outs, i, live, jax.lax.fori_loop(0, jnp.max(blocks), block, rows.start()))
