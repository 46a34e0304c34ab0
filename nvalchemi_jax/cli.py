"""``nvalchemi-jax`` / ``python -m nvalchemi_jax``: the command-line entry point.

With no arguments it runs the built-in demo: generate argon systems of mixed
sizes (periodic crystals and clusters), pack them into one padded batch, build
neighbor lists and evaluate Lennard-Jones energies, forces and stress in one
compiled call, and print a table.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
from rich.console import Console
from rich.table import Table

from nvalchemi_jax import neighbors, units
from nvalchemi_jax.batch import Batch
from nvalchemi_jax.datasets import argon_systems
from nvalchemi_jax.models import LennardJones, compute


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nvalchemi-jax", description=__doc__.split("\n\n")[1])
    p.add_argument("--systems", type=int, default=128, help="number of argon systems (default 128)")
    p.add_argument("--min-atoms", type=int, default=32)
    p.add_argument("--max-atoms", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows", type=int, default=12, help="systems listed in the table")
    p.add_argument("--x64", action="store_true", help="compute in float64")
    return p


def demo(args) -> dict:
    console = Console()
    t0 = time.perf_counter()
    data = argon_systems(args.systems, seed=args.seed, min_atoms=args.min_atoms,
                         max_atoms=args.max_atoms)
    batch = Batch.from_arrays(**data)
    t_build = time.perf_counter() - t0
    model = LennardJones(sigma=3.40, epsilon=0.0104, cutoff=8.5, shift=True)

    t0 = time.perf_counter()
    spec, nl = neighbors.allocate(batch, cutoff=model.cutoff, skin=0.5)
    evaluate = jax.jit(lambda m, nl, b: compute(m, b.positions, b.cell, b,
                                                neighbors.build(nl.spec, b.positions, b.cell, b),
                                                stress=True))
    out = jax.block_until_ready(evaluate(model, nl, batch))
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = jax.block_until_ready(evaluate(model, nl, batch))
    t_eval = time.perf_counter() - t0

    n_atoms = np.asarray(batch.n_atoms)
    energy = np.asarray(out.energy, float)
    forces = np.linalg.norm(np.asarray(out.forces, float), axis=1)
    fmax = np.zeros(batch.num_systems)
    np.maximum.at(fmax, np.minimum(np.asarray(batch.system_index), batch.num_systems - 1),
                  np.where(np.asarray(batch.atom_mask), forces, 0.0))
    pressure = -np.trace(np.asarray(out.stress, float), axis1=1, axis2=2) / 3.0
    pbc = np.asarray(batch.pbc).all(axis=1)
    filled = np.flatnonzero(np.asarray(batch.system_mask))

    table = Table(title=f"Lennard-Jones argon: {len(filled)} systems, {n_atoms.sum()} atoms")
    for col in ("sample", "atoms", "kind", "E/atom (eV)", "fmax (eV/Å)", "P (GPa)"):
        table.add_column(col, justify="right")
    for s in filled[: args.rows]:
        table.add_row(str(int(batch.sample_id[s])), str(n_atoms[s]), "crystal" if pbc[s] else "cluster",
                      f"{energy[s] / n_atoms[s]:.5f}", f"{fmax[s]:.4f}",
                      f"{units.stress_to_gpa(pressure[s]):.4f}" if pbc[s] else "-")
    console.print(table)
    summary = {
        "systems": int(len(filled)), "atoms": int(n_atoms.sum()), "device": str(jax.devices()[0]),
        "dtype": str(batch.dtype), "neighbor_method": spec.method, "max_neighbors": spec.max_neighbors,
        "batch_build_s": round(t_build, 3), "first_call_s": round(t_first, 3),
        "eval_s": round(t_eval, 4), "atoms_per_s": float(n_atoms.sum() / t_eval),
        "mean_energy_per_atom_eV": float(energy[filled].sum() / n_atoms.sum()),
    }
    console.print(summary)
    return summary


def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    if args.x64:
        jax.config.update("jax_enable_x64", True)
    demo(args)


if __name__ == "__main__":
    main()
