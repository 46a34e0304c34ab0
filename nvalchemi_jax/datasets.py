"""Built-in structures, generated on the fly (no downloads): argon crystals and clusters."""

from __future__ import annotations

import itertools

import numpy as np

#: FCC argon near its LJ equilibrium (σ = 3.40 Å): cubic lattice constant in Å.
ARGON_LATTICE = 5.26
_FCC_BASIS = np.array([[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]])


def fcc_crystal(repeats: tuple[int, int, int], lattice: float = ARGON_LATTICE):
    """Positions ``(4 nx ny nz, 3)`` Å and cell ``(3, 3)`` of a cubic FCC supercell."""
    cells = np.array(list(itertools.product(*(range(r) for r in repeats))), float)
    frac = (cells[:, None, :] + _FCC_BASIS[None]).reshape(-1, 3)
    return frac * lattice, np.diag(np.asarray(repeats, float) * lattice)


def fcc_cluster(n_atoms: int, lattice: float = ARGON_LATTICE) -> np.ndarray:
    """The ``n_atoms`` FCC lattice sites nearest the origin: a roughly spherical cluster."""
    r = int(np.ceil((n_atoms / 4) ** (1 / 3))) + 2
    positions, _ = fcc_crystal((2 * r, 2 * r, 2 * r), lattice)
    positions -= r * lattice
    order = np.argsort(np.linalg.norm(positions + 1e-3, axis=1), kind="stable")
    return positions[order[:n_atoms]]


def argon_systems(count: int, seed: int = 0, min_atoms: int = 32, max_atoms: int = 500,
                  rattle: float = 0.1, cluster_fraction: float = 0.25) -> dict[str, list]:
    """``count`` rattled argon systems of ``min_atoms``–``max_atoms`` atoms.

    Crystals are at least two cubic cells thick along every axis (thinner
    slabs of argon are unphysical and make neighbor searches scan many images).

    Periodic FCC supercells (lattice constant varied ±2 %) and open clusters,
    each rattled by a normal displacement of ``rattle`` Å; system ``i`` uses the
    random stream ``seed + i`` so any subset is reproducible. Returns the keyword
    arguments of :meth:`nvalchemi_jax.Batch.from_arrays` (``positions``,
    ``atomic_numbers``, ``cell``, ``pbc``, ``sample_ids``).
    """
    shapes = [r for r in itertools.product(range(2, 9), repeat=3)
              if r[0] <= r[1] <= r[2] and min_atoms <= 4 * np.prod(r) <= max_atoms]
    if not shapes:
        raise ValueError(f"no FCC supercell has between {min_atoms} and {max_atoms} atoms")
    out: dict[str, list] = {k: [] for k in ("positions", "atomic_numbers", "cell", "pbc", "sample_ids")}
    for i in range(count):
        rng = np.random.default_rng(seed + i)
        lattice = ARGON_LATTICE * rng.uniform(0.98, 1.02)
        if rng.uniform() < cluster_fraction:
            positions = fcc_cluster(int(rng.integers(min_atoms, max_atoms + 1)), lattice)
            cell, pbc = np.zeros((3, 3)), np.zeros(3, bool)
        else:
            repeats = shapes[int(rng.integers(len(shapes)))]
            positions, cell = fcc_crystal(tuple(rng.permutation(repeats)), lattice)
            pbc = np.ones(3, bool)
        positions = positions + rng.normal(0.0, rattle, positions.shape)
        out["positions"].append(positions)
        out["atomic_numbers"].append(np.full(len(positions), 18))
        out["cell"].append(cell)
        out["pbc"].append(pbc)
        out["sample_ids"].append(i)
    return out
