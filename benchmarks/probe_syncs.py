"""Which loop constructs make a GPU step wait for the host. A GPU runs a conditional (and a
loop whose trip count XLA does not know) by copying its predicate to the host, unless XLA
records it into a CUDA graph (command buffer) with conditional nodes. For each construct
this times a 100-step ``lax.scan`` and counts device-to-host copies per step in a
``jax.profiler`` trace. Run it once per ``XLA_FLAGS`` setting; prints JSON lines.

    XLA_FLAGS=--xla_gpu_graph_min_graph_size=1 python benchmarks/probe_syncs.py
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from _report import device_to_host, emit, gpu_kernels
from _nve import batch_of
from peers import nve_inputs

STEPS = 100
# Per-compilation XLA options tried on the real chunk.
# graph1_nocub is what the library uses (CHUNK_COMPILER_OPTIONS).
OPTIONS = {"default": None, "graph1": {"xla_gpu_graph_min_graph_size": 1},
           "graph1_nocub": {"xla_gpu_graph_min_graph_size": 1, "xla_gpu_enable_cub_radix_sort": False}}


def trace_counts(fn, x):
    """Device-to-host copies, CUDA graph launches and all GPU launches of one call, from a
    profiler trace."""
    _, count = gpu_kernels(lambda: fn(x))
    graphs = sum(n for name, n in count.items() if "graph" in name.lower())
    return device_to_host(count), graphs, sum(count.values())


def timed(fn, x, repeat=5):
    jax.block_until_ready(fn(x))
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(x))
        best = min(best, time.perf_counter() - t0)
    return best


def scan_of(body):
    return jax.jit(lambda x: jax.lax.scan(lambda c, _: (body(c), None), x, None, length=STEPS)[0])


def constructs():
    """Small bodies (4,096 floats), each with one construct."""
    def kick(x):
        return x * 0.999 + 0.001 * jnp.sin(x)

    def cond_simple(x):
        return jax.lax.cond(jnp.max(x) > 1e9, lambda y: y * 0.5, kick, x)

    def cond_sort(x):
        return jax.lax.cond(jnp.max(x) > 1e9, lambda y: jnp.sort(y), kick, x)

    def cond_argsort(x):
        return jax.lax.cond(jnp.max(x) > 1e9, lambda y: y[jnp.argsort(y, stable=True)], kick, x)

    def cond_map(x):
        return jax.lax.cond(jnp.max(x) > 1e9,
                            lambda y: jax.lax.map(lambda r: r * 2.0, y.reshape(4, -1)).reshape(-1), kick, x)

    def switch3(x):
        i = jnp.where(jnp.max(x) > 1e9, 2, 1)
        return jax.lax.switch(i, [lambda y: y, kick, lambda y: kick(y) + 1.0], x)

    def two_conds(x):
        return cond_simple(switch3(x))

    return {"plain": kick, "cond": cond_simple, "cond_sort": cond_sort, "cond_argsort": cond_argsort,
            "cond_lax_map": cond_map, "switch": switch3, "switch_then_cond": two_conds}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nve", type=int, nargs="*", default=[1, 1024], help="W1 batch sizes of the real step")
    p.add_argument("--big", type=int, nargs="*", default=[], help="W2 crystals of 4 side**3 atoms")
    p.add_argument("--skip-constructs", action="store_true")
    p.add_argument("--step-variants", type=int, nargs="*", default=[],
                   help="W1 batch sizes for the A/B of the step's gates")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    flags = os.environ.get("XLA_FLAGS", "")
    rows = []
    x = jnp.linspace(0.0, 1.0, 4096, dtype=jnp.float32)
    for name, body in (constructs() if not args.skip_constructs else {}).items():
        fn = scan_of(body)
        d2h, graphs, kernels = trace_counts(fn, x)
        hlo = fn.lower(x).compile().as_text()
        rows.append({"construct": name, "step_us": 1e6 * timed(fn, x) / STEPS, "d2h_per_step": d2h / STEPS,
                     "graph_events": graphs, "gpu_events": kernels,
                     "command_buffers_in_hlo": hlo.count("command_buffer"), "xla_flags": flags})
        print(json.dumps(rows[-1]), flush=True)
    from nvalchemi_jax import neighbors
    from nvalchemi_jax.dynamics import NVE
    from nvalchemi_jax.dynamics.run import chunk_steps
    from nvalchemi_jax.models import LennardJones
    cases = [(f"W1 B={b} x 256", b, 4) for b in args.nve]
    cases += [(f"W2 1 x {4 * side**3}", 1, side) for side in args.big]
    for name, b, side in cases:
        batch = batch_of(*nve_inputs(b, side))
        md = NVE(LennardJones(sigma=3.40, epsilon=0.0104, cutoff=8.5, shift=True), dt=5.0,
                 n_steps=10**9, skin=1.0)
        state0 = jax.block_until_ready(md.init(batch))
        limit = jnp.asarray(STEPS, jnp.int32)
        for tag, opts in OPTIONS.items():
            fn = jax.jit(lambda s: chunk_steps(md, s, batch, limit, length=STEPS)[0], compiler_options=opts)
            build = jax.jit(lambda p: neighbors.build(state0.neighbors.spec, p, batch.cell, batch).indices,
                            compiler_options=opts)
            state = jax.block_until_ready(fn(state0))
            d2h, graphs, kernels = trace_counts(fn, state)
            rows.append({"construct": f"NVE run_chunk {name}", "options": tag, "method": state0.neighbors.spec.method,
                         "step_us": 1e6 * timed(fn, state, 3) / STEPS, "build_us": 1e6 * timed(build, state.positions),
                         "d2h_per_step": d2h / STEPS, "gpu_events": kernels, "xla_flags": flags,
                         "rebuilds": int(np.asarray(state.neighbors.rebuilds).max())})
            print(json.dumps(rows[-1]), flush=True)
    if args.step_variants:
        rows += step_variants(args.step_variants)
    emit([{"benchmark": "probe_syncs", **r} for r in rows], args.out)


def step_variants(batches):
    """The rebuild test of a step: in one pass over the atoms (behind a conditional on cell
    changes, a node of the step's graph) or per system, with the library's chunk options.
    (On 2026-11-29 this also compared failure marking gated by one finiteness test: slower
    at every size, removed.)"""
    from nvalchemi_jax import neighbors
    from nvalchemi_jax.dynamics import NVE
    from nvalchemi_jax.dynamics.run import CHUNK_COMPILER_OPTIONS, chunk_steps
    from nvalchemi_jax.models import LennardJones
    chosen = neighbors.any_needs_rebuild
    tests = {"one_pass": neighbors.one_pass_needs_rebuild,
             "per_system": lambda nl, p, c, b: jnp.any(neighbors.needs_rebuild(nl, p, c, b))}
    rows = []
    for b in batches:
        batch = batch_of(*nve_inputs(b, 4))
        for rebuild, test in tests.items():
            neighbors.any_needs_rebuild = test
            md = NVE(LennardJones(sigma=3.40, epsilon=0.0104, cutoff=8.5, shift=True), dt=5.0,
                     n_steps=10**9, skin=1.0)
            state = jax.block_until_ready(md.init(batch))
            limit = jnp.asarray(STEPS, jnp.int32)
            fn = jax.jit(lambda s: chunk_steps(md, s, batch, limit, length=STEPS)[0],
                         compiler_options=CHUNK_COMPILER_OPTIONS)
            state = jax.block_until_ready(fn(state))
            rows.append({"construct": f"NVE step variants W1 B={b} x 256", "rebuild_test": rebuild,
                         "step_us": 1e6 * timed(fn, state, 5) / STEPS})
            print(json.dumps(rows[-1]), flush=True)
    neighbors.any_needs_rebuild = chosen
    return rows

if __name__ == "__main__":
    main()
