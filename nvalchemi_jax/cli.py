"""``nvalchemi-jax`` / ``python -m nvalchemi_jax``: run a workflow.

With no arguments it runs the built-in demo: ~1,000 generated argon systems of
32–500 atoms (rattled crystals and clusters) → FIRE relaxation to fmax 0.05 eV/Å
→ NVT Langevin for 300 steps at 60 K, fused in one batch with inflight refills,
finished systems written to a zarr store, with a progress bar and a summary.
``--scale 0.1`` runs a tenth of the systems (for a CPU). ``--config FILE.toml``
reads a workflow (see :mod:`nvalchemi_jax.workflow`); flags override it.
``nvalchemi-jax evaluate`` evaluates LJ on a batch and prints a table.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
from rich.console import Console
from rich.table import Table

from nvalchemi_jax import neighbors, units, workflow
from nvalchemi_jax.batch import Batch
from nvalchemi_jax.datasets import argon_systems
from nvalchemi_jax.models import LennardJones, compute


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nvalchemi-jax", description=__doc__.split("\n\n")[1])
    p.add_argument("command", nargs="?", default="run", choices=["run", "evaluate"])
    p.add_argument("--config", help="workflow TOML file")
    p.add_argument("--systems", type=int, help="number of generated systems (default 1000)")
    p.add_argument("--scale", type=float, default=1.0, help="fraction of the systems to run (e.g. 0.1 on a CPU)")
    p.add_argument("--min-atoms", type=int)
    p.add_argument("--max-atoms", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--output", help="zarr store for finished systems")
    p.add_argument("--max-systems", type=int, help="batch capacity: systems")
    p.add_argument("--capacity-atoms", type=int, help="batch capacity: atoms")
    p.add_argument("--refill-frequency", type=int)
    p.add_argument("--on-device", action="store_true", default=None,
                   help="upload the dataset once and decide refills on the device")
    p.add_argument("--rows", type=int, default=12, help="rows of the evaluate table")
    p.add_argument("--x64", action="store_true", help="compute in float64")
    p.add_argument("--no-progress", action="store_true")
    return p


def _overrides(args) -> dict:
    data = {k: v for k, v in (("systems", args.systems), ("min_atoms", args.min_atoms),
                              ("max_atoms", args.max_atoms), ("seed", args.seed)) if v is not None}
    run = {k: v for k, v in (("output", args.output), ("max_systems", args.max_systems),
                             ("max_atoms", args.capacity_atoms), ("refill_frequency", args.refill_frequency),
                             ("on_device", args.on_device))
           if v is not None}
    return {"data": data, "run": run}


def run_workflow(config: dict, scale: float = 1.0, progress: bool = True) -> dict:
    """Run a workflow config (see :mod:`nvalchemi_jax.workflow`); returns the summary."""
    from nvalchemi_jax.capacity import Capacity
    from nvalchemi_jax.dynamics.sampler import SizeAwareSampler
    from nvalchemi_jax.dynamics.sinks import ZarrData

    console = Console()
    data_cfg, run_cfg = config["data"], config["run"]
    count = max(1, int(round(data_cfg["systems"] * scale)))
    t0 = time.perf_counter()
    data = argon_systems(count, seed=data_cfg["seed"], min_atoms=data_cfg["min_atoms"],
                         max_atoms=data_cfg["max_atoms"])
    dataset = [{"positions": p, "atomic_numbers": z, "cell": c, "pbc": b} for p, z, c, b in
               zip(data["positions"], data["atomic_numbers"], data["cell"], data["pbc"])]
    model = workflow.build_model(config["model"])
    stages = [workflow.build_stage(s, model) for s in config["stages"]]
    dyn = stages[0]
    for s in stages[1:]:
        dyn = dyn + s
    # --scale shrinks the capacity with the data: padding costs as much as real atoms.
    largest = max(len(d["atomic_numbers"]) for d in dataset)
    capacity = Capacity(max(1, int(np.ceil(run_cfg["max_systems"] * scale))),
                        max(largest, int(np.ceil(run_cfg["max_atoms"] * scale))))
    sampler = SizeAwareSampler(dataset, capacity)
    sink = ZarrData(run_cfg["output"])
    before = len(sink)
    result = dyn.run(sampler=sampler, sinks=[sink], refill_frequency=int(run_cfg["refill_frequency"]),
                     max_steps=run_cfg.get("max_steps"), progress=progress,
                     on_device=bool(run_cfg.get("on_device", False)))
    seconds = time.perf_counter() - t0
    atoms = int(sum(len(d["atomic_numbers"]) for d in dataset))
    summary = {
        "systems": count, "written": result.written, "failed": result.failed,
        "unfinished": len(result.unfinished), "steps": result.steps, "seconds": round(seconds, 2),
        "structures_per_s": round(result.written / seconds, 2),
        "slot_occupancy": round(result.occupancy, 3), "padding_efficiency": round(result.padding_efficiency, 3),
        "device": str(jax.devices()[0]), "output": run_cfg["output"], "frames_in_store": before + result.written,
    }
    table = Table(title="workflow summary: " + " → ".join(s["kind"] for s in config["stages"]))
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for k, v in summary.items():
        table.add_row(k, str(v))
    console.print(table)
    return summary


def evaluate(args) -> dict:
    """Evaluate LJ on a batch of generated argon systems and print a table."""
    console = Console()
    count = args.systems or 128
    data = argon_systems(count, seed=args.seed or 0, min_atoms=args.min_atoms or 32,
                         max_atoms=args.max_atoms or 500)
    batch = Batch.from_arrays(**data)
    model = LennardJones(sigma=3.40, epsilon=0.0104, cutoff=8.5, shift=True)
    spec, nl = neighbors.allocate(batch, cutoff=model.cutoff, skin=0.5)
    evaluate_fn = jax.jit(lambda m, nl, b: compute(m, b.positions, b.cell, b,
                                                   neighbors.build(nl.spec, b.positions, b.cell, b), stress=True))
    out = jax.block_until_ready(evaluate_fn(model, nl, batch))
    t0 = time.perf_counter()
    out = jax.block_until_ready(evaluate_fn(model, nl, batch))
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
    summary = {"systems": int(len(filled)), "atoms": int(n_atoms.sum()), "neighbor_method": spec.method,
               "eval_s": round(t_eval, 4), "mean_energy_per_atom_eV": float(energy[filled].sum() / n_atoms.sum())}
    console.print(summary)
    return summary


def main(argv=None) -> int:
    """Entry point; returns the process exit status (0)."""
    args = _parser().parse_args(argv)
    if args.x64:
        jax.config.update("jax_enable_x64", True)
    if args.command == "evaluate":
        evaluate(args)
    else:
        config = workflow.load(args.config, _overrides(args))
        run_workflow(config, scale=args.scale, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
