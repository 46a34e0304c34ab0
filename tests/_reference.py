"""Brute-force neighbor pairs in plain numpy: the independent reference for the
neighbor-list tests.

For one system it tries every ordered atom pair ``(i, j)`` against every integer
lattice shift ``n`` in a box that is provably large enough, and keeps those with
``|positions[j] - positions[i] + n @ cell| < cutoff`` (the pair of an atom with
itself at zero shift excluded). Nothing here shares code with
``nvalchemi_jax.neighbors``: the shift range comes from the perpendicular widths
of the periodic lattice vectors through a pseudo-inverse, so open axes may have
zero or arbitrary cell rows.

Why the range is enough: on the periodic axes ``P`` (rows of ``cell`` with
``pbc`` True) let ``B = pinv(P)`` (3 x m), so ``P @ B = I``. For any vector ``v``,
``|(v @ B)_k| <= |v| |B[:, k]| = |v| / w_k`` with ``w_k = 1 / |B[:, k]|`` the
perpendicular width of axis ``k`` inside the periodic subspace. With
``d = r_j - r_i + n @ P``, ``(d @ B)_k = f_jk - f_ik + n_k`` where ``f = r @ B``,
hence ``|d| < cutoff`` implies ``|n_k| < cutoff / w_k + |f_jk - f_ik|``. The box
``|n_k| <= ceil(cutoff / w_k + span_k)`` (span = max - min of ``f_k`` over the
system, which covers unwrapped positions) therefore holds every such shift.
"""

from __future__ import annotations

import itertools

import numpy as np


def shift_range(positions, cell, pbc, cutoff) -> np.ndarray:
    """``(3,) int``: the largest ``|n_k|`` that can give a pair within ``cutoff``
    (0 on open axes)."""
    positions = np.asarray(positions, np.float64).reshape(-1, 3)
    cell = np.asarray(cell, np.float64).reshape(3, 3)
    pbc = np.asarray(pbc, bool).reshape(3)
    out = np.zeros(3, int)
    axes = np.flatnonzero(pbc)
    if axes.size == 0:
        return out
    periodic = cell[axes]                       # (m, 3)
    dual = np.linalg.pinv(periodic)             # (3, m), periodic @ dual = I
    assert np.allclose(periodic @ dual, np.eye(len(axes)), atol=1e-8), "singular periodic cell"
    widths = 1.0 / np.linalg.norm(dual, axis=0)
    frac = positions @ dual
    span = frac.max(axis=0) - frac.min(axis=0) if len(frac) else np.zeros(len(axes))
    out[axes] = np.ceil(cutoff / widths + span).astype(int)
    return out


def brute_force_pairs(positions, cell, pbc, cutoff, return_distances: bool = False):
    """The set of ``(i, j, (n0, n1, n2))`` with ``|d_ij| < cutoff``, ``i`` and ``j``
    local indices, ``n`` integer shifts (0 on open axes), ``(i, i, (0, 0, 0))`` left out.

    With ``return_distances`` a dict ``{pair: |d|}`` is returned instead.
    """
    positions = np.asarray(positions, np.float64).reshape(-1, 3)
    cell = np.asarray(cell, np.float64).reshape(3, 3)
    n_max = shift_range(positions, cell, pbc, cutoff)
    delta = positions[None, :, :] - positions[:, None, :]           # [i, j] = r_j - r_i
    n_atoms = len(positions)
    eye = np.eye(n_atoms, dtype=bool)
    found = {}
    for shift in itertools.product(*(range(-m, m + 1) for m in n_max)):
        d = delta + np.asarray(shift, np.float64) @ cell
        dist = np.sqrt(np.einsum("ijk,ijk->ij", d, d))
        keep = dist < cutoff
        if not any(shift):
            keep &= ~eye
        for i, j in zip(*np.nonzero(keep)):
            found[(int(i), int(j), tuple(int(s) for s in shift))] = float(dist[i, j])
    return found if return_distances else set(found)


def pair_distance(positions, cell, pair) -> float:
    """``|d|`` of one ``(i, j, shift)`` tuple, in float64."""
    positions = np.asarray(positions, np.float64).reshape(-1, 3)
    i, j, shift = pair
    d = positions[j] - positions[i] + np.asarray(shift, np.float64) @ np.asarray(cell, np.float64)
    return float(np.linalg.norm(d))


# --------------------------------------------------------------------------- structures
def jittered_fractional(counts, rng, jitter=0.25):
    """Fractional coordinates on a jittered ``counts`` grid in ``[0, 1)^3``; images of the
    grid are the grid, so periodic systems keep a minimum separation too."""
    counts = np.asarray(counts, int)
    grid = np.stack(np.meshgrid(*(np.arange(c) for c in counts), indexing="ij"), -1).reshape(-1, 3)
    return (grid + 0.5 + rng.uniform(-jitter, jitter, grid.shape)) / counts
