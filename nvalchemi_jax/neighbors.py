"""On-device neighbor lists for padded batches of systems.

A :class:`NeighborList` is a dense ``(N, K)`` table: row ``i`` holds the atoms
within ``cutoff + skin`` of atom ``i`` (all of them, both directions, a "full"
list), padded with the index ``N``; ``shifts (N, K, 3)`` holds the integer
lattice translation of each neighbor (int8 unless atoms drift 127 or more
cells away: the list is read every step, and its bytes are most of what a pair
potential reads), so the pair vector is::

    d_ij = positions[j] - positions[i] + shifts_ij @ cell[system of i]

Positions need not be wrapped into the cell: shifts refer to the positions the
list was built from, and stay valid as atoms move continuously.

Two builders, both inside ``jit`` with static shapes, neither pairing atoms of
different systems:

* ``"all_pairs"``: every atom against every atom of its own system (atoms are
  grouped by a sort on ``system_index``); the nearest image comes from rounding
  fractional coordinates, and a system whose periodic cell is thinner than
  ``2 (cutoff + skin)`` also scans the further images it needs (its own
  count, so thin cells do not slow down their batch mates; a cell at least
  ``cutoff + skin`` wide needs only the image beyond the nearest one per axis).
  Best for systems of up to a few hundred atoms.
* ``"cell_list"``: atoms are hashed into bins of at least ``cutoff + skin``
  per system (in fractional coordinates, so general triclinic cells work),
  sorted, and each atom scans the ``(2R+1)^3`` surrounding bins, wrapping
  periodic axes with an image shift. O(N).

Both fill the table the same way, without scattering: every candidate is tested and the
results are packed 32 to a word, then each row's entries are picked from the words in
candidate order (:func:`_compact`).

Open axes (``pbc`` False, slabs and clusters) never wrap. Cells thinner than
the cutoff are handled by images (``max_image_shift`` > 1).

Overflow is never silent: the list records what it needed (neighbors per
atom, atoms per system or per bin, image shifts) and :attr:`NeighborList.overflow`
turns true when any of those exceeded the static :class:`NeighborSpec`;
:func:`grow` makes a larger spec on the host.

A Verlet skin lets :func:`update` keep a list until some atom has moved far
enough (or its cell changed enough) that a pair could have crossed ``cutoff``;
then every system gets new rows (a build costs the same for one system as for all).
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from nvalchemi_jax._linalg import inv3, vecmat
from nvalchemi_jax.batch import Batch, gather_systems
from nvalchemi_jax import segments

METHODS = ("all_pairs", "cell_list")
# Storage of shifts -> clip bound (a shift at the bound may have been clipped: it overflows).
# "packed": one byte per entry, base-5 digits (n_a + 2) of the three components.
SHIFT_DTYPES = {"packed": 2, "int8": 127, "int32": 2**31 - 1}
PACKED_PADDING = 62          # the packed code of the zero shift (2 + 2 * 5 + 2 * 25)

# The shift storage allocate() picks where the systems' images allow it (see NeighborSpec).
# Packed: W2 256,000 atoms 7.2e8 -> 7.8e8 atom-steps/s, 32,000 level, on an H200 (two
# alternating rounds, results/w2_shifts_ab_h200_2026-11-29.jsonl).
DEFAULT_SHIFT_DTYPE = "packed"


@dataclasses.dataclass(frozen=True)
class NeighborSpec:
    """Static configuration of a neighbor list (hashable; part of the compiled program).

    cutoff: interaction cutoff in Å (the largest of the models').
    skin: Verlet skin in Å; pairs within ``cutoff + skin`` are listed.
    max_neighbors: ``K``, the row width.
    method: ``"all_pairs"`` or ``"cell_list"`` (see the module docstring).
    max_candidates: all_pairs: candidates scanned per system, its atoms times
        its periodic images (1 image unless a periodic cell is thinner than
        ``2 (cutoff + skin)``).
    max_atoms_per_bin: cell_list: atoms scanned per bin.
    max_image_shift: cell_list: ``R``, bins scanned on each side (1 unless a
        periodic cell is thinner than ``cutoff + skin``).
    block_size: candidates per atom tested in one pass of a build, rounded down to a
        multiple of 32 (at least 32), both methods: memory vs speed.
    shift_dtype: storage of the lattice shifts: ``"int8"`` (the list is read every step,
        and a byte per component is 4x less traffic than int32), ``"packed"`` (one byte per
        entry for all three components, |n| <= 1 per axis: a third of int8's traffic) or
        ``"int32"``. :func:`grow` widens packed to int8 when some |n| reaches 2, and int8
        to int32 when atoms drift 127 or more cells from their cell.
    """

    cutoff: float
    skin: float = 0.5
    max_neighbors: int = 64
    method: str = "all_pairs"
    max_candidates: int = 256
    max_atoms_per_bin: int = 32
    max_image_shift: int = 1
    block_size: int = 4096
    shift_dtype: str = "int8"

    def __post_init__(self):
        if not self.cutoff > 0:
            raise ValueError(f"NeighborSpec.cutoff must be > 0, got {self.cutoff}")
        if self.skin < 0:
            raise ValueError(f"NeighborSpec.skin must be >= 0, got {self.skin}")
        if self.method not in METHODS:
            raise ValueError(f"NeighborSpec.method must be one of {METHODS}, got {self.method!r}")
        for name in ("max_neighbors", "max_candidates", "max_atoms_per_bin", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"NeighborSpec.{name} must be >= 1, got {getattr(self, name)}")
        if self.shift_dtype not in SHIFT_DTYPES:
            raise ValueError(f"NeighborSpec.shift_dtype must be one of {tuple(SHIFT_DTYPES)}, "
                             f"got {self.shift_dtype!r}")
        if self.max_image_shift < 0:
            raise ValueError(f"NeighborSpec.max_image_shift must be >= 0, got {self.max_image_shift}")

    @property
    def list_cutoff(self) -> float:
        return self.cutoff + self.skin


@struct.dataclass
class NeighborList:
    """Dense neighbor table plus what the Verlet test and overflow checks need.

    indices: ``(N, K) int32``, padding = ``N``; each row's entries come first, then its
        padding (the fused pair kernel skips blocks of columns past every row's end).
    shifts: lattice translations as stored: ``(N, K, 3)`` int8 or int32, or ``(N, K)``
        uint8 codes when ``spec.shift_dtype == "packed"``; :attr:`shift_vectors` and
        :func:`shift_components` read either (int8: |n| < 127, packed: |n| < 2; from there
        on the list overflows and :func:`grow` widens the storage).
    reference_positions: ``(N, 3)`` positions at the last rebuild.
    reference_cell: ``(S, 3, 3)`` cells at the last rebuild.
    max_shift: ``(S, 3) int32`` largest ``|shift|`` per axis in each system's rows.
    stale: ``(S,) bool`` systems that must be rebuilt at the next :func:`update`.
    rebuilds: ``(S,) int32`` rebuilds each system has been through (the whole list is
        rebuilt at once, so all filled systems count together).
    needed: ``(4,) int32`` largest need seen since allocation: neighbors per atom,
        candidates per system (all_pairs), atoms per bin and bin shift (cell_list).
    """

    indices: jax.Array
    shifts: jax.Array
    reference_positions: jax.Array
    reference_cell: jax.Array
    max_shift: jax.Array
    stale: jax.Array
    rebuilds: jax.Array
    needed: jax.Array
    spec: NeighborSpec = struct.field(pytree_node=False)

    @property
    def mask(self) -> jax.Array:
        """``(N, K) bool``: which entries are real neighbors."""
        return self.indices < self.indices.shape[0]

    @property
    def capacities(self) -> jax.Array:
        s = self.spec
        if s.method == "all_pairs":
            return jnp.array([s.max_neighbors, s.max_candidates, 2**30, 2**30])
        return jnp.array([s.max_neighbors, 2**30, s.max_atoms_per_bin, s.max_image_shift])

    @property
    def overflow(self) -> jax.Array:
        """Scalar bool: some need exceeded the spec; the list may be missing pairs."""
        return jnp.any(self.needed > self.capacities) | self.shift_overflow

    @property
    def shift_vectors(self) -> jax.Array:
        """``(N, K, 3) int32`` lattice translations, whatever the storage."""
        return jnp.stack(shift_components(self.shifts, self.spec.shift_dtype), axis=-1)

    @property
    def shift_overflow(self) -> jax.Array:
        """Scalar bool: some lattice shift does not fit ``spec.shift_dtype`` (atoms
        unwrapped far from their cell); :func:`grow` then widens the storage."""
        return jnp.any(self.max_shift > SHIFT_DTYPES[self.spec.shift_dtype])


def shift_components(shifts: jax.Array, shift_dtype: str) -> list[jax.Array]:
    """Three ``(N, K) int32`` shift components from stored ``shifts`` (see :class:`NeighborSpec`)."""
    if shift_dtype != "packed":
        return [shifts[..., a].astype(jnp.int32) for a in range(3)]
    return unpack_shift_code(shifts.astype(jnp.int32))


def unpack_shift_code(code):
    """The three components of packed shift codes (int32; also inside GPU kernels)."""
    five, twenty_five = np.int32(5), np.int32(25)
    return [jax.lax.rem(code, five) - 2, jax.lax.rem(jax.lax.div(code, five), five) - 2,
            jax.lax.div(code, twenty_five) - 2]


def _store_shifts(n: list, shift_dtype: str) -> jax.Array:
    """Three ``(N, K)`` int components as stored (clipped to the storage's bound)."""
    most = SHIFT_DTYPES[shift_dtype]
    n = [jnp.clip(c, -most, most) for c in n]
    if shift_dtype == "packed":
        return ((n[0] + 2) + 5 * (n[1] + 2) + 25 * (n[2] + 2)).astype(jnp.uint8)
    return jnp.stack([c.astype(shift_dtype) for c in n], axis=-1)


# --------------------------------------------------------------------------- geometry
def binning_frame(cell: jax.Array, pbc: jax.Array) -> jax.Array:
    """``(S, 3, 3)`` frame whose periodic rows are the lattice vectors and whose open
    rows are unit vectors completing an orthogonal basis (so fractional coordinates
    along open axes are Cartesian projections in Å, and degenerate open rows of the
    user's cell never matter)."""
    dtype = cell.dtype
    eye = jnp.eye(3, dtype=dtype)

    def unit(v):
        n = jnp.linalg.norm(v, axis=-1, keepdims=True)
        return v / jnp.where(n > 0, n, 1.0)

    def one(h, p):
        n_periodic = jnp.sum(p)
        # Two periodic axes: the open row is the normal of the periodic plane.
        normals = jnp.stack([unit(jnp.cross(h[(k + 1) % 3], h[(k + 2) % 3])) for k in range(3)])
        # One periodic axis a: two unit vectors perpendicular to it.
        axis = jnp.argmax(p)
        a = unit(h[axis])
        e = eye[jnp.argmin(jnp.abs(a))]
        u = unit(e - jnp.sum(e * a) * a)
        v = jnp.cross(a, u)
        rows = []
        for k in range(3):
            one_axis = jnp.where(k == (axis + 1) % 3, u, v)
            open_row = jnp.where(n_periodic == 2, normals[k],
                                 jnp.where(n_periodic == 1, one_axis, eye[k]))
            rows.append(jnp.where(p[k], h[k], open_row))
        return jnp.stack(rows)

    return jax.vmap(one)(cell, pbc)


def _frame_and_widths(cell, pbc):
    frame = binning_frame(cell, pbc)
    inverse = inv3(frame)
    # Perpendicular width of the frame along each axis: 1 / |reciprocal vector|.
    widths = 1.0 / jnp.linalg.norm(inverse, axis=-2)
    return frame, inverse, widths


WORD = 32   # candidates per bit-mask word


def _compact(spec, n_atoms, n_candidates, candidate, order):
    """Rows of the table from a per-row candidate enumeration, without scattering.

    ``candidate(m) -> (key, n, ok)`` evaluates candidates ``m (N, B)`` (int32, per row; from
    0 up to ``n_candidates`` rounded up to whole blocks of ``block_size``, so ``ok`` must be
    False at and past ``n_candidates``) as a key into the builder's sorted atoms
    (``order[key]`` is the neighbor), lattice shift ``n`` (three ``(N, B)`` components:
    arrays stacked on a last axis of 3 were materialised between kernels) and acceptance
    ``ok (N, B)``. Candidates read positions in the sorted order (a row's candidates are
    contiguous there) and a builder's self-pair test compares keys with the row's own rank,
    so the first pass gathers nothing through ``order`` (H200, 256,000 atoms: W2 7.0e8 ->
    7.4e8 atom-steps/s in one round of a same-call A/B). Two passes: (1) every candidate is tested and
    the results are packed as bits, 32 per word (a reduction XLA fuses with the test); (2)
    entry ``s`` of a row is its ``s``-th accepted candidate, found by a binary search over
    the words' running bit counts and then within the word, and evaluated again. Both
    passes write whole rows in order, where scattering the accepted candidates into their
    slots cost an H200 2.1 ms for 1,024 x 256 atoms and 18.5 ms for 10,000 x 108 (this
    form: 1.4 and 10.6 ms; the cell list at 256,000 atoms: 4.3 ms, its Pallas kernel 8.5 ms).
    Candidates keep their order, so the table is the one a scan in candidate order would give.

    Returns ``indices (N, K)``, ``shifts`` (stored as ``spec.shift_dtype``, clipped),
    ``total (N,)`` accepted candidates (may exceed K) and ``reach (N, 3)`` the largest
    ``|shift|`` per axis among the entries.
    """
    k = spec.max_neighbors
    n_words = max(1, -(-n_candidates // WORD))
    per_block = max(1, min(n_words, spec.block_size // WORD))
    n_blocks = -(-n_words // per_block)
    bit = jnp.arange(WORD, dtype=jnp.uint32)

    def pack(b):
        m = (b * per_block * WORD + jnp.arange(per_block * WORD, dtype=jnp.int32))
        _, _, ok = candidate(jnp.broadcast_to(m, (n_atoms, m.size)))
        ok = ok.reshape(n_atoms, per_block, WORD).astype(jnp.uint32)
        return jnp.sum(ok << bit, axis=-1, dtype=jnp.uint32)       # distinct bits: sum = or

    if n_blocks == 1:
        words = pack(0)
    else:   # bounded memory for long candidate lists
        words = jax.lax.map(pack, jnp.arange(n_blocks, dtype=jnp.int32))
        words = jnp.moveaxis(words, 0, 1).reshape(n_atoms, n_blocks * per_block)
    counts = jax.lax.population_count(words).astype(jnp.int32)
    running = jnp.cumsum(counts, axis=1)                              # (N, W) inclusive
    total = running[:, -1]
    s = jnp.arange(k, dtype=jnp.int32)[None, :]
    # The word holding entry s: how many words' running counts are <= s (binary search).
    w = jnp.zeros((n_atoms, k), jnp.int32)
    step = 1 << (running.shape[1].bit_length() - 1)
    while step:
        probe = w + step
        at = _row_take(running, jnp.minimum(probe, running.shape[1]) - 1)
        w = jnp.where((probe <= running.shape[1]) & (at <= s), probe, w)
        step >>= 1
    live = s < jnp.minimum(total, k)[:, None]
    w = jnp.where(live, w, 0)
    word = _row_take(words, w)
    rank = (s - _row_take(running - counts, w)).astype(jnp.uint32)
    # The rank-th set bit of the word: halve the range five times.
    pos = jnp.zeros_like(word)
    for width in (16, 8, 4, 2, 1):
        low = jax.lax.population_count((word >> pos) & jnp.uint32((1 << width) - 1))
        up = rank >= low
        rank = jnp.where(up, rank - low, rank)
        pos = jnp.where(up, pos + width, pos)
    m = jnp.where(live, w * WORD + pos.astype(jnp.int32), 0)
    key, n, _ = candidate(m)
    j = order[key]
    most = SHIFT_DTYPES[spec.shift_dtype]
    indices = jnp.where(live, j, n_atoms).astype(jnp.int32)
    shifts = _store_shifts([jnp.where(live, c, 0) for c in n], spec.shift_dtype)
    # The largest |shift| of each row, from the stored table: reduced from the candidates,
    # XLA re-evaluated them inside a row reduction (0.75 of a 2.0 ms build at 1,024 x 256
    # atoms on an H200). A clipped shift may have been larger: it counts as an overflow.
    # Reduced over whole contiguous rows (K x 3 values), one masked maximum per axis: over
    # the table's middle axis the reduction read 3-byte strides (0.17 ms per build there).
    shifts = jax.lax.optimization_barrier(shifts)
    if spec.shift_dtype == "packed":
        reach = jnp.stack([jnp.max(jnp.abs(c), axis=1)
                           for c in shift_components(shifts, "packed")], axis=-1)
    else:
        flat = jnp.abs(shifts.reshape(n_atoms, k * 3).astype(jnp.int32))
        axis = jnp.arange(k * 3, dtype=jnp.int32) % 3
        reach = jnp.stack([jnp.max(jnp.where(axis == a, flat, 0), axis=1) for a in range(3)],
                          axis=-1)
    if spec.shift_dtype != "int32":
        reach = jnp.where(reach >= most, most + 1, reach)
    return indices, shifts, total, reach


def _row_take(table, column):
    """``table[i, column[i, b]]`` for ``table (N, W)``, ``column (N, B)``, as a gather from the
    flattened table (``take_along_axis`` builds an ``(N, B, 2)`` index array in memory)."""
    width = table.shape[1]
    if table.shape[0] * width >= 2**31:
        raise ValueError(f"neighbor build: a ({table.shape[0]}, {width}) table is too large for "
                         f"int32 indices; use method='cell_list' or a smaller batch")
    rows = jnp.arange(table.shape[0], dtype=jnp.int32)[:, None] * width
    return table.reshape(-1)[rows + column]


def _quotient(x, divisor, inverse):
    """``x // divisor`` for non-negative int32 ``x < 2**21`` and ``divisor >= 1``, with
    ``inverse = 1 / divisor`` in float32: a multiply instead of an integer division (tens
    of instructions on a GPU, and a build divides for every candidate)."""
    # (x + 0.5) / divisor lies at least 0.5 / divisor from an integer; two float32 roundings
    # move it by under 2**-23 (x + 0.5) / divisor < 0.25 / divisor for x < 2**21.
    return jnp.floor((x.astype(jnp.float32) + 0.5) * inverse).astype(jnp.int32)


def _divider(largest: int):
    """``divide(x, divisor, inverse) = x // divisor`` for ``0 <= x <= largest``: by
    :func:`_quotient` where that is exact, else by integer division."""
    return _quotient if largest < 2**21 else (lambda x, divisor, inverse: x // divisor)


def _pair_ok(x_i, x_j, frame_i, n, same, valid, rc2):
    """Candidates (at ``x_j``, three ``(N, B)`` components, with shifts ``n`` likewise) within
    the list cutoff of atoms at ``x_i (N, 3)`` that are not that atom itself (``same (N, B)``)."""
    d2 = 0.0
    for a in range(3):
        d = x_j[a] - x_i[:, a, None] + sum(n[r].astype(x_i.dtype) * frame_i[:, r, a, None]
                                         for r in range(3))
        d2 = d2 + d * d
    self_pair = same & (n[0] == 0) & (n[1] == 0) & (n[2] == 0)
    return valid & (d2 < rc2) & ~self_pair


def _ranks(order):
    """The inverse permutation of ``order``: ``rank[order[k]] = k``."""
    n = order.shape[0]
    return jnp.zeros(n, jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))


def _search_method() -> str:
    """``jnp.searchsorted``'s method. Its default is a loop, and on a GPU every loop
    iteration costs a host round trip (an H200 profile of the cell-list build showed ~74
    device copies per stencil step, ~20 ms per 32,000-atom build); unrolled there. On
    the CPU the loop is faster."""
    return "scan" if jax.default_backend() == "cpu" else "scan_unrolled"


def system_segments(batch: Batch):
    """Atoms sorted by system: ``order (N,)``, ``start (S,)``, ``count (S,)``."""
    order = jnp.argsort(batch.system_index, stable=True).astype(jnp.int32)
    bounds = jnp.searchsorted(batch.system_index[order], jnp.arange(batch.num_systems + 1),
                              side="left", method=_search_method()).astype(jnp.int32)
    return order, bounds[:-1], bounds[1:] - bounds[:-1]


# --------------------------------------------------------------------------- builders
def _image_shift(dfrac, digit, periodic, flip, reach):
    """All-pairs lattice shift along one axis (elementwise): the nearest image of a
    fractional separation ``dfrac``, then digit 0 and 1 = that image and the one on its far
    side in one-flip systems, else digits 0 .. 2 reach = shifts -reach .. reach."""
    nearest = jnp.where(periodic, -jnp.floor(dfrac + 0.5), 0.0)
    away = jnp.where(dfrac + nearest >= 0, -1, 1)
    return nearest.astype(jnp.int32) + jnp.where(flip, digit * away, digit - reach)


def _one_flip(reach, widths, rc):
    """``(S,) bool``: systems whose periodic axes are all at least ``rc`` wide where they
    need images (``reach`` <= 1). Then, along each axis, only the nearest image and the
    one on its far side can lie within ``rc`` (any other is at least a width away), so
    2 images per such axis are scanned instead of 3 (8 instead of 27 for a small cube).
    Works on numpy (host sizing) and jax arrays alike."""
    return ((reach == 0) | ((reach == 1) & (rc <= widths))).all(axis=1)


def _build_all_pairs(spec, positions, batch, frame, inverse, widths):
    n_atoms = positions.shape[0]
    rc = spec.list_cutoff
    sys_i = batch.system_index
    periodic = gather_systems(batch.pbc, sys_i, False)
    frame_i = gather_systems(frame, sys_i)
    # Materialised once: both passes of _compact round the same fractional separations
    # (recomputed in each fusion, a pair half a cell away could round to different images).
    frac = jax.lax.optimization_barrier(vecmat(positions, gather_systems(inverse, sys_i)))
    order, start, count = system_segments(batch)
    # Images beyond the nearest one that can still lie within rc, per system and axis:
    # the candidates of a system are its atoms times its own image count.
    reach = jnp.where(batch.pbc & batch.system_mask[:, None],
                      jnp.ceil(rc / widths + 0.5) - 1, 0).astype(jnp.int32)
    flip = _one_flip(reach, widths, rc)
    radix = jnp.where(flip[:, None], 1 + reach, 2 * reach + 1)
    images = radix[:, 0] * radix[:, 1] * radix[:, 2]
    candidates = count * images
    flip_i = gather_systems(flip, sys_i, False)
    start_i = gather_systems(start, sys_i)
    candidates_i = jnp.where(batch.atom_mask, gather_systems(candidates, sys_i), 0)
    count_i = gather_systems(jnp.maximum(count, 1), sys_i, 1)
    reach_i = gather_systems(reach, sys_i)
    radix_i = gather_systems(radix, sys_i, 1)
    rank = _ranks(order)[:, None]
    # Candidates read the atoms in system order (a system's atoms are contiguous there).
    sorted_positions, sorted_frac = positions[order], frac[order]
    # Candidate m -> (atom, image), and the image's mixed-radix digits (one per axis).
    # Divisions as float multiplies where exact (see _quotient).
    divide = _divider(spec.max_candidates)
    inverse_of = lambda v: 1.0 / v.astype(jnp.float32)
    per_atoms, r2, r12 = count_i[:, None], radix_i[:, 2:3], radix_i[:, 1:2] * radix_i[:, 2:3]
    inverses = [inverse_of(v) for v in (per_atoms, r2, r12)]

    def candidate(m):
        # (m past max_candidates: beyond the system's own candidates or an overflow; never listed)
        valid = (m < candidates_i[:, None]) & (m < spec.max_candidates)
        m = jnp.minimum(m, spec.max_candidates)
        # Candidates image by image, each over the system's atoms.
        image = divide(m, per_atoms, inverses[0])
        first = divide(image, r12, inverses[2])
        rest = image - first * r12
        second = divide(rest, r2, inverses[1])
        digit = [first, second, rest - second * r2]
        key = jnp.clip(start_i[:, None] + m - image * per_atoms, 0, n_atoms - 1)
        n = [_image_shift(sorted_frac[:, a][key] - frac[:, a, None], digit[a], periodic[:, a, None],
                          flip_i[:, None], reach_i[:, a, None])
             for a in range(3)]
        x_j = [sorted_positions[:, a][key] for a in range(3)]
        return key, n, _pair_ok(positions, x_j, frame_i, n, key == rank, valid, rc * rc)

    indices, shifts, total, reach = _compact(spec, n_atoms, spec.max_candidates, candidate, order)
    needed = jnp.stack([jnp.max(total), jnp.max(candidates), jnp.int32(0), jnp.int32(0)])
    return indices, shifts, needed.astype(jnp.int32), reach


def _build_cell_list(spec, positions, batch, frame, inverse, widths):
    n_atoms, n_sys = positions.shape[0], batch.num_systems
    rc = spec.list_cutoff
    m_bin = spec.max_atoms_per_bin
    sys_i = batch.system_index
    pbc = batch.pbc
    periodic = gather_systems(pbc, sys_i, False)
    frame_i = gather_systems(frame, sys_i)
    frac = vecmat(positions, gather_systems(inverse, sys_i))
    floor = jnp.where(periodic, jnp.floor(frac), 0.0)
    wrapped = frac - floor
    # Open axes: bins start at the system's lowest coordinate.
    big = jnp.asarray(jnp.finfo(positions.dtype).max, positions.dtype)
    low = segments.segment_min(jnp.where(batch.atom_mask[:, None], frac, big), sys_i, n_sys)
    high = segments.segment_max(jnp.where(batch.atom_mask[:, None], frac, -big), sys_i, n_sys)
    extent = jnp.where(batch.system_mask[:, None], high - low, 0.0)
    # Per-axis bin cap keeps the global int32 bin key below 2**31.
    cap = max(1, int(((2**31 - 1) // (n_sys + 1)) ** (1.0 / 3.0)))
    open_width = jnp.maximum(rc, extent / cap * (1 + 1e-6))
    nbins = jnp.where(pbc, jnp.clip(jnp.floor(widths / rc), 1, cap),
                      jnp.clip(jnp.floor(extent / open_width) + 1, 1, cap)).astype(jnp.int32)
    bin_width = jnp.where(pbc, widths / nbins, open_width)          # Å, perpendicular
    need_r = jnp.ceil(rc / bin_width)
    need_r = jnp.max(jnp.where(batch.system_mask[:, None], need_r, 0)).astype(jnp.int32)

    nbins_i = gather_systems(nbins, sys_i, 1)
    u = jnp.where(periodic, wrapped * nbins_i, (frac - gather_systems(low, sys_i))
                  / gather_systems(open_width, sys_i, 1.0))
    b = jnp.clip(jnp.floor(u).astype(jnp.int32), 0, nbins_i - 1)
    per_system = nbins[:, 0] * nbins[:, 1] * nbins[:, 2]
    offset = jnp.cumsum(per_system) - per_system
    offset_i = gather_systems(offset, sys_i)

    def key_of(c, nb):   # c (N, ..., 3) bins -> global keys (N, ...)
        off = offset_i.reshape(offset_i.shape + (1,) * (c.ndim - 2))
        return off + (c[..., 0] * nb[..., 1] + c[..., 1]) * nb[..., 2] + c[..., 2]

    sentinel = jnp.int32(2**31 - 1)
    keys = jnp.where(batch.atom_mask, key_of(b, nbins_i), sentinel)
    order = jnp.argsort(keys).astype(jnp.int32)
    sorted_keys = keys[order]

    r = spec.max_image_shift
    stencil = jnp.asarray(list(itertools.product(range(-r, r + 1), repeat=3)), jnp.int32)
    # Every atom's stencil bins at once: first position in `order`, atoms, lattice image.
    nb = nbins_i[:, None, :]
    c = b[:, None, :] + stencil[None]
    image = jnp.floor_divide(c, nb)
    inside = jnp.all(periodic[:, None, :] | (image == 0), axis=-1) & batch.atom_mask[:, None]
    key = key_of(c - image * nb, nb).reshape(-1)
    lo = jnp.searchsorted(sorted_keys, key, side="left", method=_search_method()).astype(jnp.int32)
    hi = jnp.searchsorted(sorted_keys, key, side="right", method=_search_method()).astype(jnp.int32)
    lo = lo.reshape(n_atoms, -1)
    occupancy = jnp.where(inside, hi.reshape(n_atoms, -1) - lo, 0)
    count = jnp.minimum(occupancy, m_bin)
    own = floor.astype(jnp.int32)
    base = jnp.where(periodic[:, None, :], image, 0) + own[:, None, :]   # + own cell of origin
    # Each stencil bin has m_bin candidate slots, read in bin order (positions sorted by bin:
    # a bin's atoms are contiguous). Slots are not padded to whole bit-mask words: FCC argon's
    # bins hold up to 32 atoms, so padding made 27 x 64 slots of 27 x ~40.
    per_bin = m_bin
    sorted_positions, sorted_own = positions[order], own[order]
    rank = _ranks(order)[:, None]

    # m // per_bin (per_bin is no power of two); candidates are tested in whole blocks, so
    # m runs up to a block past the last one.
    divide = _divider(len(stencil) * per_bin + max(spec.block_size, WORD))
    inverse = jnp.float32(1.0 / per_bin)

    def candidate(m):
        bin_of = divide(m, per_bin, inverse)
        t, q = jnp.minimum(bin_of, len(stencil) - 1), m - bin_of * per_bin
        valid = (m < len(stencil) * per_bin) & (q < _row_take(count, t))
        key = jnp.clip(_row_take(lo, t) + q, 0, n_atoms - 1)
        n = [_row_take(base[:, :, a], t) - sorted_own[:, a][key] for a in range(3)]
        x_j = [sorted_positions[:, a][key] for a in range(3)]
        return key, n, _pair_ok(positions, x_j, frame_i, n, key == rank, valid, rc * rc)

    indices, shifts, total, reach = _compact(spec, n_atoms, len(stencil) * per_bin, candidate,
                                             order)
    needed = jnp.stack([jnp.max(total), jnp.int32(0), jnp.max(occupancy), need_r])
    return indices, shifts, needed.astype(jnp.int32), reach


def build(spec: NeighborSpec, positions: jax.Array, cell: jax.Array, batch: Batch) -> NeighborList:
    """Build the list for every system from scratch (jit-able; ``spec`` is static).

    positions: ``(N, 3)`` Å; cell: ``(S, 3, 3)`` Å.
    """
    frame, inverse, widths = _frame_and_widths(cell, batch.pbc)
    builder = _build_all_pairs if spec.method == "all_pairs" else _build_cell_list
    n_sys = batch.num_systems
    indices, shifts, needed, reach = builder(spec, positions, batch, frame, inverse, widths)
    max_shift = jnp.maximum(segments.segment_max(reach, batch.system_index, n_sys), 0)
    return NeighborList(
        indices=indices, shifts=shifts, reference_positions=positions, reference_cell=cell,
        max_shift=max_shift, stale=jnp.zeros(n_sys, bool),
        rebuilds=jnp.zeros(n_sys, jnp.int32), needed=needed, spec=spec)


def needs_rebuild(nl: NeighborList, positions: jax.Array, cell: jax.Array, batch: Batch) -> jax.Array:
    """``(S,) bool``: systems where a pair may have crossed ``cutoff`` since the last build."""
    return batch.system_mask & (beyond_skin(drift(nl, positions, cell, batch), nl.spec.skin) | nl.stale)


def beyond_skin(drift, skin):
    """Whether a pair vector change of ``drift`` Å may have moved a pair across the cutoff."""
    return drift > skin if skin > 0 else drift > 0


def drift(nl: NeighborList, positions: jax.Array, cell: jax.Array, batch: Batch) -> jax.Array:
    """``(S,)`` Å: how much a pair vector of each system may have changed since its last build.

    A pair vector changes by at most ``2 max|Δr| + Σ_k |n_k| |Δcell_k|``; the
    list stays exact while that is below the skin. ``|n_k|`` is bounded by the
    listed shifts and by the images that could come within reach in the new cell.
    """
    moved = jnp.linalg.norm(positions - nl.reference_positions, axis=-1)
    cell_change = jnp.linalg.norm(cell - nl.reference_cell, axis=-1)
    # Shifts a pair inside the cutoff can have in the new cell: listed ones, and any
    # image within reach of the system's (possibly unwrapped) fractional spread.
    _, inverse, widths = _frame_and_widths(cell, batch.pbc)
    frac = vecmat(positions, gather_systems(inverse, batch.system_index))
    big = jnp.asarray(jnp.finfo(positions.dtype).max, positions.dtype)
    # One per-system max over [|Δr|, frac, -frac] (max of -frac = -min): one reduction
    # instead of three, as this runs at every step.
    values = jnp.concatenate([moved[:, None], frac, -frac], axis=1)
    values = jnp.where(batch.atom_mask[:, None], values, jnp.concatenate(
        [jnp.zeros((1,), values.dtype), jnp.full((6,), -big, values.dtype)]))
    most = segments.segment_max(values, batch.system_index, batch.num_systems)
    moved = most[:, 0]
    span = most[:, 1:4] + most[:, 4:7]
    reach = jnp.where(batch.pbc & batch.system_mask[:, None],
                      jnp.ceil(nl.spec.list_cutoff / widths + jnp.maximum(span, 0.0)), 0.0)
    bound = jnp.maximum(nl.max_shift, reach)
    return 2.0 * jnp.maximum(moved, 0.0) + jnp.sum(bound * cell_change, axis=-1)


def rebuild(nl: NeighborList, positions, cell, batch: Batch) -> NeighborList:
    """:func:`build` with ``nl``'s spec, counting the rebuild and keeping the largest needs."""
    new = build(nl.spec, positions, cell, batch)
    return new.replace(rebuilds=nl.rebuilds + batch.system_mask.astype(jnp.int32),
                       needed=jnp.maximum(nl.needed, new.needed))


def _keep(nl, positions, cell, batch):
    return nl


def update(nl: NeighborList, positions: jax.Array, cell: jax.Array, batch: Batch) -> NeighborList:
    """Rebuild the list when some system needs it (jit-able); skips all work when none does.

    Every system is rebuilt together: a build costs about the same for one system as for
    all, and in MD all systems drift alike, so rebuilding them together keeps rebuilds rare.
    Systems marked stale (refilled slots) trigger a rebuild too.
    """
    # Module-level branches: eager calls reuse the compiled conditional instead of retracing.
    return jax.lax.cond(any_needs_rebuild(nl, positions, cell, batch), rebuild, _keep,
                        nl, positions, cell, batch)


# Batches of at least this many atoms test for a rebuild in one pass while no cell has
# changed. The test needs a conditional (a node of the step's CUDA graph, ~5 µs on an
# H200) and saves per-system reductions that only large batches notice. H200, per step
# (results/probe_syncs_h200_2026-11-29_c_step-gates.jsonl): W1 B = 4,096 1,218 vs 1,270 µs,
# B = 1,024 384 vs 392; B = 64 93 vs 90, B = 1 74 vs 69.
ONE_PASS_MIN_ATOMS = 2**17


def any_needs_rebuild(nl: NeighborList, positions: jax.Array, cell: jax.Array, batch: Batch) -> jax.Array:
    """Scalar bool: ``any(needs_rebuild(...))``, the test :func:`update` runs at every step
    (in one pass for large batches, see :func:`one_pass_needs_rebuild`)."""
    if positions.shape[0] >= ONE_PASS_MIN_ATOMS:
        return one_pass_needs_rebuild(nl, positions, cell, batch)
    return jnp.any(needs_rebuild(nl, positions, cell, batch))


def one_pass_needs_rebuild(nl: NeighborList, positions: jax.Array, cell: jax.Array,
                           batch: Batch) -> jax.Array:
    """``any(needs_rebuild(...))`` in one pass over the atoms while no cell has changed since
    the build (MD at constant volume, fixed-cell relaxation): a system's drift is then twice
    its largest displacement, so one max over all atoms answers it, where the per-system
    test makes several passes and per-system reductions. Per system when a cell changed.
    """
    live = batch.system_mask
    cell_moved = jnp.any(jnp.any(cell != nl.reference_cell, axis=(-2, -1)) & live)

    def fixed_cells(nl, positions):
        atoms = batch.atom_mask & gather_systems(live, batch.system_index, False)
        moved2 = jnp.sum((positions - nl.reference_positions) ** 2, axis=-1)
        moved = jnp.sqrt(jnp.max(jnp.where(atoms, moved2, 0.0)))
        return jnp.any(nl.stale & live) | beyond_skin(2.0 * moved, nl.spec.skin)

    def per_system(nl, positions):
        return jnp.any(needs_rebuild(nl, positions, cell, batch))

    return jax.lax.cond(cell_moved, per_system, fixed_cells, nl, positions)


def mark_stale(nl: NeighborList, systems: jax.Array) -> NeighborList:
    """Force a rebuild of ``systems (S,) bool`` at the next :func:`update` (e.g. after a refill)."""
    return nl.replace(stale=nl.stale | systems)


# --------------------------------------------------------------------------- pairs
def pair_components(nl: NeighborList, positions: jax.Array, cell: jax.Array, batch: Batch):
    """Pair vectors as three ``(N, K)`` components ``(dx, dy, dz)`` Å and their ``mask (N, K)``
    (differentiable in positions and cell; masked entries hold an arbitrary finite value).

    Separate components let XLA fuse the gathers with whatever consumes them (a pair
    potential's row sums) instead of materialising ``(N, K, 3)`` arrays between kernels.
    """
    mask = nl.mask
    j = jnp.where(mask, nl.indices, 0)
    cell_i = gather_systems(cell, batch.system_index)
    shift = [c.astype(positions.dtype) for c in shift_components(nl.shifts, nl.spec.shift_dtype)]
    out = []
    for a in range(3):
        column = positions[:, a]
        image = sum(shift[k] * cell_i[:, None, k, a] for k in range(3))
        out.append(column[j] - column[:, None] + image)
    return tuple(out), mask


def pair_vectors(nl: NeighborList, positions: jax.Array, cell: jax.Array, batch: Batch):
    """Pair vectors ``d_ij (N, K, 3)`` Å and their ``mask (N, K)`` (see :func:`pair_components`)."""
    d, mask = pair_components(nl, positions, cell, batch)
    return jnp.stack(d, axis=-1), mask


# --------------------------------------------------------------------------- host side
def grow(nl: NeighborList, factor: float = 1.25) -> NeighborSpec:
    """A spec large enough for everything ``nl`` has needed so far (host side).

    Capacities that sufficed are kept; those exceeded grow to ``factor`` times the need.
    """
    spec = nl.spec
    changes = {}
    if bool(nl.shift_overflow):      # packed -> a byte per component -> 4 bytes
        changes["shift_dtype"] = "int8" if spec.shift_dtype == "packed" else "int32"
    needed = [int(x) for x in np.asarray(nl.needed)]
    more = lambda have, need: have if need <= have else max(have + 1, math.ceil(need * factor))
    changes["max_neighbors"] = more(spec.max_neighbors, needed[0])
    if spec.method == "all_pairs":
        changes["max_candidates"] = more(spec.max_candidates, needed[1])
    else:
        changes["max_atoms_per_bin"] = more(spec.max_atoms_per_bin, needed[2])
        changes["max_image_shift"] = max(spec.max_image_shift, needed[3])
    return dataclasses.replace(spec, **changes)


_build_jit = jax.jit(build, static_argnums=0)
_frame_and_widths_jit = jax.jit(_frame_and_widths)


def _system_geometry(batch: Batch, rc: float):
    """Host-side per-system numbers used to choose a method and first capacities."""
    _, _, widths = _frame_and_widths_jit(batch.cell, batch.pbc)
    widths = np.asarray(widths, float)
    pbc = np.asarray(batch.pbc)
    mask = np.asarray(batch.system_mask)
    n_atoms = np.asarray(batch.n_atoms)
    filled = np.flatnonzero(mask)
    extent = np.zeros((len(filled), 3))
    if not pbc[filled].all():      # open axes: a box around the atoms (fully periodic: skipped)
        # Per-system coordinate ranges with reduceat over atoms sorted by system (no loop
        # over systems: allocation of a 10,000-system batch spent 0.17 s in one).
        positions = np.asarray(batch.positions, float)
        index = np.asarray(batch.system_index)
        order = np.argsort(index, kind="stable")
        ordered = np.concatenate([positions[order], np.zeros((1, 3))])
        bounds = np.concatenate([[0], np.cumsum(np.bincount(index, minlength=batch.num_systems + 1))])
        cuts = np.stack([bounds[filled], bounds[filled + 1]], axis=1).ravel()
        extent = (np.maximum.reduceat(ordered, cuts, axis=0)[::2]
                  - np.minimum.reduceat(ordered, cuts, axis=0)[::2]) + rc
    lengths = np.where(pbc[filled], widths[filled], np.maximum(extent, rc))
    densities = n_atoms[filled] / np.prod(lengths, axis=1)
    return widths[filled], pbc[filled], n_atoms[filled], densities


def allocate(batch: Batch, cutoff: float, skin: float = 0.5, method: str = "auto",
             max_neighbors: int | None = None, block_size: int = 4096) -> tuple[NeighborSpec, NeighborList]:
    """Choose a spec for ``batch`` (host side), build the list, and grow until nothing overflows.

    ``method="auto"`` picks all-pairs when a system's atoms are fewer than the
    candidates a cell list would scan, else the cell list. ``max_neighbors``
    defaults to ``batch.capacity.max_neighbors`` or, if that is 0, the largest
    row actually found plus 10 % and 4 (every row is read at every step, so
    spare width costs time; a denser state later overflows and grows the list).
    """
    rc = cutoff + skin
    widths, pbc, n_atoms, density = _system_geometry(batch, rc)
    reach = np.where(pbc, np.ceil(rc / widths + 0.5) - 1, 0)
    radix = np.where(_one_flip(reach, widths, rc)[:, None], 1 + reach, 2 * reach + 1)
    max_candidates = int(np.max(n_atoms * np.prod(radix, axis=1)))
    nbins = np.where(pbc, np.maximum(1, np.floor(widths / rc)), 1)
    bin_length = np.where(pbc, widths / nbins, rc)
    cl_shift = int(np.max(np.ceil(rc / bin_length), initial=1))
    per_bin = int(np.ceil(1.5 * np.max(density * np.prod(bin_length, axis=1)))) + 4
    cost_all_pairs = -(-max_candidates // WORD) * WORD          # as tested: whole words
    cost_cell_list = -(-per_bin * (2 * cl_shift + 1) ** 3 // WORD) * WORD
    if method == "auto":
        method = "all_pairs" if cost_all_pairs <= cost_cell_list else "cell_list"
    fit = max_neighbors is None and not batch.capacity.max_neighbors
    if max_neighbors is None:   # an estimate with 25 % headroom, trimmed after the first build
        max_neighbors = batch.capacity.max_neighbors or int(
            np.ceil(1.25 * float(density.max()) * 4.0 / 3.0 * np.pi * rc**3)) + 8
    # Packed shifts hold |n| <= 1: systems that need further images start with int8.
    packed = DEFAULT_SHIFT_DTYPE == "packed" and reach.max(initial=0) <= 1 and (
        method == "all_pairs" or cl_shift <= 1)
    spec = NeighborSpec(cutoff=cutoff, skin=skin, max_neighbors=max_neighbors, method=method,
                        max_candidates=max(1, max_candidates), max_atoms_per_bin=per_bin,
                        max_image_shift=cl_shift, block_size=block_size,
                        shift_dtype="packed" if packed else "int8")
    spec, nl = build_fitting(spec, batch.positions, batch.cell, batch)
    snug = int(np.ceil(1.1 * int(nl.needed[0]))) + 4
    if fit and snug < spec.max_neighbors:
        # Rows are filled from the left: the first `snug` columns are the snug build's table.
        spec = dataclasses.replace(spec, max_neighbors=snug)
        nl = nl.replace(indices=nl.indices[:, :snug], shifts=nl.shifts[:, :snug], spec=spec)
    return spec, nl


def build_fitting(spec: NeighborSpec, positions, cell, batch: Batch, tries: int = 4):
    """Host side: build with ``spec``, growing it (:func:`grow`) until nothing overflows;
    ``(spec, list)``. A truncated build under-reports the neighbors per atom, so one
    growth may not be enough."""
    for _ in range(tries):
        nl = _build_jit(spec, positions, cell, batch)
        if not bool(nl.overflow):
            return spec, nl
        spec = grow(nl)
    raise RuntimeError(f"the neighbor list still overflows after growing to {spec}")


@jax.jit
def _closest(nl: NeighborList, positions, cell, batch: Batch):
    """Per system: the shortest listed pair distance (``inf`` if none), the lowest atom
    holding it and its partner (global indices). Reduced on the device: only ``(S,)``
    values come back (the pair vectors of a 1,000,000-atom pool are ~100 MB)."""
    d, mask = pair_components(nl, positions, cell, batch)
    r2 = jnp.where(mask, d[0] ** 2 + d[1] ** 2 + d[2] ** 2, jnp.inf)
    col = jnp.argmin(r2, axis=1)
    nearest = jnp.take_along_axis(r2, col[:, None], axis=1)[:, 0]
    n_sys, n_atoms = batch.num_systems, positions.shape[0]
    best = segments.segment_min(nearest, batch.system_index, n_sys)
    holds = jnp.isfinite(nearest) & (nearest == gather_systems(best, batch.system_index, -1.0))
    atom = segments.segment_min(jnp.where(holds, jnp.arange(n_atoms), n_atoms), batch.system_index, n_sys)
    atom = jnp.clip(atom, 0, n_atoms - 1)
    return jnp.sqrt(best), atom, nl.indices[atom, col[atom]]


def closest_pairs(batch: Batch, max_distance: float):
    """Host side: per filled slot ``s``, the shortest pair distance below ``max_distance``
    (``inf`` if none) and the two atoms' indices within their system."""
    spec, nl = allocate(batch, cutoff=max_distance, skin=0.0, max_neighbors=8)
    best, atom, partner = jax.device_get(_closest(nl, batch.positions, batch.cell, batch))
    best = np.where(np.asarray(batch.system_mask), np.asarray(best, float), np.inf)
    n_sys = batch.num_systems
    atom_i = np.zeros(n_sys, int)
    atom_j = np.zeros(n_sys, int)
    close = np.flatnonzero(np.isfinite(best))
    if not close.size:      # the usual case: nothing else to read
        return best, atom_i, atom_j
    system_index = np.asarray(batch.system_index)
    for s in close:
        members = np.flatnonzero(system_index == s)       # ascending
        atom_i[s] = int(np.searchsorted(members, atom[s]))
        atom_j[s] = int(np.searchsorted(members, partner[s]))
    return best, atom_i, atom_j
