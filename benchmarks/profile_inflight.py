"""Where the time of inflight on device goes: one compiled call (``--chunk`` steps, a refill
every ``--refill``) of W3's argon108 relaxation, against ``--chunk`` plain steps of the same
batch, with per-kernel GPU time and device-to-host copies from a profiler trace.

    python benchmarks/profile_inflight.py --count 10000 --batch-size 2048 --refill 5 --out results/x.jsonl
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import nvalchemi_jax as nj
import peers
from _report import device_to_host, emit, gpu_kernels, kernel_table
from bench_w3_relax import as_items, relax
from nvalchemi_jax.dynamics import SizeAwareSampler, device_inflight
from nvalchemi_jax.dynamics.run import run_chunk


def traced(fn, top):
    """Wall seconds of ``fn()`` (warm), and on a GPU its kernel table and device-to-host copies."""
    jax.block_until_ready(fn())
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    wall = time.perf_counter() - t0
    if jax.default_backend() != "gpu":
        return wall, {}, 0
    total, count = gpu_kernels(fn)
    return wall, kernel_table(total, count, top), device_to_host(count)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--refill", type=int, default=5)
    p.add_argument("--chunk", type=int, default=100)
    p.add_argument("--skin", type=float, default=1.0)
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    pos, cells = peers.relax_inputs(a.count)
    dyn = relax(0.01, a.skin)
    sampler = SizeAwareSampler(as_items(list(pos), list(cells)), nj.Capacity(a.batch_size, a.batch_size * 108),
                               sizes=[len(q) for q in pos])
    state, slots, pool, starts, sizes = device_inflight.start(dyn, sampler, sampler.take_all())
    count, budget = jnp.int32(len(sizes)), jnp.int32(device_inflight.UNLIMITED)
    periods = -(-a.chunk // a.refill)
    rows = []

    def call():
        return device_inflight.advance(dyn, state, slots, pool, starts, count, budget, length=a.refill,
                                       periods=periods)

    def plain():
        return run_chunk(dyn, state, slots.batch, a.chunk, length=a.chunk)

    for name, fn in (("inflight on device, one call", call), ("plain chunk, same batch", plain)):
        wall, kernels, d2h = traced(fn, a.top)
        out = fn()
        steps = int(np.asarray(out[3][1] if name.startswith("inflight") else out[1][1][1]))
        rows.append({"benchmark": "profile_inflight", "case": name, "structures": a.count,
                     "batch_size": a.batch_size, "refill_frequency": a.refill, "steps": steps,
                     "seconds": wall, "ms_per_step": 1e3 * wall / max(steps, 1), "device_to_host_copies": d2h,
                     "kernels_us": kernels})
        emit(rows[-1:])
    emit(rows, a.out)


if __name__ == "__main__":
    main()
