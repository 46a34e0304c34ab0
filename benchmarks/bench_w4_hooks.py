"""Hook overhead (W4): NVE throughput with logging + snapshot hooks every 100 steps vs none.

B periodic FCC argon crystals of 256 atoms (the W1 inputs). Prints JSON lines with
atom-steps/s for both (medians of alternating runs, and each run) and the relative overhead.

    python benchmarks/bench_w4_hooks.py --batches 1024 --steps 1000
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from nvalchemi_jax.dynamics import NVE
from nvalchemi_jax.dynamics.hooks import LoggingHook, SnapshotHook
from nvalchemi_jax.dynamics.sinks import HostMemory
from nvalchemi_jax.models import LennardJones

from _report import emit
from _nve import batch_of
from peers import nve_inputs


def timed_run(md, batch, steps, chunk):
    """A function that times one run of ``steps`` from a compiled, warmed-up state."""
    state = jax.block_until_ready(md.init(batch))
    warm = md.run(batch, state=state, max_steps=chunk, chunk_size=chunk)   # compile
    atoms = int(np.asarray(batch.n_atoms).sum())

    def once():
        t0 = time.perf_counter()
        result = md.run(batch, state=warm.state, max_steps=steps, chunk_size=chunk)
        jax.block_until_ready(result.state)
        return atoms * (result.steps - warm.steps) / (time.perf_counter() - t0)

    return once


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="*", default=[16])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--chunk", type=int, default=100)
    p.add_argument("--skin", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=5, help="alternating runs of each; medians compared")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    model = LennardJones(sigma=3.40, epsilon=0.0104, cutoff=8.5, shift=True)
    rows = []
    for b in args.batches:
        batch = batch_of(*nve_inputs(b, 4))
        plain = NVE(model, dt=5.0, n_steps=10**9, skin=args.skin)
        hooked = NVE(model, dt=5.0, n_steps=10**9, skin=args.skin,
                     hooks=[LoggingHook(frequency=100, output=lambda rows: None),
                            SnapshotHook(sink=HostMemory(), frequency=100)])
        runs = {"no_hooks": timed_run(plain, batch, args.steps, args.chunk),
                "hooks": timed_run(hooked, batch, args.steps, args.chunk)}
        # Alternating runs: one timing of a fraction of a second moves by tens of percent.
        rates = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, once in runs.items():
                rates[name].append(once())
        base, with_hooks = (float(np.median(rates[name])) for name in runs)
        rows.append({"benchmark": "W4 hook_overhead", "case": f"B={b} x 256 atoms",
                     "hooks": "LoggingHook + SnapshotHook, frequency 100", "steps": args.steps,
                     "repeats": args.repeats, "atom_steps_per_s_no_hooks": base,
                     "atom_steps_per_s_hooks": with_hooks, "overhead": 1.0 - with_hooks / base,
                     "runs_no_hooks": rates["no_hooks"], "runs_hooks": rates["hooks"]})
    emit(rows, args.out)


if __name__ == "__main__":
    main()
