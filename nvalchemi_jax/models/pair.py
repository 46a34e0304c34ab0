"""Shared machinery of pair potentials: per-species parameter tables, the pair sum, and
its analytic forces and virial (a gather-only pass over the full neighbor list)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nvalchemi_jax.batch import Batch
from nvalchemi_jax.models.base import Composable, ModelOutput, volume
from nvalchemi_jax.neighbors import NeighborList, pair_components
from nvalchemi_jax._elements import MAX_ATOMIC_NUMBER
from nvalchemi_jax import _pallas, segments
from nvalchemi_jax.models import pair_kernel


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
    value = symmetric(value)
    if value.ndim == 0:
        return value
    ok = (rows_i >= 0) & (rows_j >= 0)
    return jnp.where(ok, value[jnp.maximum(rows_i, 0), jnp.maximum(rows_j, 0)], jnp.nan)


def symmetric(value):
    """A ``(P, P)`` table symmetrised explicitly (its values do not change: tables are
    symmetric): the closed-form force on i reads only table[i, j], and without this the
    gradient of a force-based loss would land on one triangle. Scalars pass through."""
    value = jnp.asarray(value)
    return value if value.ndim == 0 else 0.5 * (value + value.T)


def _per_pair(params: dict, rows_i, rows_j) -> dict:
    return {name: pair_parameter(value, rows_i, rows_j) for name, value in params.items()}


def _pair_terms(term, params, cutoff, species, positions, cell, batch, neighbors,
                derivative: bool):
    """Pair vector components ``d = (dx, dy, dz)``, φ ``(N, K)`` and, if asked,
    dφ/d(r²) ``(N, K)``; pairs that are padding or beyond ``cutoff`` hold zeros."""
    d, mask = pair_components(neighbors, positions, cell, batch)
    r2 = d[0] * d[0] + d[1] * d[1] + d[2] * d[2]
    within = mask & (r2 < cutoff * cutoff)
    r2 = jnp.where(within, r2, cutoff * cutoff)
    rows_i = rows_j = None
    if species is not None:
        rows = jnp.asarray(species)[batch.atomic_numbers]
        rows_i = rows[:, None]
        rows_j = rows[jnp.where(mask, neighbors.indices, 0)]
    p = _per_pair(params, rows_i, rows_j)
    fn = lambda x: term(x, p)
    if not derivative:
        return d, jnp.where(within, fn(r2), 0.0), None
    # φ is elementwise in r², so one forward-mode pass gives every pair's derivative.
    phi, dphi = jax.jvp(fn, (r2,), (jnp.ones_like(r2),))
    return d, jnp.where(within, phi, 0.0), jnp.where(within, dphi, 0.0)


def pair_energy(term: Callable, params: dict, cutoff: float, species: np.ndarray | None,
                positions: jax.Array, cell: jax.Array, batch: Batch,
                neighbors: NeighborList) -> jax.Array:
    """Per-system energy ``(S,)`` = ½ Σ_i Σ_j φ(r_ij²) over listed pairs within ``cutoff``.

    ``term(r2, p)`` gets squared distances ``(N, K)`` (always positive and finite;
    masked pairs are zeroed afterwards) and ``p``, the per-pair values of ``params``
    (scalars stay scalars; ``(P, P)`` tables are gathered by the species of both atoms).
    """
    _, phi, _ = _pair_terms(term, params, cutoff, species, positions, cell, batch, neighbors,
                            False)
    per_atom = 0.5 * jnp.sum(phi, axis=1)
    return segments.segment_sum(per_atom, batch.system_index, batch.num_systems)


def pair_sums(term: Callable, params: dict, cutoff: float, species: np.ndarray | None,
              positions: jax.Array, cell: jax.Array, batch: Batch, neighbors: NeighborList,
              stress: bool = False) -> list[jax.Array]:
    """Per-atom row sums ``[½Σφ, 2Σφ'dx, 2Σφ'dy, 2Σφ'dz]`` (+ ``Σφ' d_a d_b`` for xx, xy,
    xz, yy, yz, zz with ``stress``), each ``(N,)``, by XLA (see :func:`pair_compute`)."""
    d, phi, dphi = _pair_terms(term, params, cutoff, species, positions, cell, batch,
                               neighbors, True)
    terms = [0.5 * phi] + [2.0 * dphi * d[a] for a in range(3)]
    if stress:
        terms += [dphi * d[a] * d[b] for a, b in _VIRIAL]
    return _row_sums(terms)


_VIRIAL = [(a, b) for a in range(3) for b in range(a, 3)]


def _fused_sums(term, params, cutoff, species, positions, cell, batch, neighbors, stress):
    """:func:`pair_sums` by the fused GPU kernel; derivatives through the XLA form."""
    rows = None if species is None else jnp.asarray(species)[batch.atomic_numbers]
    num_species = 1 if species is None else int(np.max(species)) + 1

    @jax.custom_jvp
    def sums(positions, cell, params):
        tables = {name: symmetric(value) for name, value in params.items()}
        return pair_kernel.pair_sums(term, cutoff, tables, rows, num_species, positions, cell,
                                     batch, neighbors, stress)

    @sums.defjvp
    def _(primals, tangents):
        return jax.jvp(lambda x, c, p: pair_sums(term, p, cutoff, species, x, c, batch,
                                                 neighbors, stress), primals, tangents)

    return sums(positions, cell, params)


def pair_compute(term: Callable, params: dict, cutoff: float, species: np.ndarray | None,
                 positions: jax.Array, cell: jax.Array, batch: Batch, neighbors: NeighborList,
                 forces: bool = True, stress: bool = False) -> ModelOutput:
    """Energies, forces and stress of a pair potential in closed form.

    On a full (symmetric) list each pair appears as (i, j) and (j, i), so with
    ``d_ij = r_j - r_i`` and ``φ' = dφ/d(r²)``::

        F_i = 2 Σ_j φ'(r_ij²) d_ij        (a sum over row i: gathers only, no scatter)
        dE/dε = Σ_i Σ_j φ'(r_ij²) d_ij ⊗ d_ij

    the same quantities :func:`~nvalchemi_jax.models.base.compute` gets by autodiff,
    without its scatter-add of pair gradients. On GPUs the row sums come from one fused
    kernel (:mod:`~nvalchemi_jax.models.pair_kernel`).
    """
    n_sys = batch.num_systems
    if _pallas.wanted(positions.shape[0]):
        sums = _fused_sums(term, params, cutoff, species, positions, cell, batch, neighbors,
                           stress)
    else:
        sums = pair_sums(term, params, cutoff, species, positions, cell, batch, neighbors,
                         stress)
    energy = segments.segment_sum(sums[0], batch.system_index, n_sys)
    out_forces = jnp.stack(sums[1:4], axis=-1) if forces else None
    out_stress = None
    if stress:
        w = dict(zip(_VIRIAL, sums[4:]))
        per_atom = jnp.stack([jnp.stack([w[min(a, b), max(a, b)] for b in range(3)], axis=-1)
                              for a in range(3)], axis=-2)
        virial = segments.segment_sum(per_atom, batch.system_index, n_sys)
        vol = volume(cell)
        safe = jnp.where(vol > 0, vol, 1.0)
        out_stress = jnp.where((vol > 0)[:, None, None], virial / safe[:, None, None], 0.0)
    return ModelOutput(energy=energy, forces=out_forces, stress=out_stress)


def _row_sums(terms: list) -> list:
    """Row sums ``(N,)`` of per-pair terms ``(N, K)``. Kept separate: a stacked
    ``(N, K, terms)`` sum was 10x slower on the H200 (XLA materialised it);
    ``benchmarks/profile_step.py --row-sums`` compares alternatives on a GPU."""
    return [jnp.sum(t, axis=1) for t in terms]


class PairPotential(Composable):
    """Mixin for pair potentials: a subclass gives ``cutoff``, ``species``,
    :meth:`pair_parameters` and :meth:`pair_term`; this supplies ``energy`` (the model
    contract, used by autodiff and by sums with other models) and ``evaluate``
    (closed-form forces and stress, which :func:`~nvalchemi_jax.models.base.compute`
    prefers)."""

    def pair_parameters(self) -> dict:
        """Parameters by name: scalars, or ``(P, P)`` symmetric tables over ``species``."""
        raise NotImplementedError

    def pair_term(self, r2, p: dict):
        """φ(r²) in eV, elementwise; ``p`` holds each parameter's per-pair values."""
        raise NotImplementedError

    def energy(self, positions, cell, batch, neighbors):
        return pair_energy(self.pair_term, self.pair_parameters(), self.cutoff,
                           species_table(self.species), positions, cell, batch, neighbors)

    def evaluate(self, positions, cell, batch, neighbors, forces=True, stress=False) -> ModelOutput:
        return pair_compute(self.pair_term, self.pair_parameters(), self.cutoff,
                            species_table(self.species), positions, cell, batch, neighbors,
                            forces=forces, stress=stress)


def smooth_cutoff(r2, cutoff: float, onset: float):
    """C¹ switch from 1 (r ≤ onset) to 0 (r ≥ cutoff) in r², the form ASE's smooth LJ uses."""
    rc2, ro2 = cutoff * cutoff, onset * onset
    inner = (rc2 - r2) ** 2 * (rc2 + 2.0 * r2 - 3.0 * ro2) / (rc2 - ro2) ** 3
    return jnp.where(r2 < ro2, 1.0, jnp.where(r2 < rc2, inner, 0.0))
