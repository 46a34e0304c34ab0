"""Neighbor-list build and Lennard-Jones energy+forces on batches of argon crystals.

Workloads (float32 unless --x64): B periodic FCC argon crystals of 256 atoms
(4x4x4 cubic cells, a = 5.26 Å, rattled 0.02 Å) for B in --batches, and one
crystal of --big atoms; LJ σ 3.40 Å, ε 0.0104 eV, cutoff 8.5 Å, skin 0.5 Å.
Prints one JSON object per line (and writes them to --out if given).

    python benchmarks/bench_foundation.py --batches 1 64 1024 --big 32000
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

import nvalchemi_jax as nj
from _report import emit, median_seconds
from nvalchemi_jax import neighbors
from nvalchemi_jax.datasets import fcc_crystal
from nvalchemi_jax.models import LennardJones, compute


def crystals(count: int, repeats: tuple[int, int, int], seed: int = 0) -> nj.Batch:
    positions, cell = fcc_crystal(repeats)
    rng = np.random.default_rng(seed)
    pos = [positions + rng.normal(0, 0.02, positions.shape) for _ in range(count)]
    return nj.Batch.from_arrays(positions=pos, atomic_numbers=[np.full(len(positions), 18)] * count,
                                cell=[cell] * count, pbc=[np.ones(3, bool)] * count,
                                min_distance=None)


def timed(fn, *args, repeats: int = 5):
    """(compile seconds, median run seconds) of a jitted function."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    return compile_s, median_seconds(compiled, *args, repeat=repeats)


def peak_memory() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def run_case(name: str, batch: nj.Batch, method: str, repeats: int) -> dict:
    model = LennardJones(sigma=3.40, epsilon=0.0104, cutoff=8.5, shift=True)
    spec, nl = neighbors.allocate(batch, cutoff=model.cutoff, skin=0.5, method=method)
    build = lambda positions, cell, b: neighbors.build(spec, positions, cell, b)
    forces = lambda m, nl, positions, cell, b: compute(m, positions, cell, b, nl)
    c_build, t_build = timed(build, batch.positions, batch.cell, batch, repeats=repeats)
    c_force, t_force = timed(forces, model, nl, batch.positions, batch.cell, batch, repeats=repeats)
    atoms = int(np.asarray(batch.n_atoms).sum())
    return {
        "benchmark": "foundation", "case": name, "systems": int(np.asarray(batch.system_mask).sum()),
        "atoms": atoms, "method": spec.method, "max_neighbors": spec.max_neighbors,
        "neighbor_build_s": t_build, "energy_forces_s": t_force,
        "neighbor_builds_atoms_per_s": atoms / t_build, "energy_forces_atoms_per_s": atoms / t_force,
        "compile_build_s": c_build, "compile_forces_s": c_force, "peak_bytes": peak_memory(),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="*", default=[1, 64])
    p.add_argument("--big", type=int, nargs="*", default=[4000],
                   help="atoms of single big crystals (4 n^3, e.g. 32000)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--x64", action="store_true")
    p.add_argument("--out", default=None, help="also write JSON lines here")
    args = p.parse_args(argv)
    if args.x64:
        jax.config.update("jax_enable_x64", True)
    rows = []
    for b in args.batches:
        rows.append(run_case(f"B={b} x 256 atoms", crystals(b, (4, 4, 4)), "auto", args.repeats))
    for n in args.big:
        side = round((n / 4) ** (1 / 3))
        rows.append(run_case(f"1 x {4 * side**3} atoms", crystals(1, (side, side, side)),
                             "cell_list", args.repeats))
    emit(rows, args.out)


if __name__ == "__main__":
    main()
