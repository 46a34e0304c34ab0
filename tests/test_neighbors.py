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


def make_spec(method, *, all_pairs_capacity=1024, max_atoms_per_bin=64, max_image_shift=3,
              **kwargs):
    """A hand-made spec with generous capacities for both methods."""
    kwargs.setdefault("cutoff", CUTOFF)
    kwargs.setdefault("skin", SKIN)
    kwargs.setdefault("max_neighbors", 96)
    return neighbors.NeighborSpec(method=method, max_atoms_per_bin=max_atoms_per_bin,
                                  max_image_shift=max_image_shift,
                                  **{AP_CAPACITY: all_pairs_capacity}, **kwargs)


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
    "cluster": lambda: _system(np.zeros((3, 3)), (F, F, F), (4, 4, 4), (8.0, 8.0, 8.0), seed=10),
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
}
BIG = ["cubic", "cubic_large", "triclinic_big", "unwrapped_big", "slab", "slab_tilted", "slab_xz",
       "wire", "wire_tilted", "cluster", "cluster_boxed"]
THIN = ["triclinic", "small", "tiny", "tiny_single", "tiny_unwrapped", "slab_thin", "wire_thin"]
MIXED = ["cubic", "tiny", "slab", "cluster", "triclinic", "wire_thin", "unwrapped_big",
         "tiny_single", "slab_tilted", "small", "wire", "tiny_unwrapped", "slab_xz", "slab_thin",
         "wire_tilted", "cluster_boxed"]


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
def table_pairs(nl, batch):
    """Per filled system, the list (not set: duplicates must show) of ``(i, j, shift)``
    tuples with local indices; checks the layout on the way."""
    indices = np.asarray(nl.indices)
    shifts = np.asarray(nl.shifts)
    n_atoms = batch.num_atoms
    system_index = np.asarray(batch.system_index)
    atom_mask = np.asarray(batch.atom_mask)
    pbc = np.asarray(batch.pbc)
    assert indices.shape == (n_atoms, nl.spec.max_neighbors)
    assert shifts.shape == (n_atoms, nl.spec.max_neighbors, 3)
    assert indices.min() >= 0 and indices.max() <= n_atoms, "indices outside [0, N]"
    mask = indices < n_atoms
    np.testing.assert_array_equal(np.asarray(nl.mask), mask)
    # padding atoms have empty rows; padded entries carry zero shifts
    assert not mask[~atom_mask].any(), "a padding atom has neighbors"
    assert not shifts[~mask].any(), "padding entries must have zero shifts"
    rows, cols = np.nonzero(mask)
    j = indices[rows, cols]
    assert atom_mask[j].all(), "a padding atom is listed as a neighbor"
    cross = system_index[rows] != system_index[j]
    assert not cross.any(), f"pairs across systems: {list(zip(rows[cross], j[cross]))[:5]}"
    # real entries: compact (no holes before the padding) and no shift along open axes
    assert (np.diff(mask.astype(int), axis=1) <= 0).all(), "holes inside a row"
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
    assert not bool(nl.overflow), f"unexpected overflow, needed {nl.needed}"
    per_system = table_pairs(nl, batch)
    assert len(per_system) == len(names)
    for k, (name, got) in enumerate(zip(names, per_system)):
        pos, cell, pbc = structure(name)
        if positions is not None:
            pos = positions[k]
        if cells is not None:
            cell = cells[k]
        if positions is None and cells is None and cutoff == RC:
            ref = reference(name)
        else:
            ref = brute_force_pairs(pos, cell, pbc, cutoff, return_distances=True)
        assert_same_pairs(got, ref, pos, cell, cutoff, f"{name} ({nl.spec.method})")


def within_cutoff_pairs(nl, batch, positions, cell, cutoff):
    """Listed pairs whose current distance (from ``pair_vectors``) is below ``cutoff``."""
    d, mask = neighbors.pair_vectors(nl, positions, cell, batch)
    dist = np.linalg.norm(np.asarray(d, np.float64), axis=-1)
    keep = np.asarray(mask) & (dist < cutoff)
    filtered = nl.replace(indices=jnp.where(jnp.asarray(keep), nl.indices, batch.num_atoms),
                          shifts=jnp.where(jnp.asarray(keep)[..., None], nl.shifts, 0))
    # re-compact the rows so that table_pairs' layout checks still hold
    order = jnp.argsort(~jnp.asarray(keep), axis=1, stable=True)
    filtered = filtered.replace(indices=jnp.take_along_axis(filtered.indices, order, 1),
                                shifts=jnp.take_along_axis(filtered.shifts, order[..., None], 1))
    return table_pairs(filtered, batch)


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
    mol = molecule("C6H6")
    out["benzene"] = mol                                                   # zero cell, no pbc
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


def test_reference_excludes_self_and_open_shifts():
    pos, cell, pbc = structure("wire_thin")
    ref = brute_force_pairs(pos, cell, pbc, RC)
    assert all(not (i == j and not any(n)) for i, j, n in ref)
    assert all(n[1] == 0 and n[2] == 0 for _, _, n in ref)
    assert any(abs(n[0]) >= 2 for _, _, n in ref)            # thin wire: several images
    # every pair appears in both directions with the opposite shift
    assert {(j, i, tuple(-x for x in n)) for i, j, n in ref} == ref


# --------------------------------------------------------------------------- correctness
@pytest.mark.parametrize("method", METHODS)
def test_mixed_batch_allocate_and_build(method, precision):
    """One padded batch mixing every kind of system (different sizes, two empty slots,
    padding atoms), via ``allocate`` and via a direct ``build`` with a hand-made spec."""
    n = sum(len(structure(k)[0]) for k in MIXED)
    batch = make_batch(MIXED, capacity=Capacity(num_systems=len(MIXED) + 2, num_atoms=n + 21))
    assert batch.positions.dtype == (np.float64 if precision == "float64" else np.float32)
    spec, nl = neighbors.allocate(batch, CUTOFF, SKIN, method=method)
    assert spec.method == method
    assert scanned_images(nl, batch) >= 2       # thin cells need images
    check_against_brute_force(nl, batch, MIXED)
    # the spec is hashable and drives a direct build to the same table
    again = jax.jit(neighbors.build, static_argnums=0)(spec, batch.positions, batch.cell, batch)
    np.testing.assert_array_equal(np.asarray(again.indices), np.asarray(nl.indices))
    np.testing.assert_array_equal(np.asarray(again.shifts), np.asarray(nl.shifts))
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
    spec = make_spec(method, max_neighbors=80, block_size=40)
    build = jax.jit(neighbors.build, static_argnums=0)
    capacity = Capacity(num_systems=2, num_atoms=224)
    for name in STRUCTURES:
        batch = make_batch([name], capacity=capacity)
        nl = build(spec, batch.positions, batch.cell, batch)
        check_against_brute_force(nl, batch, [name])
    assert build._cache_size() == 1


@pytest.mark.parametrize("method", METHODS)
def test_list_follows_positions_it_was_built_from(method, x64):
    """Shifts refer to the (unwrapped) positions given: the same atoms translated by whole
    lattice vectors give shifts that compensate, and the same distances."""
    names = ["tiny_unwrapped", "slab_tilted"]
    batch = make_batch(names)
    spec, nl = neighbors.allocate(batch, CUTOFF, SKIN, method=method)
    rng = np.random.default_rng(3)
    moved = []
    for name in names:
        pos, cell, pbc = structure(name)
        moved.append(pos + (rng.integers(-5, 6, (len(pos), 3)) * pbc) @ cell)
    batch2 = make_batch(names, positions=moved)
    nl2 = jax.jit(neighbors.build, static_argnums=0)(spec, batch2.positions, batch2.cell, batch2)
    check_against_brute_force(nl2, batch2, names, positions=moved)
    d1, m1 = neighbors.pair_vectors(nl, batch.positions, batch.cell, batch)
    d2, m2 = neighbors.pair_vectors(nl2, batch2.positions, batch2.cell, batch2)
    r1 = np.sort(np.linalg.norm(np.asarray(d1), axis=-1)[np.asarray(m1)])
    r2 = np.sort(np.linalg.norm(np.asarray(d2), axis=-1)[np.asarray(m2)])
    np.testing.assert_allclose(r1, r2, atol=1e-9)


def test_from_atoms_matches_ase(x64):
    """ASE structures through ``Batch.from_atoms`` (its close-atom check runs the
    neighbor list too) against ``ase.neighborlist.neighbor_list`` directly."""
    structures = _ase_structures()
    names = list(structures)
    atoms_list = [structures[k] for k in names]
    batch = Batch.from_atoms(atoms_list)
    for method in METHODS:
        spec, nl = neighbors.allocate(batch, CUTOFF, SKIN, method=method)
        assert not bool(nl.overflow)
        for name, atoms, got in zip(names, atoms_list, table_pairs(nl, batch)):
            ref = {p: pair_distance(atoms.positions, atoms.cell, p) for p in _ase_pairs(atoms, RC)}
            assert_same_pairs(got, ref, atoms.positions, np.asarray(atoms.cell), RC,
                              f"{name} ({method})")


# --------------------------------------------------------------------------- Verlet skin
VERLET = ["cubic", "slab_tilted", "tiny", "wire"]


@pytest.mark.parametrize("method", METHODS)
def test_verlet_skin(method, precision):
    names = VERLET
    batch = make_batch(names, capacity=Capacity(num_systems=len(names) + 1, num_atoms=192))
    spec, nl = neighbors.allocate(batch, CUTOFF, SKIN, method=method)
    update = jax.jit(neighbors.update)
    slices = batch.system_slices()
    base = [structure(k)[0] for k in names]
    cells = [structure(k)[1] for k in names]
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

    def host(per_system):        # what the device sees, for the reference
        return [_f32(p) if batch.dtype == np.float32 else np.asarray(p) for p in per_system]

    # 1. every atom moves by 0.45 skin/2 in a random direction: the list is kept, and the
    #    pairs within the cutoff are still all there
    rng = np.random.default_rng(0)
    small = []
    for p in base:
        v = rng.normal(size=p.shape)
        small.append(p + 0.45 * SKIN / 2 * v / np.linalg.norm(v, axis=1, keepdims=True))
    small = host(small)
    pos1 = with_positions(small)
    nl1 = update(nl, pos1, batch.cell, batch)
    np.testing.assert_array_equal(np.asarray(nl1.rebuilds), 0)
    np.testing.assert_array_equal(np.asarray(nl1.indices), np.asarray(nl.indices))
    assert not np.asarray(neighbors.needs_rebuild(nl, pos1, batch.cell, batch)).any()
    got = within_cutoff_pairs(nl1, batch, pos1, batch.cell, CUTOFF)
    for name, g, p, c in zip(names, got, small, cells):
        ref = brute_force_pairs(p, c, structure(name)[2], CUTOFF, return_distances=True)
        assert_same_pairs(g, ref, p, c, CUTOFF, f"{name} after small moves")

    # 2. one atom of system 1 jumps by 1.2 Å: only system 1 is rebuilt, and it is exact
    big = list(small)
    big[1] = small[1].copy()
    big[1][3] += np.array([0.0, 1.2, 0.0])
    big = host(big)
    pos2 = with_positions(big)
    nl2 = update(nl1, pos2, batch.cell, batch)
    np.testing.assert_array_equal(np.asarray(nl2.rebuilds), [0, 1, 0, 0, 0])
    per_system = table_pairs(nl2, batch)
    ref1 = brute_force_pairs(big[1], cells[1], structure(names[1])[2], RC, return_distances=True)
    assert_same_pairs(per_system[1], ref1, big[1], cells[1], RC, "rebuilt system")
    for s in (0, 2, 3):        # untouched rows
        sl = slices[s]
        np.testing.assert_array_equal(np.asarray(nl2.indices)[sl], np.asarray(nl1.indices)[sl])
        np.testing.assert_array_equal(np.asarray(nl2.reference_positions)[sl],
                                      np.asarray(nl1.reference_positions)[sl])
    np.testing.assert_array_equal(np.asarray(nl2.reference_positions)[slices[1]],
                                  np.asarray(pos2)[slices[1]])

    # 3. mark_stale forces a rebuild of the marked system only, then clears
    stale = neighbors.mark_stale(nl2, jnp.array([False, False, True, False, False]))
    nl3 = update(stale, pos2, batch.cell, batch)
    np.testing.assert_array_equal(np.asarray(nl3.rebuilds), [0, 1, 1, 0, 0])
    assert not np.asarray(nl3.stale).any()
    nl3b = update(nl3, pos2, batch.cell, batch)
    np.testing.assert_array_equal(np.asarray(nl3b.rebuilds), [0, 1, 1, 0, 0])

    # 4. cell changes: system 0 strained by 4 % (well past the skin criterion) is rebuilt;
    #    a 1e-3 Å change of system 3's cell is not
    new_cells = list(cells)
    new_cells[0] = _f32(cells[0] @ np.diag([1.04, 0.98, 1.0]))
    new_cells[3] = _f32(cells[3] + np.array([[1e-3, 0, 0], [0, 0, 0], [0, 0, 0]]))
    cell4 = with_cells(new_cells)
    nl4 = update(nl3, pos2, cell4, batch)
    np.testing.assert_array_equal(np.asarray(nl4.rebuilds), [1, 1, 1, 0, 0])
    np.testing.assert_array_equal(np.asarray(nl4.reference_cell)[0], np.asarray(cell4)[0])
    got = within_cutoff_pairs(nl4, batch, pos2, cell4, CUTOFF)
    for name, g, p, c in zip(names, got, big, new_cells):
        ref = brute_force_pairs(p, c, structure(name)[2], CUTOFF, return_distances=True)
        assert_same_pairs(g, ref, p, c, CUTOFF, f"{name} after the cell change")
    assert not bool(nl4.overflow)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", ["uniaxial", "no_image_listed_yet"])
def test_verlet_cell_change_brings_in_new_images(method, case, x64):
    """The skin test must also catch pairs that were NOT listed. One atom at the origin
    (it stays put when positions are scaled with the cell, as in NPT) in a periodic cell:

    * uniaxial: a = 2.6 Å, cutoff 4 + skin 1: images +-a are listed (max_shift = 1),
      +-2a (5.2 Å) are not. Compressing a to 1.9 Å (0.7 Å < skin) brings +-2a to 3.8 Å,
      inside the cutoff, yet ``drift = 1 * 0.7 < skin`` keeps the list.
    * no_image_listed_yet: a 12 Å cube has no pair at all (max_shift = 0), so no cell
      change ever counts; shrinking it to 3.5 Å puts 6 images at 3.5 Å.
    """
    cutoff, skin = 4.0, 1.0
    if case == "uniaxial":
        cell, new_cell = np.diag([2.6, 10.0, 10.0]), np.diag([1.9, 10.0, 10.0])
    else:
        cell, new_cell = np.eye(3) * 12.0, np.eye(3) * 3.5
    batch = Batch.from_arrays([np.zeros((1, 3))], [[18]], cell=[cell], pbc=[True],
                              min_distance=None)
    spec = make_spec(method, cutoff=cutoff, skin=skin, max_neighbors=32, max_image_shift=4)
    nl = neighbors.build(spec, batch.positions, batch.cell, batch)
    assert not bool(nl.overflow)
    new = jnp.asarray(new_cell[None])
    nl2 = neighbors.update(nl, batch.positions, new, batch)
    got = within_cutoff_pairs(nl2, batch, batch.positions, new, cutoff)[0]
    ref = brute_force_pairs(np.zeros((1, 3)), new_cell, [True] * 3, cutoff, return_distances=True)
    assert_same_pairs(got, ref, np.zeros((1, 3)), new_cell, cutoff,
                      f"after the cell change (rebuilds {np.asarray(nl2.rebuilds)}, "
                      f"max_shift {np.asarray(nl.max_shift)})")


# --------------------------------------------------------------------------- overflow
OVERFLOW = ["tiny", "cubic", "slab"]


def _overflow_specs(method, base, batch):
    """(capacity name, spec with only that capacity too small) for ``OVERFLOW``."""
    r = dataclasses.replace
    yield "max_neighbors", r(base, max_neighbors=5)
    if method == "all_pairs":
        yield AP_CAPACITY, r(base, **{AP_CAPACITY: 10}, block_size=4)
        if AP_CAPACITY == "max_candidates":
            # enough for every atom of the largest system, not for the thin cell's images
            yield AP_CAPACITY, r(base, max_candidates=int(np.max(np.asarray(batch.n_atoms))))
        else:
            yield "max_image_shift", r(base, max_image_shift=0)
    else:
        yield "max_atoms_per_bin", r(base, max_atoms_per_bin=2)
        yield "max_image_shift", r(base, max_image_shift=1)


@pytest.mark.parametrize("method", METHODS)
def test_overflow_is_reported_and_grow_fixes_it(method, x64):
    batch = make_batch(OVERFLOW)
    good, nl = neighbors.allocate(batch, CUTOFF, SKIN, method=method)
    check_against_brute_force(nl, batch, OVERFLOW)
    build = jax.jit(neighbors.build, static_argnums=0)
    for what, spec in _overflow_specs(method, good, batch):
        small = build(spec, batch.positions, batch.cell, batch)
        assert bool(small.overflow), f"{what} too small but no overflow (needed {small.needed})"
        grown = neighbors.grow(small)
        assert getattr(grown, what) > getattr(spec, what), what
        nl2 = build(grown, batch.positions, batch.cell, batch)
        assert not bool(nl2.overflow), f"{what}: still overflows after grow: {grown}, {nl2.needed}"
        check_against_brute_force(nl2, batch, OVERFLOW)
    # every capacity too small at once: grow (a few rounds, as allocate does) converges
    spec = dataclasses.replace(good, max_neighbors=2, max_atoms_per_bin=1, block_size=2,
                               max_image_shift=0, **{AP_CAPACITY: 3})
    for _ in range(4):
        nl3 = build(spec, batch.positions, batch.cell, batch)
        if not bool(nl3.overflow):
            break
        spec = neighbors.grow(nl3)
    assert not bool(nl3.overflow), spec
    check_against_brute_force(nl3, batch, OVERFLOW)


@pytest.mark.parametrize("method", METHODS)
def test_overflow_seen_during_update_is_kept(method, x64):
    """A rebuild inside ``update`` that needs more than the spec sets ``overflow``."""
    batch = make_batch(["cubic"])
    spec, nl = neighbors.allocate(batch, CUTOFF, SKIN, method=method)
    assert not bool(nl.overflow)
    squeezed = batch.positions * 0.8          # denser: more neighbors than K
    nl2 = neighbors.update(nl, squeezed, batch.cell * 0.8, batch)
    np.testing.assert_array_equal(np.asarray(nl2.rebuilds), [1])
    assert bool(nl2.overflow)
    grown = neighbors.grow(nl2)
    assert grown.max_neighbors > spec.max_neighbors
    nl3 = neighbors.build(grown, squeezed, batch.cell * 0.8, batch)
    assert not bool(nl3.overflow)
    pos, cell, pbc = structure("cubic")
    check_against_brute_force(nl3, batch, ["cubic"], positions=[pos * 0.8], cells=[cell * 0.8])


# --------------------------------------------------------------------------- jit
@pytest.mark.parametrize("method", METHODS)
def test_build_traces_once(method, precision):
    names = ["cubic", "tiny", "slab"]
    capacity = Capacity(num_systems=3, num_atoms=128)
    batch = make_batch(names, capacity=capacity)
    spec, _ = neighbors.allocate(batch, CUTOFF, SKIN, method=method)
    traces = []

    def counted(spec, positions, cell, batch):
        traces.append(spec)
        return neighbors.build(spec, positions, cell, batch)

    build = jax.jit(counted, static_argnums=0)
    nl = build(spec, batch.positions, batch.cell, batch)
    check_against_brute_force(nl, batch, names)
    rng = np.random.default_rng(1)
    moved = [_f32(structure(k)[0] + rng.uniform(-0.2, 0.2, structure(k)[0].shape)) for k in names]
    batch2 = make_batch(names, capacity=capacity, positions=moved)
    nl2 = build(spec, batch2.positions, batch2.cell * 1.0, batch2)
    check_against_brute_force(nl2, batch2, names, positions=moved)
    # other systems of the same capacity (new pbc, cells, sizes) reuse the program too
    others = ["wire_thin", "cluster", "tiny_single"]
    batch3 = make_batch(others, capacity=capacity)
    nl3 = build(spec, batch3.positions, batch3.cell, batch3)
    assert len(traces) == 1
    if not bool(nl3.overflow):
        check_against_brute_force(nl3, batch3, others)


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
