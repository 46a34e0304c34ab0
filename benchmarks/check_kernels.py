"""On this device: the neighbor tables of both builders against a brute-force search on the
host (every pair within the list cutoff, once, by minimum image: these cells are more
than twice the list cutoff wide), and the fused pair kernel against the XLA form (forces
to float32 rounding), with int8 and packed shift storage, and resident NVE steps
(:mod:`nvalchemi_jax.dynamics.resident`), leapfrog NVE (:mod:`nvalchemi_jax.dynamics.leapfrog`)
and its persistent kernel (:mod:`nvalchemi_jax.dynamics.persistent`) against the step-by-step
engine. Exit status 1 if a neighbor table or the pair kernel is wrong (``run_h200.sh`` then
falls back to ``NVALCHEMI_JAX_KERNELS=xla``); else 8 + a bit per failed path (1 resident, 2
leapfrog, 4 persistent: ``run_h200.sh`` turns those off), 0 if all passed. Prints JSON lines.

    python benchmarks/check_kernels.py
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import jax
import numpy as np

from _nve import LJ, batch_of
from _report import emit
from peers import nve_inputs
from nvalchemi_jax import neighbors
from nvalchemi_jax.models import LennardJones, compute


def brute_force_pairs(positions, cell, rc):
    """``{(i, j)}`` within ``rc`` by minimum image in an orthorhombic ``cell`` (host, float64)."""
    d = positions[None, :, :] - positions[:, None, :]
    length = np.diag(cell)
    d -= np.round(d / length) * length
    close = (np.sum(d * d, axis=-1) < rc * rc) & ~np.eye(len(positions), dtype=bool)
    return set(zip(*np.nonzero(close)))


def table_errors(nl, batch):
    """Pairs missing from, or listed beyond the list cutoff / more than once in, each system."""
    positions, cell = np.asarray(batch.positions, float), np.asarray(batch.cell, float)
    index, indices, shifts = (np.asarray(x) for x in (batch.system_index, nl.indices, nl.shift_vectors))
    rc, errors = nl.spec.list_cutoff, 0
    for s in np.flatnonzero(np.asarray(batch.system_mask)):
        atoms = np.flatnonzero(index == s)
        local = {a: k for k, a in enumerate(atoms)}
        listed = []
        for a in atoms:
            for j, n in zip(indices[a], shifts[a]):
                if j < len(index):
                    d = positions[j] - positions[a] + n @ cell[s]
                    listed.append((local[a], local[j], float(d @ d) < rc * rc))
        near = [(i, j) for i, j, inside in listed if inside]
        errors += len(near) - len(set(near))                   # listed twice
        errors += len(set(near) ^ brute_force_pairs(positions[atoms], cell[s], rc))
    return errors


def check(name, batch, method, shift_dtype="int8"):
    model = LennardJones(**LJ, shift=True)
    spec, nl = neighbors.allocate(batch, model.cutoff, skin=1.0, method=method)
    if shift_dtype != spec.shift_dtype:
        nl = neighbors.build(dataclasses.replace(spec, shift_dtype=shift_dtype), batch.positions,
                             batch.cell, batch)
    forces = {}
    for mode in ("xla", "pallas"):
        os.environ["NVALCHEMI_JAX_KERNELS"] = mode
        forces[mode] = np.asarray(jax.jit(lambda p, l: compute(model, p, batch.cell, batch, l).forces)(
            batch.positions, nl))
    err = float(np.abs(forces["pallas"] - forces["xla"]).max() / np.abs(forces["xla"]).max())
    wrong = table_errors(nl, batch)
    return {"case": name, "method": method, "shift_dtype": shift_dtype, "K": nl.spec.max_neighbors,
            "table_errors": wrong, "force_max_rel_err": err,
            "ok": bool(err < 1e-5 and wrong == 0 and not bool(nl.overflow))}


def check_path(name, batch, steps, path):
    """NVE by one of the fused paths (``resident``: steps held in one kernel program per
    system, ``leapfrog``: the pair kernel and one integration pass per step, ``persistent``:
    leapfrog steps in one kernel between rebuilds) against the step-by-step engine (float32:
    forces after one step to rounding; positions after ``steps`` steps, where rounding
    differences grow, to 1e-4 Å)."""
    from nvalchemi_jax.dynamics import NVE, leapfrog, persistent, resident
    md = NVE(LennardJones(**LJ, shift=True), dt=5.0, n_steps=10**9, skin=0.5)
    state = md.init(batch)
    flags = {"resident": "NVALCHEMI_JAX_RESIDENT", "leapfrog": "NVALCHEMI_JAX_LEAPFROG",
             "persistent": "NVALCHEMI_JAX_PERSISTENT"}
    before = {v: os.environ.get(v) for v in flags.values()}
    os.environ["NVALCHEMI_JAX_RESIDENT"] = "1" if path == "resident" else "0"
    os.environ["NVALCHEMI_JAX_PERSISTENT"] = "1" if path == "persistent" else "0"
    planned = (resident.plan(md, batch) if path == "resident" else
               persistent.programs(batch.num_atoms) * leapfrog.plan(md, batch) if path == "persistent"
               else int(leapfrog.plan(md, batch)))
    out = {}
    for flag in ("1", "0"):
        os.environ[flags[path]] = flag
        if flag == "0":
            os.environ["NVALCHEMI_JAX_LEAPFROG"] = "0"      # the engine, not the other path
        one = md.run(batch, state=state, max_steps=1, chunk_size=1).state
        many = md.run(batch, state=state, max_steps=steps, chunk_size=steps).state
        out[flag] = [np.asarray(x) for x in (one.forces, many.positions, many.energy,
                                             many.neighbors.rebuilds)]
    for variable, value in before.items():
        if value is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = value
    (f1, x1, e1, r1), (f0, x0, e0, r0) = out["1"], out["0"]
    err = float(np.abs(f1 - f0).max() / np.abs(f0).max())
    dx = float(np.abs(x1 - x0).max())
    de = float(np.abs(e1 - e0).max() / np.abs(e0).max())
    parts = resident.parts_for(batch.num_systems, planned) if path == "resident" and planned else 0
    return {"case": name, "method": path, "planned": planned, "parts": parts, "steps": steps,
            "rebuilds": [int(r1.max()), int(r0.max())],
            "force_max_rel_err": err, "positions_max_abs_diff": dx, "energy_max_rel_diff": de,
            "ok": bool(planned > 0 and err < 1e-5 and dx < 1e-4 and de < 1e-4)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None)
    p.add_argument("--paths", nargs="*", default=None,
                   help="check only these NVE paths (resident, leapfrog, persistent) besides the tables")
    p.add_argument("--cases", nargs="*", default=None, help="check the NVE paths on these cases only")
    p.add_argument("--no-tables", action="store_true",
                   help="skip the neighbor-table and pair-kernel checks (exit status as if they passed)")
    args = p.parse_args(argv)
    before = os.environ.get("NVALCHEMI_JAX_KERNELS")
    rows = [] if args.no_tables else [check("W1 4 x 256", batch_of(*nve_inputs(4, 4)), "all_pairs"),
            check("W1 4 x 256", batch_of(*nve_inputs(4, 4)), "cell_list"),
            check("W2 1 x 4000", batch_of(*nve_inputs(1, 10)), "cell_list"),
            check("W1 4 x 256", batch_of(*nve_inputs(4, 4)), "all_pairs", "packed"),
            check("W2 1 x 4000", batch_of(*nve_inputs(1, 10)), "cell_list", "packed")]
    paths = [("W1 64 x 256", 64, 4, "resident"), ("W1 1 x 256", 1, 4, "resident"),
             ("W1 64 x 256", 64, 4, "leapfrog"), ("W2 1 x 4000", 1, 10, "leapfrog"),
             ("W1 64 x 256", 64, 4, "persistent"), ("W2 1 x 4000", 1, 10, "persistent"),
             ("W2 1 x 32000", 1, 20, "persistent")]
    rows += [check_path(name, batch_of(*nve_inputs(count, repeats)), 50, path)
             for name, count, repeats, path in paths
             if (args.paths is None or path in args.paths) and (args.cases is None or name in args.cases)]
    if before is None:
        os.environ.pop("NVALCHEMI_JAX_KERNELS", None)
    emit([{"benchmark": "check_kernels", **r} for r in rows], args.out)
    paths = ("resident", "leapfrog", "persistent")
    failed = sum(1 << b for b, method in enumerate(paths)       # unchecked paths count as failed
                 if not any(r["method"] == method for r in rows)
                 or not all(r["ok"] for r in rows if r["method"] == method))
    kernels_ok = all(r["ok"] for r in rows if r["method"] not in paths)
    sys.exit(1 if not kernels_ok else 8 + failed if failed else 0)


if __name__ == "__main__":
    main()
