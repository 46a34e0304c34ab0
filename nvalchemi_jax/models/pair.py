"""Shared machinery of pair potentials: per-species parameter tables and the pair sum."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nvalchemi_jax.batch import Batch
from nvalchemi_jax.neighbors import NeighborList, pair_vectors
from nvalchemi_jax._elements import MAX_ATOMIC_NUMBER


def species_table(species: Sequence[int] | None) -> np.ndarray | None:
    """``(119,) int32`` map from atomic number to a row of the parameter tables (-1 = absent)."""
    if species is None:
        return None
    table = np.full(MAX_ATOMIC_NUMBER + 1, -1, np.int32)
    for row, z in enumerate(species):
        table[int(z)] = row
    return table


def check_parameters(name: str, species: Sequence[int] | None, **tables) -> None:
    """Host-side shape check: scalars, or ``(P, P)`` symmetric tables with ``P = len(species)``.

    Skipped when a value is not a concrete number (JAX rebuilds models from traced
    or placeholder leaves when it flattens and unflattens pytrees)."""
    if species is not None:
        bad = [int(z) for z in species if not 1 <= int(z) <= MAX_ATOMIC_NUMBER]
        if bad:
            raise ValueError(f"{name}.species has atomic numbers outside 1..{MAX_ATOMIC_NUMBER}: {bad}")
        if len(set(int(z) for z in species)) != len(species):
            raise ValueError(f"{name}.species repeats an atomic number: {tuple(species)}")
    if not all(_concrete(v) for v in tables.values()):
        return
    for field, value in tables.items():
        arr = np.asarray(value, dtype=float)
        if arr.ndim == 0:
            continue
        if species is None:
            raise ValueError(f"{name}.{field} is a table {arr.shape} but no 'species' were given")
        p = len(species)
        if arr.shape != (p, p):
            raise ValueError(f"{name}.{field} has shape {arr.shape}, expected ({p}, {p}) "
                             f"for species {tuple(species)}")
        if not np.allclose(arr, arr.T):
            raise ValueError(f"{name}.{field} must be symmetric")


def _concrete(value) -> bool:
    if isinstance(value, jax.core.Tracer):
        return False
    return isinstance(value, (int, float, np.ndarray, np.number, list, tuple, jax.Array))


def check_species(name: str, species: Sequence[int] | None, batch: Batch) -> None:
    """Host-side: every atomic number in ``batch`` has parameters."""
    if species is None:
        return
    z = np.asarray(batch.atomic_numbers)[np.asarray(batch.atom_mask)]
    missing = sorted(set(np.unique(z).tolist()) - {int(s) for s in species})
    if missing:
        raise ValueError(f"{name} has no parameters for atomic numbers {missing} "
                         f"(species {tuple(species)})")


def pair_parameter(value, rows_i, rows_j):
    """Scalar parameters broadcast; tables are gathered per pair (NaN for missing species)."""
    value = jnp.asarray(value)
    if value.ndim == 0:
        return value
    ok = (rows_i >= 0) & (rows_j >= 0)
    return jnp.where(ok, value[jnp.maximum(rows_i, 0), jnp.maximum(rows_j, 0)], jnp.nan)


def pair_energy(pair_fn: Callable, cutoff: float, species: np.ndarray | None,
                positions: jax.Array, cell: jax.Array, batch: Batch,
                neighbors: NeighborList) -> jax.Array:
    """Per-system energy ``(S,)`` = ½ Σ_i Σ_j φ(r_ij²) over listed pairs within ``cutoff``.

    ``pair_fn(r2, rows_i, rows_j)`` gets squared distances ``(N, K)`` (always
    positive and finite; masked pairs are zeroed afterwards) and the species
    rows of both atoms (``None`` when the model has a single species).
    """
    d, mask = pair_vectors(neighbors, positions, cell, batch)
    r2 = jnp.sum(d * d, axis=-1)
    within = mask & (r2 < cutoff * cutoff)
    r2 = jnp.where(within, r2, cutoff * cutoff)
    rows_i = rows_j = None
    if species is not None:
        rows = jnp.asarray(species)[batch.atomic_numbers]
        rows_i = rows[:, None]
        rows_j = rows[jnp.where(mask, neighbors.indices, 0)]
    phi = jnp.where(within, pair_fn(r2, rows_i, rows_j), 0.0)
    per_atom = 0.5 * jnp.sum(phi, axis=1)
    return jax.ops.segment_sum(per_atom, batch.system_index, num_segments=batch.num_systems)


def smooth_cutoff(r2, cutoff: float, onset: float):
    """C¹ switch from 1 (r ≤ onset) to 0 (r ≥ cutoff) in r², the form ASE's smooth LJ uses."""
    rc2, ro2 = cutoff * cutoff, onset * onset
    inner = (rc2 - r2) ** 2 * (rc2 + 2.0 * r2 - 3.0 * ro2) / (rc2 - ro2) ** 3
    return jnp.where(r2 < ro2, 1.0, jnp.where(r2 < rc2, inner, 0.0))
