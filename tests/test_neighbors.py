"""On-device neighbor lists against an independent brute-force reference.

Every test compares SETS of ``(i, j, shift)`` (local atom indices within a
system) with :func:`_reference.brute_force_pairs`; a pair may only differ when
its distance is within rounding of the cutoff. Both methods, both precisions,
periodic / triclinic / slab / wire / cluster / thin-cell / unwrapped systems,
alone and mixed in one padded batch; the Verlet skin; overflow and ``grow``;
``jit`` retracing.

Compile time dominates on CPU, so shapes and specs are shared where possible.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _reference import brute_force_pairs, jittered_fractional, pair_distance
from nvalchemi_jax import neighbors
from nvalchemi_jax.batch import Batch
from nvalchemi_jax.capacity import Capacity

CUTOFF = 3.0
SKIN = 0.5
RC = CUTOFF + SKIN
METHODS = ("all_pairs", "cell_list")
T, F = True, False

# The all-pairs capacity: candidates scanned per system (atoms x own images); older
# versions of the module called it max_atoms_per_system and had a global image shift.
_SPEC_FIELDS = {f.name for f in dataclasses.fields(neighbors.NeighborSpec)}
AP_CAPACITY = "max_candidates" if "max_candidates" in _SPEC_FIELDS else "max_atoms_per_system"


def make_spec(method, *, all_pairs_capacity=1024, max_atoms_per_bin=48, max_image_shift=3,
              **kwargs):
    """A hand-made spec with generous capacities for both methods."""
    kwargs.setdefault("cutoff", CUTOFF)
    kwargs.setdefault("skin", SKIN)
    kwargs.setdefault("max_neighbors", 96)
    kwargs.setdefault("block_size", 40)          # builds test candidates in 32-wide blocks
    return neighbors.NeighborSpec(method=method, max_atoms_per_bin=max_atoms_per_bin,
                                  max_image_shift=max_image_shift,
                                  **{AP_CAPACITY: all_pairs_capacity}, **kwargs)


# One capacity and one generous spec per method shared by most tests, so that the
# jitted build / update below compile once per (method, precision) for all of them.
CAP = Capacity(num_systems=5, num_atoms=224)
BUILD = jax.jit(neighbors.build, static_argnums=0)
UPDATE = jax.jit(neighbors.update)
NEEDS_REBUILD = jax.jit(neighbors.needs_rebuild)
PAIR_VECTORS = jax.jit(neighbors.pair_vectors)


def scanned_images(nl, batch):
    """Largest number of periodic images (1 = nearest only) a build scanned beyond
    its atoms: all-pairs candidates per atom, or cell-list bins on each side."""
    needed = np.asarray(nl.needed)
    if nl.spec.method == "cell_list":
        return int(needed[3])
    return int(needed[1]) / int(np.max(np.asarray(batch.n_atoms)))


# --------------------------------------------------------------------------- structures
def _f32(x):
    """Values exactly representable in float32, so one float64 reference serves both precisions."""
    return np.asarray(np.asarray(x, np.float64).astype(np.float32), np.float64)


def _system(cell, pbc, counts, open_lengths=(0.0, 0.0, 0.0), unwrap=0, seed=0, jitter=0.25):
    """Atoms on a jittered grid: fractional along periodic cell rows, Cartesian (Å, along an
    orthonormal complement of the periodic rows) along open axes; ``unwrap`` moves every atom
    by random lattice vectors in ``[-unwrap, unwrap]`` along periodic axes."""
    rng = np.random.default_rng(seed)
    cell = np.asarray(cell, np.float64)
    pbc = np.asarray(pbc, bool)
    frac = jittered_fractional(counts, rng, jitter)
    periodic = cell[pbc]
    q, _ = np.linalg.qr(np.concatenate([periodic.T, np.eye(3)], axis=1))
    complement = iter(q[:, len(periodic):3].T)
    basis = np.stack([cell[k] if pbc[k] else next(complement) * open_lengths[k] for k in range(3)])
    if unwrap:
        frac = frac + rng.integers(-unwrap, unwrap + 1, frac.shape) * pbc
    return _f32(frac @ basis), _f32(cell), pbc


TRICLINIC = [[7.0, 0, 0], [3.5, 6.5, 0], [-2.0, 2.5, 6.8]]          # widths 5.7..6.8 < 2 RC
TRICLINIC_BIG = [[9.0, 0, 0], [4.0, 8.5, 0], [-2.5, 3.0, 8.2]]      # widths >= 7.4 > 2 RC
TINY = [[2.5, 0, 0], [1.1, 2.3, 0], [0.5, 0.7, 2.6]]                # widths ~2.1 < RC

STRUCTURES = {
    # periodic cells at least 2 RC wide: nearest image only
    "cubic": lambda: _system(np.eye(3) * 8.0, (T, T, T), (4, 4, 4), seed=1),
    "cubic_large": lambda: _system(np.eye(3) * 11.0, (T, T, T), (6, 6, 6), seed=2),
    "triclinic_big": lambda: _system(TRICLINIC_BIG, (T, T, T), (4, 4, 4), seed=3),
    "unwrapped_big": lambda: _system(TRICLINIC_BIG, (T, T, T), (4, 3, 4), unwrap=3, seed=4),
    "slab": lambda: _system([[8.0, 0, 0], [2.0, 7.5, 0], [0, 0, 0]], (T, T, F), (4, 4, 3),
                            (0, 0, 6.0), seed=5),
    "slab_tilted": lambda: _system([[7.5, 0, 0], [-1.5, 8.0, 0], [1.0, 2.0, 3.0]], (T, T, F),
                                   (4, 4, 4), (0, 0, 8.0), unwrap=2, seed=6),
    "slab_xz": lambda: _system([[8.0, 0, 0.5], [0, 0, 0], [0.8, 0.3, 7.6]], (T, F, T), (4, 3, 4),
                               (0, 6.0, 0), seed=7),
    "wire": lambda: _system([[8.0, 0, 0], [0, 0, 0], [0, 0, 0]], (T, F, F), (4, 3, 3),
                            (0, 6.0, 6.0), unwrap=2, seed=8),
    "wire_tilted": lambda: _system([[5.0, 5.0, 2.0], [0, 0, 0], [0, 0, 0]], (T, F, F), (4, 3, 3),
                                   (0, 6.0, 6.0), seed=9),
    "skew_big": lambda: _system([[12.0, 0, 0], [9.0, 11.0, 0], [-7.0, 5.0, 12.0]], (T, T, T),
                                (6, 6, 6), seed=19),
    "slab_yz": lambda: _system([[0, 0, 0], [0.5, 7.5, 0], [0.2, 2.5, 7.9]], (F, T, T), (3, 4, 4),
                               (6.0, 0, 0), seed=20),
    "cluster": lambda: _system(np.zeros((3, 3)), (F, F, F), (4, 4, 4), (8.0, 8.0, 8.0), seed=10),
    "cluster_flat": lambda: _system(np.zeros((3, 3)), (F, F, F), (5, 5, 1), (10.0, 10.0, 0.0),
                                    seed=21, jitter=0.0),   # all atoms in one plane
    "cluster_boxed": lambda: _system(np.eye(3) * 3.0, (F, F, F), (5, 3, 3), (10.0, 6.0, 6.0),
                                     seed=11),          # open axes: the cell must not matter
    # thinner than 2 RC, or than RC itself: several images per pair
    "triclinic": lambda: _system(TRICLINIC, (T, T, T), (3, 4, 3), seed=12),
    "small": lambda: _system([[5.0, 0, 0], [0.6, 5.0, 0], [0.3, -0.4, 5.0]], (T, T, T), (2, 2, 2),
                             seed=13),
    "tiny": lambda: _system(TINY, (T, T, T), (1, 1, 2), seed=14),
    "tiny_single": lambda: _system(np.eye(3) * 2.2, (T, T, T), (1, 1, 1), seed=15),
    "tiny_unwrapped": lambda: _system(TINY, (T, T, T), (1, 2, 1), unwrap=3, seed=16),
    "slab_thin": lambda: _system([[2.4, 0, 0], [0.8, 2.6, 0], [0, 0, 0]], (T, T, F), (1, 1, 3),
                                 (0, 0, 6.0), seed=17),
    "wire_thin": lambda: _system([[2.0, 0, 0], [0, 0, 0], [0, 0, 0]], (T, F, F), (1, 3, 3),
                                 (0, 6.0, 6.0), unwrap=4, seed=18),
    "wire_z_thin": lambda: _system([[0, 0, 0], [0, 0, 0], [0.3, -0.2, 2.1]], (F, F, T), (3, 3, 1),
                                   (6.0, 6.0, 0), unwrap=3, seed=22),
}
BIG = ["cubic", "cubic_large", "triclinic_big", "unwrapped_big", "skew_big", "slab",
       "slab_tilted", "slab_xz", "slab_yz", "wire", "wire_tilted", "cluster", "cluster_boxed",
       "cluster_flat"]
MIXED = ["cubic", "tiny", "slab", "cluster", "triclinic", "wire_thin", "unwrapped_big",
         "tiny_single", "slab_tilted", "small", "wire", "tiny_unwrapped", "slab_xz", "slab_thin",
         "wire_tilted", "cluster_boxed", "wire_z_thin", "slab_yz", "cluster_flat"]


@functools.lru_cache(maxsize=None)
def structure(name):
    return STRUCTURES[name]()


@functools.lru_cache(maxsize=None)
def reference(name, cutoff=RC):
    positions, cell, pbc = structure(name)
    return brute_force_pairs(positions, cell, pbc, cutoff, return_distances=True)


def make_batch(names, capacity=None, positions=None):
    systems = [structure(n) for n in names]
    pos = positions if positions is not None else [s[0] for s in systems]
    return Batch.from_arrays(pos, [np.full(len(p), 18) for p in pos],
                             cell=[s[1] for s in systems], pbc=[s[2] for s in systems],
                             capacity=capacity, min_distance=None)


def tolerance():
    """Pairs this close to the cutoff may legitimately differ (rounding)."""
    return 1e-8 if jnp.zeros(()).dtype == jnp.float64 else 2e-4


# --------------------------------------------------------------------------- table -> sets
def table_pairs(nl, batch, indices=None, shifts=None):
    """Per filled system, the list (not set: duplicates must show) of ``(i, j, shift)``
    tuples with local indices; checks the layout on the way. ``indices`` / ``shifts``
    replace the list's own arrays (a filtered copy)."""
    indices = np.asarray(nl.indices if indices is None else indices)
    shifts = np.asarray(nl.shift_vectors if shifts is None else shifts)
    n_atoms = batch.num_atoms
    system_index = np.asarray(batch.system_index)
    atom_mask = np.asarray(batch.atom_mask)
    pbc = np.asarray(batch.pbc)
    assert indices.shape == (n_atoms, nl.spec.max_neighbors)
    assert shifts.shape == (n_atoms, nl.spec.max_neighbors, 3)
    assert indices.min() >= 0 and indices.max() <= n_atoms, "indices outside [0, N]"
    mask = indices < n_atoms
    assert not mask[~atom_mask].any(), "a padding atom has neighbors (its row must be empty)"
    rows, cols = np.nonzero(mask)
    j = indices[rows, cols]
    assert atom_mask[j].all(), "a padding atom is listed as a neighbor"
    cross = system_index[rows] != system_index[j]
    assert not cross.any(), f"pairs across systems: {list(zip(rows[cross], j[cross]))[:5]}"
    open_axes = ~pbc[system_index[rows]]
    assert not (shifts[rows, cols] * open_axes).any(), "a shift along an open axis"
    local = np.zeros(n_atoms, int)
    out = []
    for sl in batch.system_slices():
        local[sl] = np.arange(len(sl))
    for s, sl in zip(np.flatnonzero(np.asarray(batch.system_mask)), batch.system_slices()):
        pick = system_index[rows] == s
        out.append([(int(local[a]), int(local[b]), tuple(int(x) for x in n))
                    for a, b, n in zip(rows[pick], j[pick], shifts[rows[pick], cols[pick]])])
    return out


def assert_same_pairs(got, ref, positions, cell, cutoff, label, tol=None):
    """``got`` (list of tuples) equals ``ref`` ({pair: distance}) up to pairs within ``tol``
    of the cutoff; no duplicates."""
    tol = tolerance() if tol is None else tol
    got_set = set(got)
    assert len(got_set) == len(got), f"{label}: {len(got) - len(got_set)} duplicate pairs"
    missing = [p for p in set(ref) - got_set if ref[p] < cutoff - tol]
    extra = []
    for p in got_set - set(ref):
        self_pair = p[0] == p[1] and not any(p[2])
        if self_pair or pair_distance(positions, cell, p) >= cutoff + tol:
            extra.append((p, pair_distance(positions, cell, p)))
    assert not missing and not extra, (
        f"{label}: {len(missing)} missing, e.g. {[(p, ref[p]) for p in sorted(missing)[:4]]}; "
        f"{len(extra)} extra, e.g. {sorted(extra)[:4]}")


def check_against_brute_force(nl, batch, names, cutoff=RC, positions=None, cells=None):
    """Every filled system of ``nl`` against brute force; ``names`` are STRUCTURES keys
    (or any label when ``positions`` and ``cells`` are given; pbc then comes from the batch)."""
    assert not bool(nl.overflow), f"unexpected overflow, needed {nl.needed}"
    np.testing.assert_array_equal(np.asarray(nl.mask), np.asarray(nl.indices) < batch.num_atoms)
    per_system = table_pairs(nl, batch)
    assert len(per_system) == len(names)
    filled = np.flatnonzero(np.asarray(batch.system_mask))
    for k, (name, got) in enumerate(zip(names, per_system)):
        pbc = np.asarray(batch.pbc)[filled[k]]
        if positions is None and cells is None and cutoff == RC:
            pos, cell, _ = structure(name)
            ref = reference(name)
        else:
            pos = positions[k] if positions is not None else structure(name)[0]
            cell = cells[k] if cells is not None else structure(name)[1]
            ref = brute_force_pairs(pos, cell, pbc, cutoff, return_distances=True)
        assert_same_pairs(got, ref, pos, cell, cutoff, f"{name} ({nl.spec.method})")


def within_cutoff_pairs(nl, batch, positions, cell, cutoff):
    """Listed pairs whose current distance (from ``pair_vectors``) is below ``cutoff``."""
    d, mask = PAIR_VECTORS(nl, positions, cell, batch)
    dist = np.linalg.norm(np.asarray(d, np.float64), axis=-1)
    keep = np.asarray(mask) & (dist < cutoff)
    return table_pairs(nl, batch, np.where(keep, np.asarray(nl.indices), batch.num_atoms),
                       np.asarray(nl.shift_vectors))


# --------------------------------------------------------------------------- the reference
def _ase_pairs(atoms, cutoff):
    from ase.neighborlist import neighbor_list

    i, j, s = neighbor_list("ijS", atoms, cutoff)
    return [(int(a), int(b), tuple(int(x) for x in n)) for a, b, n in zip(i, j, s)]


def _ase_structures():
    from ase import Atoms
    from ase.build import bulk, fcc111, molecule

    out = {}
    out["cu_primitive"] = bulk("Cu", "fcc", a=3.6)                        # cell < cutoff
    a = bulk("Ar", "fcc", a=5.26, cubic=True) * (2, 2, 2)
    a.rattle(0.1, seed=1)
    out["ar_rattled"] = a
    tri_pos, tri_cell, _ = structure("unwrapped_big")                      # atoms outside the cell
    out["triclinic_unwrapped"] = Atoms("Ar" * len(tri_pos), positions=tri_pos, cell=tri_cell,
                                       pbc=True)
    slab = fcc111("Al", size=(2, 2, 3), vacuum=5.0)                       # pbc T, T, F
    slab.positions[:, :2] += 3.0 * slab.cell[0, :2]                        # unwrapped in-plane
    out["slab"] = slab
    out["benzene"] = molecule("C6H6")                                      # zero cell, no pbc
    return out


@pytest.mark.parametrize("name", ["cu_primitive", "ar_rattled", "triclinic_unwrapped", "slab",
                                  "benzene"])
def test_reference_matches_ase(name):
    atoms = _ase_structures()[name]
    cutoff = 5.0
    ours = brute_force_pairs(atoms.positions, np.asarray(atoms.cell), atoms.pbc, cutoff)
    theirs = _ase_pairs(atoms, cutoff)
    assert len(set(theirs)) == len(theirs)
    assert ours == set(theirs)
    assert len(ours) > len(atoms)


def test_reference_basic_properties():
    pos, cell, pbc = structure("wire_thin")
    ref = brute_force_pairs(pos, cell, pbc, RC)
    assert all(not (i == j and not any(n)) for i, j, n in ref)
    assert all(n[1] == 0 and n[2] == 0 for _, _, n in ref)        # no shift on open axes
    assert any(abs(n[0]) >= 2 for _, _, n in ref)                 # thin wire: several images
    # every pair appears in both directions with the opposite shift
    assert {(j, i, tuple(-x for x in n)) for i, j, n in ref} == ref
    # an open system's cell is ignored entirely
    pos, cell, pbc = structure("cluster_boxed")
    assert brute_force_pairs(pos, cell, pbc, RC) == brute_force_pairs(pos, np.zeros((3, 3)), pbc, RC)


def _perfect_list(names, batch, spec):
    """A NeighborList filled on the host from the brute-force reference."""
    n_atoms, k = batch.num_atoms, spec.max_neighbors
    indices = np.full((n_atoms, k), n_atoms, np.int32)
    shifts = np.zeros((n_atoms, k, 3), np.int32)
    fill = np.zeros(n_atoms, int)
    for name, sl in zip(names, batch.system_slices()):
        for i, j, n in sorted(reference(name)):
            row = sl[i]
            indices[row, fill[row]] = sl[j]
            shifts[row, fill[row]] = n
            fill[row] += 1
    n_sys = batch.num_systems
    return neighbors.NeighborList(
        indices=jnp.asarray(indices), shifts=jnp.asarray(shifts),
        reference_positions=batch.positions, reference_cell=batch.cell,
        max_shift=jnp.zeros((n_sys, 3), jnp.int32), stale=jnp.zeros(n_sys, bool),
        rebuilds=jnp.zeros(n_sys, jnp.int32), needed=jnp.zeros(4, jnp.int32), spec=spec)


def test_checker_catches_defects(x64):
    """The comparison helpers themselves: a perfect table passes, planted defects fail."""
    names = ["tiny", "slab"]
    batch = make_batch(names, capacity=Capacity(num_systems=3, num_atoms=64))
    nl = _perfect_list(names, batch, make_spec("all_pairs", max_neighbors=64))
    check_against_brute_force(nl, batch, names)
    idx, sh = np.asarray(nl.indices), np.asarray(nl.shifts)
    a, b = batch.system_slices()
    n_atoms = batch.num_atoms

    def broken(indices=idx, shifts=sh):
        return nl.replace(indices=jnp.asarray(indices), shifts=jnp.asarray(shifts))

    row = b[0]
    last = int(np.sum(idx[row] < n_atoms))
    dropped = idx.copy()
    dropped[row, last - 1] = n_atoms                      # a missing pair
    duplicated = idx.copy()
    duplicated[row, last] = idx[row, 0]                   # the same pair twice
    dup_shifts = sh.copy()
    dup_shifts[row, last] = sh[row, 0]
    far = idx.copy()
    far[row, last] = b[1]
    far_shifts = sh.copy()
    far_shifts[row, last] = (1, 1, 0)                     # a pair beyond the cutoff
    cross = idx.copy()
    cross[row, last] = a[0]                               # an atom of another system
    padding_row = idx.copy()
    padding_row[n_atoms - 1, 0] = 0                       # a padding atom with a neighbor
    open_shift = sh.copy()
    open_shift[row, 0, 2] = 1                             # a shift along the slab's open axis
    for what, bad in [("missing", broken(dropped)), ("duplicate", broken(duplicated, dup_shifts)),
                      ("extra", broken(far, far_shifts)), ("across systems", broken(cross)),
                      ("padding atom", broken(padding_row)),
                      ("open axis", broken(idx, open_shift))]:
        with pytest.raises(AssertionError, match=what):
            check_against_brute_force(bad, batch, names)


# --------------------------------------------------------------------------- correctness
@pytest.mark.parametrize("method", METHODS)
def test_mixed_batch_allocate(method, precision):
    """One padded batch mixing every kind of system (different sizes, two empty slots,
    padding atoms), via ``allocate``; the returned spec drives a direct ``build`` too."""
    n = sum(len(structure(k)[0]) for k in MIXED)
    batch = make_batch(MIXED, capacity=Capacity(num_systems=len(MIXED) + 2, num_atoms=n + 21))
    assert batch.positions.dtype == (np.float64 if precision == "float64" else np.float32)
    spec, nl = neighbors.allocate(batch, CUTOFF, SKIN, method=method)
    assert spec.method == method
    assert scanned_images(nl, batch) >= 2       # thin cells need images
    check_against_brute_force(nl, batch, MIXED)
    again = BUILD(spec, batch.positions, batch.cell, batch)
    np.testing.assert_array_equal(np.asarray(again.indices), np.asarray(nl.indices))
    np.testing.assert_array_equal(np.asarray(again.shifts), np.asarray(nl.shifts))
    np.testing.assert_array_equal(np.asarray(again.rebuilds), 0)
    # pair vectors have the documented meaning: |d| < cutoff + skin on every real entry
    d, mask = neighbors.pair_vectors(nl, batch.positions, batch.cell, batch)
    dist = np.linalg.norm(np.asarray(d, np.float64), axis=-1)[np.asarray(mask)]
    assert dist.max() < RC + tolerance() and dist.min() > 0.2


@pytest.mark.parametrize("method", METHODS)
def test_wide_cells_nearest_image_path(method, x64):
    """Only cells at least 2 (cutoff + skin) wide: all-pairs takes the nearest image only
    and the cell list scans one bin each side."""
    n = sum(len(structure(k)[0]) for k in BIG)
    batch = make_batch(BIG, capacity=Capacity(num_systems=len(BIG), num_atoms=n))
    spec, nl = neighbors.allocate(batch, CUTOFF, SKIN, method=method)
    assert scanned_images(nl, batch) == 1
    check_against_brute_force(nl, batch, BIG)


@pytest.mark.parametrize("method", METHODS)
def test_direct_build_each_system_alone(method, x64):
    """Each structure alone in a batch of fixed capacity (one compile for all), built with
    ``neighbors.build`` and a hand-made spec; all-pairs scans in several small blocks."""
    spec = make_spec(method)
    for name in STRUCTURES:
        batch = make_batch([name], capacity=CAP)
        nl = BUILD(spec, batch.positions, batch.cell, batch)
        check_against_brute_force(nl, batch, [name])


def test_from_atoms_matches_ase(x64):
    """ASE structures through ``Batch.from_atoms`` and ``allocate(method="auto")``, against
    ``ase.neighborlist.neighbor_list`` directly."""
    structures = _ase_structures()
    names = list(structures)
    atoms_list = [structures[k] for k in names]
    batch = Batch.from_atoms(atoms_list, min_distance=None)
    spec, nl = neighbors.allocate(batch, CUTOFF, SKIN)
    assert spec.method in METHODS and not bool(nl.overflow)
    for name, atoms, got in zip(names, atoms_list, table_pairs(nl, batch)):
        ref = {p: pair_distance(atoms.positions, atoms.cell, p) for p in _ase_pairs(atoms, RC)}
        assert_same_pairs(got, ref, atoms.positions, np.asarray(atoms.cell), RC,
                          f"{name} ({spec.method})")


# --------------------------------------------------------------------------- Verlet skin
VERLET = ["cubic", "slab_tilted", "tiny", "wire"]      # + one empty slot in CAP


@pytest.mark.parametrize("method", METHODS)
def test_verlet_skin(method, x64):
    names = VERLET
    batch = make_batch(names, capacity=CAP)
    spec = make_spec(method)
    nl = BUILD(spec, batch.positions, batch.cell, batch)
    check_against_brute_force(nl, batch, names)
    slices = batch.system_slices()
    base = [structure(k)[0] for k in names]
    cells = [structure(k)[1] for k in names]
    pbcs = [structure(k)[2] for k in names]
    np.testing.assert_array_equal(np.asarray(nl.rebuilds), 0)

    def with_positions(per_system):
        flat = np.array(batch.positions, np.float64)
        for sl, p in zip(slices, per_system):
            flat[sl] = p
        return jnp.asarray(flat, batch.dtype)

    def with_cells(per_system):
        c = np.array(batch.cell, np.float64)
        c[:len(per_system)] = per_system
        return jnp.asarray(c, batch.dtype)

    def host(per_system):        # exactly what the device sees, for the reference
        return [_f32(p) if batch.dtype == np.float32 else np.asarray(p) for p in per_system]

    def check_within_cutoff(nl, positions, cell, per_pos, per_cell, label):
        got = within_cutoff_pairs(nl, batch, positions, cell, CUTOFF)
        for name, g, p, c, pbc in zip(names, got, per_pos, per_cell, pbcs):
            ref = brute_force_pairs(p, c, pbc, CUTOFF, return_distances=True)
            assert_same_pairs(g, ref, p, c, CUTOFF, f"{name} {label}")

    # 1. every atom moves by 0.45 skin/2 in a random direction: the list is kept, and the
    #    pairs within the cutoff are still all there
    rng = np.random.default_rng(0)
    small = []
    for p in base:
        v = rng.normal(size=p.shape)
        small.append(p + 0.45 * SKIN / 2 * v / np.linalg.norm(v, axis=1, keepdims=True))
    small = host(small)
    pos1 = with_positions(small)
    assert not np.asarray(NEEDS_REBUILD(nl, pos1, batch.cell, batch)).any()
    nl1 = UPDATE(nl, pos1, batch.cell, batch)
    np.testing.assert_array_equal(np.asarray(nl1.rebuilds), 0)
    np.testing.assert_array_equal(np.asarray(nl1.indices), np.asarray(nl.indices))
    np.testing.assert_array_equal(np.asarray(nl1.reference_positions), np.asarray(nl.reference_positions))
    check_within_cutoff(nl1, pos1, batch.cell, small, cells, "after small moves")

    # 2. one atom of system 1 jumps by 1.2 Å: system 1 asks for a rebuild, and every
    #    system is rebuilt, exactly (any rebuild is of all systems)
    real = np.asarray(batch.system_mask).astype(int)
    expected = np.zeros_like(real)

    def rebuilt(after):
        nonlocal expected
        expected = expected + real
        np.testing.assert_array_equal(np.asarray(after.rebuilds), expected)
        assert not np.asarray(after.stale).any()

    big = list(small)
    big[1] = small[1].copy()
    big[1][3] += np.array([0.0, 1.2, 0.0])
    big = host(big)
    pos2 = with_positions(big)
    np.testing.assert_array_equal(np.asarray(NEEDS_REBUILD(nl1, pos2, batch.cell, batch)),
                                  [False, True, False, False, False])
    nl2 = UPDATE(nl1, pos2, batch.cell, batch)
    rebuilt(nl2)
    per_system = table_pairs(nl2, batch)
    for s in range(len(big)):
        ref = brute_force_pairs(big[s], cells[s], pbcs[s], RC, return_distances=True)
        assert_same_pairs(per_system[s], ref, big[s], cells[s], RC, f"rebuilt system {s}")
    np.testing.assert_array_equal(np.asarray(nl2.reference_positions), np.asarray(pos2))
    check_within_cutoff(nl2, pos2, batch.cell, big, cells, "after one system's big move")

    # 3. mark_stale forces a rebuild, then clears
    stale = neighbors.mark_stale(nl2, jnp.array([False, False, True, False, False]))
    nl3 = UPDATE(stale, pos2, batch.cell, batch)
    rebuilt(nl3)
    np.testing.assert_array_equal(np.asarray(nl3.reference_positions), np.asarray(pos2))
    nl3b = UPDATE(nl3, pos2, batch.cell, batch)
    np.testing.assert_array_equal(np.asarray(nl3b.rebuilds), expected)

    # 4. cell changes with the atoms left in place: system 0 strained by 4 % (well past the
    #    skin criterion) asks for a rebuild; a 1e-3 Å change of system 3's cell does not
    new_cells = list(cells)
    new_cells[0] = _f32(cells[0] @ np.diag([1.04, 0.98, 1.0]))
    new_cells[3] = _f32(cells[3] + np.array([[1e-3, 0, 0], [0, 0, 0], [0, 0, 0]]))
    cell4 = with_cells(new_cells)
    np.testing.assert_array_equal(np.asarray(NEEDS_REBUILD(nl3, pos2, cell4, batch)),
                                  [True, False, False, False, False])
    nl4 = UPDATE(nl3, pos2, cell4, batch)
    rebuilt(nl4)
    np.testing.assert_array_equal(np.asarray(nl4.reference_cell)[0], np.asarray(cell4)[0])
    check_within_cutoff(nl4, pos2, cell4, big, new_cells, "after the cell change")
    assert not bool(nl4.overflow)

    # 5. a rebuild inside update that needs more than the spec is not silent
    squeezed = list(big)
    squeezed[0] = big[0] * 0.6
    denser = list(new_cells)
    denser[0] = new_cells[0] * 0.6
    nl5 = UPDATE(nl4, with_positions(host(squeezed)), with_cells(host(denser)), batch)
    rebuilt(nl5)
    assert bool(nl5.overflow)
    assert neighbors.grow(nl5) != spec


# Two one-atom systems (an atom at the origin stays put when positions are scaled with
# the cell, as in NPT). Listed: images with |n a| < 3.5 Å.
#   0: a = 1.8 Å along x: +-a listed (max_shift 1), +-2a = 3.6 Å not. a -> 1.45 Å (a 0.35 Å
#      change, below the 0.5 Å skin) brings +-2a to 2.9 Å, inside the 3 Å cutoff, but
#      drift = 1 * 0.35 < skin keeps the list.
#   1: a 12 Å cube has no pair at all (max_shift 0), so no cell change counts; shrunk to
#      2.8 Å it has 6 images at 2.8 Å.
CELL_BUG = [(np.diag([1.8, 10.0, 10.0]), np.diag([1.45, 10.0, 10.0])),
            (np.eye(3) * 12.0, np.eye(3) * 2.8)]


@pytest.mark.parametrize("method", METHODS)
def test_verlet_cell_change_brings_in_new_images(method, x64):
    """The skin test must also catch pairs that were NOT in the list when the cell changes.

    Fails: ``needs_rebuild`` bounds the cell term by the largest shift *in the list*
    (``nl.max_shift``), but a pair that enters the cutoff can have a larger shift (or the
    list can have none at all)."""
    origin = [np.zeros((1, 3)) for _ in CELL_BUG]
    batch = Batch.from_arrays(origin, [[18], [18]], cell=[c for c, _ in CELL_BUG],
                              pbc=[True, True], capacity=CAP, min_distance=None)
    nl = BUILD(make_spec(method), batch.positions, batch.cell, batch)
    check_against_brute_force(nl, batch, ["one_atom"] * 2, positions=origin,
                              cells=[c for c, _ in CELL_BUG])
    new_cells = [c for _, c in CELL_BUG]
    cell = jnp.asarray(np.array(batch.cell).copy()).at[:2].set(jnp.asarray(np.stack(new_cells)))
    nl2 = UPDATE(nl, batch.positions, cell, batch)
    got = within_cutoff_pairs(nl2, batch, batch.positions, cell, CUTOFF)
    failures = []
    for s, (g, c) in enumerate(zip(got, new_cells)):
        ref = brute_force_pairs(np.zeros((1, 3)), c, [True] * 3, CUTOFF, return_distances=True)
        try:
            assert_same_pairs(g, ref, np.zeros((1, 3)), c, CUTOFF, f"system {s}")
        except AssertionError as e:
            failures.append(f"{e} (rebuilds {int(nl2.rebuilds[s])}, max_shift "
                            f"{np.asarray(nl.max_shift)[s].tolist()})")
    assert not failures, "\n".join(failures)


# --------------------------------------------------------------------------- overflow
OVERFLOW = ["tiny", "cubic", "slab"]


def _snug(spec, needed, factor=1.25):
    """``spec`` with the capacities grow() manages set to ``factor`` x what was needed
    (so that growing any single too-small capacity lands back on this very spec)."""
    more = lambda need: max(1, int(np.ceil(need * factor)))
    needed = [int(x) for x in needed]
    changes = dict(max_neighbors=more(needed[0]))
    if spec.method == "all_pairs":
        changes[AP_CAPACITY] = more(needed[1])
    else:
        changes.update(max_atoms_per_bin=more(needed[2]), max_image_shift=needed[3])
    return dataclasses.replace(spec, **changes)


@pytest.mark.parametrize("method", METHODS)
def test_overflow_is_reported_and_grow_fixes_it(method, x64):
    batch = make_batch(OVERFLOW, capacity=CAP)
    generous = BUILD(make_spec(method), batch.positions, batch.cell, batch)
    check_against_brute_force(generous, batch, OVERFLOW)
    good = _snug(generous.spec, generous.needed)
    nl = BUILD(good, batch.positions, batch.cell, batch)
    check_against_brute_force(nl, batch, OVERFLOW)

    r = dataclasses.replace
    cases = [("max_neighbors", r(good, max_neighbors=5))]
    if method == "all_pairs":
        # room for every atom of the largest system, not for the thin cell's images
        cases.append((AP_CAPACITY, r(good, **{AP_CAPACITY: int(np.max(np.asarray(batch.n_atoms)))})))
    else:
        cases.append(("max_atoms_per_bin", r(good, max_atoms_per_bin=2)))
        cases.append(("max_image_shift", r(good, max_image_shift=1)))    # the tiny cell needs 2
    for what, spec in cases:
        small = BUILD(spec, batch.positions, batch.cell, batch)
        assert bool(small.overflow), f"{what} too small but no overflow (needed {small.needed})"
        grown = neighbors.grow(small)
        assert getattr(grown, what) > getattr(spec, what), what
        nl2 = BUILD(grown, batch.positions, batch.cell, batch)
        assert not bool(nl2.overflow), f"{what}: still overflows after grow: {grown}, {nl2.needed}"
        check_against_brute_force(nl2, batch, OVERFLOW)

    # every capacity too small at once: a few rounds of grow (as allocate does) converge
    if method == "all_pairs":
        spec = r(good, max_neighbors=2, **{AP_CAPACITY: 3})
    else:
        spec = r(good, max_neighbors=2, max_atoms_per_bin=1, max_image_shift=0)
    rounds = 0
    nl3 = BUILD(spec, batch.positions, batch.cell, batch)
    while bool(nl3.overflow) and rounds < 4:
        spec = neighbors.grow(nl3)
        nl3 = BUILD(spec, batch.positions, batch.cell, batch)
        rounds += 1
    assert not bool(nl3.overflow), (rounds, spec)
    check_against_brute_force(nl3, batch, OVERFLOW)


# --------------------------------------------------------------------------- jit
@pytest.mark.parametrize("method", METHODS)
def test_build_traces_once(method):
    """``jax.jit(build, static_argnums=0)`` traces once for new positions (here also moved
    by whole lattice vectors, which the shifts must compensate), new cells and even other
    systems of the same capacity (float32, the default precision)."""
    names = ["cubic", "tiny_unwrapped", "slab_tilted"]
    batch = make_batch(names, capacity=CAP)
    spec = make_spec(method)
    traces = []

    def counted(spec, positions, cell, batch):
        traces.append(spec)
        return neighbors.build(spec, positions, cell, batch)

    build = jax.jit(counted, static_argnums=0)
    nl = build(spec, batch.positions, batch.cell, batch)
    check_against_brute_force(nl, batch, names)
    rng = np.random.default_rng(1)
    moved = []
    for name in names:
        pos, cell, pbc = structure(name)
        lattice = rng.integers(-4, 5, pos.shape) * pbc
        moved.append(_f32(pos + lattice @ cell + rng.uniform(-0.2, 0.2, pos.shape)))
    batch2 = make_batch(names, capacity=CAP, positions=moved)
    nl2 = build(spec, batch2.positions, batch2.cell + 0.0, batch2)
    check_against_brute_force(nl2, batch2, names, positions=moved)
    others = ["wire_thin", "cluster", "tiny_single", "slab_xz"]
    batch3 = make_batch(others, capacity=CAP)
    nl3 = build(spec, batch3.positions, batch3.cell, batch3)
    check_against_brute_force(nl3, batch3, others)
    assert len(traces) == 1


# --------------------------------------------------------------------------- spec checks
def test_spec_validation():
    with pytest.raises(ValueError):
        neighbors.NeighborSpec(cutoff=0.0)
    with pytest.raises(ValueError):
        neighbors.NeighborSpec(cutoff=1.0, skin=-0.1)
    with pytest.raises(ValueError):
        neighbors.NeighborSpec(cutoff=1.0, method="verlet")
    with pytest.raises(ValueError):
        neighbors.NeighborSpec(cutoff=1.0, max_neighbors=0)
    with pytest.raises(ValueError):
        neighbors.NeighborSpec(cutoff=1.0, max_image_shift=-1)
    spec = neighbors.NeighborSpec(cutoff=2.0, skin=0.25)
    assert spec.list_cutoff == 2.25
    assert hash(spec) == hash(neighbors.NeighborSpec(cutoff=2.0, skin=0.25))


def test_shifts_are_int8_and_far_unwrapped_atoms_widen_them(x64, monkeypatch):
    """With int8 storage, shifts are stored in one byte each; an atom unwrapped 127 or
    more cells away makes the list overflow, and growing it switches to int32 shifts that
    give the same pair distances as the wrapped system."""
    monkeypatch.setattr(neighbors, "DEFAULT_SHIFT_DTYPE", "int8")
    batch = make_batch(["cubic"])
    _, nl = neighbors.allocate(batch, cutoff=CUTOFF)
    assert nl.shifts.dtype == jnp.int8 and not bool(nl.overflow)
    far = batch.positions.at[0].add(200.0 * batch.cell[0, 0])     # the same periodic system
    moved = neighbors.build(nl.spec, far, batch.cell, batch)
    assert bool(moved.shift_overflow) and bool(moved.overflow)
    spec = neighbors.grow(moved)
    assert spec.shift_dtype == "int32" and spec.max_neighbors == nl.spec.max_neighbors
    wide = neighbors.build(spec, far, batch.cell, batch)
    assert wide.shifts.dtype == jnp.int32 and not bool(wide.overflow)
    distances = lambda lst, pos: np.sort(np.linalg.norm(np.asarray(
        neighbors.pair_vectors(lst, pos, batch.cell, batch)[0])[np.asarray(lst.mask)], axis=-1))
    np.testing.assert_allclose(distances(wide, far), distances(nl, batch.positions), atol=1e-8)
    # 120 cells away (shifts up to ~121) still fits a byte: no overflow, the same pairs.
    near = batch.positions.at[0].add(120.0 * batch.cell[0, 0])
    kept = neighbors.build(nl.spec, near, batch.cell, batch)
    assert not bool(kept.overflow) and int(np.asarray(kept.max_shift).max()) >= 119
    np.testing.assert_allclose(distances(kept, near), distances(nl, batch.positions), atol=1e-8)


@pytest.mark.parametrize("method", METHODS)
def test_packed_shifts_build_the_int8_table(method, x64):
    """One byte per entry for all three shift components (|n| <= 1): the same pairs,
    shifts, needs and shift bounds as int8 storage, for wide periodic cells, a slab,
    a wire, a tilted unwrapped slab and clusters; the packed table is a third the size."""
    names = ["cubic", "triclinic_big", "slab", "wire_tilted", "cluster", "cluster_boxed", "slab_xz"]
    batch = make_batch(names)
    spec = make_spec(method, max_image_shift=1)
    ref = BUILD(spec, batch.positions, batch.cell, batch)
    packed = BUILD(dataclasses.replace(spec, shift_dtype="packed"), batch.positions, batch.cell, batch)
    assert packed.shifts.dtype == jnp.uint8 and packed.shifts.shape == ref.indices.shape
    assert not bool(packed.overflow) and int(np.asarray(ref.max_shift).max()) == 1
    for field in ("indices", "shift_vectors", "needed", "max_shift"):
        np.testing.assert_array_equal(np.asarray(getattr(packed, field)), np.asarray(getattr(ref, field)),
                                      err_msg=field)
    check_against_brute_force(packed, batch, names)
    d_ref, _ = neighbors.pair_vectors(ref, batch.positions, batch.cell, batch)
    d_packed, _ = neighbors.pair_vectors(packed, batch.positions, batch.cell, batch)
    np.testing.assert_array_equal(np.asarray(d_packed), np.asarray(d_ref))


def test_packed_shifts_overflow_and_widen_to_int8(x64):
    """A shift of 2 cells does not fit packed storage: the list overflows, grow() switches to
    int8 (same capacities), and the wider list is exact; allocate picks packed storage only
    for systems whose images stay within one cell."""
    batch = make_batch(["cubic"])
    spec = dataclasses.replace(make_spec("all_pairs"), shift_dtype="packed")
    assert not bool(BUILD(spec, batch.positions, batch.cell, batch).overflow)
    far = batch.positions.at[0].add(2.0 * batch.cell[0, 0])       # the same periodic system
    moved = BUILD(spec, far, batch.cell, batch)
    assert bool(moved.shift_overflow) and bool(moved.overflow)
    wider = neighbors.grow(moved)
    assert wider.shift_dtype == "int8" and wider.max_neighbors == spec.max_neighbors
    fixed = BUILD(wider, far, batch.cell, batch)
    assert not bool(fixed.overflow)
    check_against_brute_force(fixed, batch, ["cubic"], positions=[np.asarray(far)[:len(structure("cubic")[0])]],
                              cells=[structure("cubic")[1]])


@pytest.mark.parametrize("names, expected", [(["cubic", "slab"], "packed"), (["cubic", "tiny"], "int8")])
def test_allocate_picks_packed_shifts_where_they_fit(names, expected, x64):
    """Packed storage is the default wherever every image is within one cell."""
    spec, nl = neighbors.allocate(make_batch(names), cutoff=CUTOFF, skin=SKIN)
    assert spec.shift_dtype == expected and not bool(nl.overflow)


def test_allocate_trims_the_row_width_to_what_is_needed(x64):
    """Every row is read at every step: allocate keeps 10 % (+4) above the largest row."""
    batch = make_batch(["cubic"])
    spec, nl = neighbors.allocate(batch, cutoff=CUTOFF)
    need = int(nl.needed[0])
    assert spec.max_neighbors == int(np.ceil(1.1 * need)) + 4
    spec2, _ = neighbors.allocate(batch, cutoff=CUTOFF, max_neighbors=need + 40)
    assert spec2.max_neighbors == need + 40                 # an explicit width is kept


def test_unrolled_search_builds_the_same_list(monkeypatch):
    """GPUs use the unrolled binary search (no loop); it must give the CPU's list exactly."""
    batch = make_batch(MIXED)
    spec = make_spec("cell_list")
    plain = neighbors.build(spec, batch.positions, batch.cell, batch)
    monkeypatch.setattr(neighbors, "_search_method", lambda: "scan_unrolled")
    unrolled = neighbors.build(spec, batch.positions, batch.cell, batch)
    for field in ("indices", "shifts", "needed", "max_shift"):
        np.testing.assert_array_equal(np.asarray(getattr(unrolled, field)), np.asarray(getattr(plain, field)))


def test_cells_one_cutoff_wide_scan_two_images_per_axis(x64):
    """A triclinic cell between RC and 2 RC wide needs, per axis, only the nearest image and
    the one beyond it: 8 candidates per atom instead of 27, and still exactly the pairs of
    the brute-force reference."""
    batch = make_batch(["triclinic"])
    n = int(batch.n_atoms[0])
    spec, nl = neighbors.allocate(batch, cutoff=CUTOFF, skin=SKIN, method="all_pairs")
    assert int(nl.needed[1]) == 8 * n and spec.max_candidates == 8 * n
    check_against_brute_force(nl, batch, ["triclinic"])


def test_float_quotient_is_exact_below_two_to_the_21():
    """The all-pairs builds split candidate numbers by a float multiply (no integer
    division): exact for every x < 2**21, checked against integer division over the whole
    range for small, power-of-two-neighbouring and large divisors."""
    x = jnp.arange(2**21, dtype=jnp.int32)
    for d in (1, 2, 3, 5, 7, 27, 100, 107, 255, 256, 257, 1000, 4095, 65535, 2**20, 2**21 - 1):
        inverse = 1.0 / jnp.float32(d)
        got = np.asarray(neighbors._quotient(x, jnp.int32(d), inverse))
        np.testing.assert_array_equal(got, np.arange(2**21) // d, err_msg=f"divisor {d}")


@pytest.mark.parametrize("block_size", [32, 4096])
def test_all_pairs_candidate_overflow_lists_no_copies(block_size):
    """Too few candidate slots (64 atoms, 40 slots): the overflow is flagged, and the
    first 40 candidates are listed once each. Candidate numbers past the capacity (the
    last test block runs past it) must not count: they once listed one pair hundreds of
    times and reported a row width of 44 where 15 were needed."""
    rng = np.random.default_rng(0)
    pos = rng.uniform(0, 8.0, (64, 3))
    batch = Batch.from_arrays([pos], [np.full(64, 18)], cell=[np.eye(3) * 8.0], pbc=[True],
                              min_distance=None)
    spec = neighbors.NeighborSpec(cutoff=3.0, skin=0.5, max_neighbors=200, method="all_pairs",
                                  max_candidates=40, block_size=block_size)
    nl = neighbors.build(spec, batch.positions, batch.cell, batch)
    full = neighbors.build(dataclasses.replace(spec, max_candidates=64 * 27), batch.positions,
                           batch.cell, batch)
    assert bool(nl.overflow) and not bool(full.overflow)
    indices, shifts = np.asarray(nl.indices), np.asarray(nl.shifts)
    for row in range(64):
        listed = [(j, *s) for j, s in zip(indices[row], shifts[row]) if j < 64]
        assert len(listed) == len(set(listed)), f"row {row} lists a pair twice"
        every = {(j, *s) for j, s in zip(np.asarray(full.indices)[row], np.asarray(full.shifts)[row]) if j < 64}
        assert set(listed) <= every, f"row {row} lists a pair the full build does not"
    assert int(nl.needed[0]) <= int(full.needed[0])


def test_all_pairs_integer_division_path_builds_the_same_list():
    """With 2**21 candidate slots or more the build splits candidate numbers by integer
    division (the float quotient is exact only below that): same table as the float path."""
    rng = np.random.default_rng(0)
    pos = [rng.uniform(0, 6.0, (12, 3)), rng.uniform(0, 9.0, (20, 3))]
    batch = Batch.from_arrays(pos, [np.full(len(p), 18) for p in pos], cell=[np.eye(3) * 6.0, np.eye(3) * 9.0],
                              pbc=[True, True], min_distance=None)
    spec = neighbors.NeighborSpec(cutoff=3.0, skin=0.5, max_neighbors=120, method="all_pairs",
                                  max_candidates=2000)
    small = neighbors.build(spec, batch.positions, batch.cell, batch)
    large = neighbors.build(dataclasses.replace(spec, max_candidates=2**21), batch.positions, batch.cell, batch)
    assert not bool(small.overflow) and int(small.needed[1]) > 12   # several images scanned
    for field in ("indices", "shifts"):
        np.testing.assert_array_equal(np.asarray(getattr(large, field)), np.asarray(getattr(small, field)))


ONE_PASS_NEEDS_REBUILD = jax.jit(neighbors.one_pass_needs_rebuild)


def test_one_pass_rebuild_test_agrees_with_the_per_system_test(x64):
    """The one-pass test update runs on large batches (fixed cells: twice the largest
    displacement of a real atom) answers like ``any(needs_rebuild)``, right around the skin,
    with padding atoms moved far away (ignored), stale slots, and changed cells (the
    per-system path)."""
    batch = make_batch(VERLET, capacity=CAP)
    nl = BUILD(make_spec("all_pairs"), batch.positions, batch.cell, batch)
    real = np.asarray(batch.atom_mask)
    rng = np.random.default_rng(3)
    seen = set()
    for trial in range(24):
        move = np.zeros(np.shape(batch.positions))
        atom = rng.choice(np.flatnonzero(real))
        scale = SKIN / 2 * rng.uniform(0.9, 1.1)          # straddles the skin criterion
        move[atom] = scale * rng.normal(size=3) / np.sqrt(3)
        move[~real] = 50.0                                 # padding rows: never count
        positions = jnp.asarray(np.asarray(batch.positions) + move, batch.dtype)
        cell = batch.cell
        if trial % 4 == 3:                                 # a strained cell: per-system path
            cell = cell.at[0].multiply(1.0 + rng.uniform(0.0, 0.1))
        listed = nl
        if trial % 6 == 5:
            listed = neighbors.mark_stale(nl, jnp.arange(batch.num_systems) == 2)
        want = bool(np.asarray(NEEDS_REBUILD(listed, positions, cell, batch)).any())
        assert bool(ONE_PASS_NEEDS_REBUILD(listed, positions, cell, batch)) == want, trial
        seen.add(want)
    assert seen == {True, False}
