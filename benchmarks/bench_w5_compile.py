"""W5: compile time, and compilations across an inflight run with refills.

A fresh process relaxes (FIRE) the mixed-size argon set (32-500 atoms) inflight, refilling
every ``--refill`` steps. An observer hook notes, after each chunk, how many XLA
compilations have happened so far: everything compiles before the first chunk ends
(init and the chunk; the refill compiles at its first use, which comes later), and nothing
may compile again: ``recompilations`` counts functions compiled after the first chunk that
had been compiled before it (neighbor-list regrowth, reported as ``regrows``, is the one
legitimate cause).

    python benchmarks/bench_w5_compile.py --count 2000 --batch-size 256 --out results/w5.jsonl
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import nvalchemi_jax as nj
from _report import emit
from bench_w3_relax import MODEL, as_items, compilations, mixed_inputs
from nvalchemi_jax.dynamics import FIRE, ConvergenceHook, HostMemory, SizeAwareSampler
from nvalchemi_jax.dynamics.hooks import Hook


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--refill", type=int, default=10)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    positions, cells = mixed_inputs(a.count)
    capacity = nj.Capacity(a.batch_size, int(1.3 * np.mean([len(x) for x in positions])) * a.batch_size)
    marks = []       # (seconds since start, compilations so far) after each chunk
    t0 = time.perf_counter()
    with compilations() as seen:
        watch = Hook(record=lambda state, batch, ctx: state.global_step, frequency=a.refill,
                     on_host=lambda rows, due, steps: marks.append((time.perf_counter() - t0,
                                                                     seen["count"], seen["seconds"])),
                     name="compile_watch")
        relax = FIRE(MODEL, convergence=ConvergenceHook.from_fmax(0.01), skin=1.0, hooks=[watch])
        sampler = SizeAwareSampler(as_items(positions, cells), capacity)
        result = relax.run(sampler=sampler, sinks=[HostMemory()], refill_frequency=a.refill)
    seconds = time.perf_counter() - t0
    first_s, first_count, first_compile_s = marks[0]
    emit([{"benchmark": "W5", "structures": a.count, "capacity": [capacity.num_systems, capacity.num_atoms],
           "refill_frequency": a.refill, "refills": result.refills, "chunks": result.chunks,
           "regrows": result.regrows, "seconds": seconds, "first_chunk_s": first_s,
           "compilations_until_first_chunk": first_count, "compile_seconds_until_first_chunk": first_compile_s,
           "compilations_after_first_chunk": seen["count"] - first_count,
           "compile_seconds_after_first_chunk": seen["seconds"] - first_compile_s,
           "compiled_after_first_chunk": sorted(set(seen["names"][first_count:])),
           "recompilations": sum(n in set(seen["names"][:first_count]) for n in seen["names"][first_count:])}],
         a.out)


if __name__ == "__main__":
    main()
