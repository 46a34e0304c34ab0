"""The fused GPU kernels against the XLA forms on this device: neighbor tables (all pairs,
cell list) must agree (identical up to pairs at the list cutoff, where the two forms'
rounding may differ) and forces to float32 rounding. Exit status 1 if not
(``run_h200.sh`` then falls back to ``NVALCHEMI_JAX_KERNELS=xla``). Prints JSON lines.

    python benchmarks/check_kernels.py
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from _nve import LJ, batch_of
from _report import emit
from peers import nve_inputs
from nvalchemi_jax import neighbors
from nvalchemi_jax.models import LennardJones, compute


def check(name, batch, method):
    model = LennardJones(**LJ, shift=True)
    _, nl = neighbors.allocate(batch, model.cutoff, skin=1.0, method=method)
    out = {}
    for mode in ("xla", "pallas"):
        os.environ["NVALCHEMI_JAX_KERNELS"] = mode
        built = jax.jit(lambda p: neighbors.build(nl.spec, p, batch.cell, batch))(batch.positions)
        forces = jax.jit(lambda p, l: compute(model, p, batch.cell, batch, l).forces)(
            batch.positions, built)
        out[mode] = (np.asarray(built.indices), np.asarray(built.shifts), np.asarray(forces))
    (i0, s0, f0), (i1, s1, f1) = out["xla"], out["pallas"]
    err = float(np.abs(f1 - f0).max() / np.abs(f0).max())
    rows_differ = float(np.mean(np.any((i0 != i1) | np.any(s0 != s1, axis=-1), axis=1)))
    return {"case": name, "method": method, "K": nl.spec.max_neighbors,
            "rows_differing": rows_differ, "force_max_rel_err": err,
            "ok": bool(err < 1e-5 and rows_differ < 1e-3)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    before = os.environ.get("NVALCHEMI_JAX_KERNELS")
    rows = [check("W1 4 x 256", batch_of(*nve_inputs(4, 4)), "all_pairs"),
            check("W1 4 x 256", batch_of(*nve_inputs(4, 4)), "cell_list"),
            check("W2 1 x 4000", batch_of(*nve_inputs(1, 10)), "cell_list")]
    if before is None:
        os.environ.pop("NVALCHEMI_JAX_KERNELS")
    emit([{"benchmark": "check_kernels", **r} for r in rows], args.out)
    sys.exit(0 if all(r["ok"] for r in rows) else 1)


if __name__ == "__main__":
    main()
