"""The fused GPU kernel (pair sums) against the XLA form on this device: forces must agree
to float32 rounding on lists from both builders. Exit status 1 if not (``run_h200.sh``
then falls back to ``NVALCHEMI_JAX_KERNELS=xla``). Prints JSON lines.

    python benchmarks/check_kernels.py
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np

from _nve import LJ, batch_of
from _report import emit
from peers import nve_inputs
from nvalchemi_jax import neighbors
from nvalchemi_jax.models import LennardJones, compute


def check(name, batch, method):
    model = LennardJones(**LJ, shift=True)
    _, nl = neighbors.allocate(batch, model.cutoff, skin=1.0, method=method)
    forces = {}
    for mode in ("xla", "pallas"):
        os.environ["NVALCHEMI_JAX_KERNELS"] = mode
        forces[mode] = np.asarray(jax.jit(lambda p, l: compute(model, p, batch.cell, batch, l).forces)(
            batch.positions, nl))
    err = float(np.abs(forces["pallas"] - forces["xla"]).max() / np.abs(forces["xla"]).max())
    return {"case": name, "method": method, "K": nl.spec.max_neighbors,
            "force_max_rel_err": err, "ok": bool(err < 1e-5)}


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
