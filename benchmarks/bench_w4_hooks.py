"""Hook overhead (W4): NVE throughput with logging + snapshot hooks every 100 steps vs none.

B periodic FCC argon crystals of 256 atoms (the W1 inputs). Prints JSON lines with
atom-steps/s for both runs and the relative overhead.

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


def throughput(md, batch, steps, chunk):
    state = jax.block_until_ready(md.init(batch))
    warm = md.run(batch, state=state, max_steps=chunk, chunk_size=chunk)   # compile
    t0 = time.perf_counter()
    result = md.run(batch, state=warm.state, max_steps=steps, chunk_size=chunk)
    jax.block_until_ready(result.state)
    seconds = time.perf_counter() - t0
    atoms = int(np.asarray(batch.n_atoms).sum())
    return atoms * (result.steps - warm.steps) / seconds


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="*", default=[16])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--chunk", type=int, default=100)
    p.add_argument("--skin", type=float, default=1.0)
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
        base = throughput(plain, batch, args.steps, args.chunk)
        with_hooks = throughput(hooked, batch, args.steps, args.chunk)
        rows.append({"benchmark": "W4 hook_overhead", "case": f"B={b} x 256 atoms",
                     "hooks": "LoggingHook + SnapshotHook, frequency 100", "steps": args.steps,
                     "atom_steps_per_s_no_hooks": base, "atom_steps_per_s_hooks": with_hooks,
                     "overhead": 1.0 - with_hooks / base})
    emit(rows, args.out)


if __name__ == "__main__":
    main()
