"""Where a step of the persistent NVE kernel (:mod:`nvalchemi_jax.dynamics.persistent`) goes:
one kernel call of ``--trips`` steps on a W2 crystal (no rebuild: the verdict's skin is
set out of reach), per variant of its tile, warps, update block, programs per
multiprocessor and pipelining stages, and with parts of the step left out (``:pairs``,
``:barrier``: timing only, results wrong). The plain pair kernel at the same size is the
reference. Prints JSON lines.

    python benchmarks/probe_persistent.py --repeats 20 --variants 128x16x16x512x1x1 \
        128x16x16x512x1x1:barrier
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from _nve import LJ, batch_of
from _report import emit
from peers import nve_inputs
from nvalchemi_jax.dynamics import NVE, persistent
from nvalchemi_jax.models import LennardJones, pair_kernel
from nvalchemi_jax.models.pair import symmetric


def best_of(fn, *args, repeat=5):
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, nargs="+", default=[20], help="crystal repeats (20: 32,000 atoms)")
    p.add_argument("--trips", type=int, default=200)
    p.add_argument("--variants", nargs="+", default=["128x16x16x512x1x1"],
                   metavar="ROWSxCOLSxWARPSxATOMSxPER_SMxSTAGES[:pairs|:barrier]")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    rows = []
    for repeats in args.repeats:
        batch = batch_of(*nve_inputs(1, repeats))
        md = NVE(LennardJones(**LJ, shift=True), dt=5.0, n_steps=10**9, skin=1.0)
        state = md.init(batch)
        nl, n, dtype = state.neighbors, batch.num_atoms, state.positions.dtype
        params = {k: symmetric(v) for k, v in md.model.pair_parameters().items()}
        pair = jax.jit(lambda x: pair_kernel.pair_sums(md.model.pair_term, md.model.cutoff, params, None, 1,
                                                       x, state.cell, batch, nl, False))
        seconds = best_of(pair, state.positions)
        rows.append({"case": f"W2 1 x {n}", "variant": "pair kernel alone", "us_per_step": seconds * 1e6})
        print(rows[-1], flush=True)
        x4 = jnp.pad(state.positions, ((0, 0), (0, 1)))
        zero = jnp.zeros((n,), dtype)
        rings = persistent.rings_at_start(x4, state.velocities, zero, zero)
        kick = jnp.full((n,), 1e-3, dtype)
        for variant in args.variants:
            tile, _, skip = variant.partition(":")
            (persistent.ROWS, persistent.COLS, persistent.WARPS, persistent.ATOMS, persistent.PER_SM,
             persistent.STAGES) = (int(v) for v in tile.split("x"))
            persistent._SKIP = frozenset(skip.split(",")) if skip else frozenset()
            grid = persistent.programs(n)
            call = jax.jit(lambda rings: persistent.call(
                md.model.pair_term, float(md.model.cutoff), params, None, 1, rings, jnp.int32(0),
                jnp.int32(args.trips), kick=kick, dt_atom=jnp.full((n,), 5.0, dtype),
                count_atom=jnp.full((n,), args.trips - 1, jnp.int32), reference=nl.reference_positions,
                skin=1e3, cell=state.cell, batch=batch, nl=nl, grid=grid))
            row = {"case": f"W2 1 x {n}", "variant": variant, "grid": grid, "trips": args.trips}
            try:
                t0 = time.perf_counter()
                out = jax.block_until_ready(call(rings))
                row["compile_s"] = time.perf_counter() - t0
                row["next"], row["code"] = int(out[2]), int(out[3])
                row["us_per_step"] = best_of(call, rings, repeat=3) * 1e6 / args.trips
            except Exception as e:  # noqa: BLE001 - one variant failing must not lose the others
                row["failed"] = f"{type(e).__name__}: {e}"[:300]
            rows.append(row)
            print(row, flush=True)
    persistent._SKIP = frozenset()
    emit([{"benchmark": "probe_persistent", **r} for r in rows], args.out)


if __name__ == "__main__":
    main()
