"""NVE throughput of the compiled run loop: atom-steps per second.

B periodic FCC argon crystals of 256 atoms (4x4x4 cubic cells, a = 5.26 Å,
rattled 0.02 Å, Maxwell–Boltzmann at 40 K), LJ σ 3.40 Å, ε 0.0104 eV, cutoff
8.5 Å (shifted), skin 0.5 Å, NVE dt 5 fs; and single large crystals. Prints
JSON lines (``--out`` also writes them). The baseline for the performance work.

    python benchmarks/bench_md.py --batches 1 64 1024 --big 32000 --steps 1000
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

import nvalchemi_jax as nj
from _report import emit
from nvalchemi_jax.datasets import fcc_crystal
from nvalchemi_jax.dynamics import NVE, maxwell_boltzmann
from nvalchemi_jax.models import LennardJones


def crystals(count, repeats, seed=0):
    positions, cell = fcc_crystal(repeats)
    rng = np.random.default_rng(seed)
    batch = nj.Batch.from_arrays(
        positions=[positions + rng.normal(0, 0.02, positions.shape) for _ in range(count)],
        atomic_numbers=[np.full(len(positions), 18)] * count, cell=[cell] * count,
        pbc=[np.ones(3, bool)] * count, min_distance=None)
    return batch.replace(velocities=maxwell_boltzmann(batch, 40.0, jax.random.key(seed)))


def run_case(name, batch, steps, chunk):
    model = LennardJones(sigma=3.40, epsilon=0.0104, cutoff=8.5, shift=True)
    md = NVE(model, dt=5.0, n_steps=10**9)
    state = jax.block_until_ready(md.init(batch))
    t0 = time.perf_counter()
    warm = md.run(batch, state=state, max_steps=chunk, chunk_size=chunk)
    jax.block_until_ready(warm.state)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = md.run(batch, state=warm.state, max_steps=steps, chunk_size=chunk)
    jax.block_until_ready(result.state)
    seconds = time.perf_counter() - t0
    atoms = int(np.asarray(batch.n_atoms).sum())
    stats = jax.devices()[0].memory_stats() or {}
    return {"benchmark": "md_nve", "case": name, "atoms": atoms, "steps": result.steps - warm.steps,
            "seconds": seconds, "atom_steps_per_s": atoms * (result.steps - warm.steps) / seconds,
            "first_chunk_with_compile_s": first, "rebuilds_per_system": float(
                np.asarray(result.state.neighbors.rebuilds).max()),
            "neighbor_method": result.state.neighbors.spec.method,
            "peak_bytes": stats.get("peak_bytes_in_use")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="*", default=[1, 16])
    p.add_argument("--big", type=int, nargs="*", default=[])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--chunk", type=int, default=100)
    p.add_argument("--x64", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.x64:
        jax.config.update("jax_enable_x64", True)
    rows = [run_case(f"B={b} x 256 atoms", crystals(b, (4, 4, 4)), args.steps, args.chunk)
            for b in args.batches]
    for n in args.big:
        side = round((n / 4) ** (1 / 3))
        rows.append(run_case(f"1 x {4 * side**3} atoms", crystals(1, (side,) * 3), args.steps, args.chunk))
    emit(rows, args.out)


if __name__ == "__main__":
    main()
