"""W3: relaxation throughput, host-side batch building included, against the peers.

Dataset: 10,000 FCC argon crystals of 108 atoms (3x3x3 cubic cells, a = 5.26 Å); sample i
rattled by ``numpy.random.default_rng(i).normal(0, 0.1, (108, 3))`` Å. FIRE (ASE's
parameters) to max |F| <= 0.01 eV/Å; LJ σ 3.40 Å, ε 0.0104 eV, cutoff 8.5 Å, smoothed over
the last 0.5 Å (ASE's switch, 8.0 -> 8.5 Å). Rows:

* ``fixed``: one batch of all structures; ``inflight``: a SizeAwareSampler refilling a
  batch of ``--batch-size`` slots every ``--refill`` steps (results to host memory);
  ``inflight on device``: the same with the dataset on the device and refills decided there
  every ``--device-refill`` steps (several values: a row each) (``run(..., on_device=True)``, ``--device-chunk`` steps
  per compiled call);
* the same two on a mixed-size set (32-500 atoms), fixed batches in dataset order
  (``--mixed-repeats``: alternating runs of both, and a row of their medians);
* fused FIRE -> Langevin NVT (1,000 steps at 40 K) on ``--fused-count`` structures;
* peers: nvalchemi (inflight and fixed), torch-sim (fixed), ASE on the CPU (a few).

Timings exclude compilation (a warm-up on the same shapes runs first; ``compilations``
counts any that still happened in the timed part).

    python benchmarks/bench_w3_relax.py --count 10000 --batch-size 2048 --out results/w3.jsonl
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")   # leave GPU memory to torch peers

import argparse
import contextlib
import time

import jax
import numpy as np

import nvalchemi_jax as nj
import peers
from _report import emit
from nvalchemi_jax.dynamics import FIRE, ConvergenceHook, HostMemory, NVTLangevin, SizeAwareSampler
from nvalchemi_jax.models import LennardJones

MODEL = LennardJones(sigma=3.40, epsilon=0.0104, cutoff=8.5, switch_on=8.0)


@contextlib.contextmanager
def compilations():
    """Counts XLA compilations (their seconds, and the compiled functions' names) inside the block."""
    seen = {"count": 0, "seconds": 0.0, "names": []}

    def listener(name, secs, **kwargs):
        if name == "/jax/core/compile/backend_compile_duration":
            seen["count"] += 1
            seen["seconds"] += secs
            seen["names"].append(str(kwargs.get("fun_name", "?")))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def mixed_inputs(count, seed=0):
    """FCC argon with a x b x c cubic cells (4abc atoms, 32 to 500), rattled 0.1 Å."""
    shapes = [(a, b, c) for a in range(2, 6) for b in range(2, 6) for c in range(2, 6)
              if 32 <= 4 * a * b * c <= 500]
    positions, cells = [], []
    for i in range(count):
        rng = np.random.default_rng(seed + i)
        reps = shapes[rng.integers(len(shapes))]
        pos, cell = peers.fcc_argon(1)
        grid = np.stack(np.meshgrid(*[np.arange(r) for r in reps], indexing="ij"), -1).reshape(-1, 1, 3)
        p = (pos[None] + grid * 5.26).reshape(-1, 3)
        positions.append((p + rng.normal(0, 0.1, p.shape)).astype(np.float32))
        cells.append(np.diag(np.array(reps) * 5.26).astype(np.float32))
    return positions, cells


def as_items(positions, cells):
    return [{"positions": p, "atomic_numbers": np.full(len(p), 18), "cell": c, "pbc": np.ones(3, bool)}
            for p, c in zip(positions, cells)]


def relax(fmax, skin):
    return FIRE(MODEL, convergence=ConvergenceHook.from_fmax(fmax), skin=skin)


def summary(name, positions, steps_each, converged, seconds, **extra):
    steps_each = np.asarray(steps_each)
    work = float(sum(len(p) * s for p, s in zip(positions, steps_each)))
    return {"peer": "nvalchemi-jax", "version": nj.__version__, "mode": name,
            "structures": len(positions), "atoms": int(sum(len(p) for p in positions)),
            "seconds": seconds, "structures_per_s": len(positions) / seconds,
            "mean_steps": float(steps_each.mean()), "max_steps": int(steps_each.max()),
            "converged": int(np.sum(converged)), "all_converged": bool(np.all(converged)),
            "atom_steps_per_s": work / seconds, **extra}


def fixed_batches(positions, cells, batch_size, fmax, skin, chunk, max_steps):
    """Batches of ``batch_size`` in dataset order, one after another, all with one capacity."""
    groups = [slice(s, s + batch_size) for s in range(0, len(positions), batch_size)]
    capacity = nj.Capacity.for_systems([max(sum(len(p) for p in positions[g]) for g in groups)])
    capacity = nj.Capacity(min(batch_size, len(positions)), capacity.num_atoms)
    dyn = relax(fmax, skin)
    steps, converged = [], []
    t0 = time.perf_counter()
    for g in groups:
        batch = nj.Batch.from_arrays(positions=positions[g], atomic_numbers=[np.full(len(p), 18) for p in positions[g]],
                                     cell=cells[g], pbc=[np.ones(3, bool)] * len(positions[g]),
                                     capacity=capacity, min_distance=None)
        result = dyn.run(batch, max_steps=max_steps, chunk_size=chunk)
        mask = np.asarray(batch.system_mask)
        steps += np.asarray(result.state.step)[mask].tolist()
        converged += result.converged[mask].tolist()
    return time.perf_counter() - t0, steps, converged


def inflight(positions, cells, batch_size, fmax, skin, refill, atoms_per_slot, on_device=False, chunk=100):
    items = as_items(positions, cells)
    t0 = time.perf_counter()
    sampler = SizeAwareSampler(items, nj.Capacity(batch_size, batch_size * atoms_per_slot),
                               sizes=[len(p) for p in positions])
    sink = HostMemory()
    result = relax(fmax, skin).run(sampler=sampler, sinks=[sink], refill_frequency=refill,
                                   on_device=on_device, chunk_size=chunk)
    frames = sink.read()
    seconds = time.perf_counter() - t0
    order = np.argsort(frames.sample_id)
    extra = {"refills": result.refills, "regrows": result.regrows, "occupancy": result.occupancy,
             "padding_efficiency": result.padding_efficiency, "engine_steps": result.steps}
    return seconds, frames.step[order], frames.status[order] >= 0, extra


def timed(fn, warm_args, args):
    """Warm-up on ``warm_args`` (same shapes; None: already warm), then the timed call with
    compilations counted."""
    t0 = time.perf_counter()
    if warm_args is not None:
        fn(*warm_args)
    warm = time.perf_counter() - t0
    with compilations() as seen:
        out = fn(*args)
    return out, {"compile_or_warmup_s": warm, "compilations": seen["count"],
                 "compile_seconds_in_timed_run": seen["seconds"]}


def ours_workloads(a, pos, cells, few, report):
    """Our rows: argon108 fixed and inflight, the mixed set both ways, the fused stage."""
    if a.mixed_only:
        mixed_set(a, report)
        return
    (sec, steps, conv), info = timed(
        lambda q, c: fixed_batches(q, c, len(q), a.fmax, a.skin, a.chunk, a.max_steps),
        (pos, cells), (pos, cells))
    report(summary("fixed", pos, steps, conv, sec, dataset="argon108", **info))
    (sec, steps, conv, extra), info = timed(
        lambda q, c: inflight(q, c, a.batch_size, a.fmax, a.skin, a.refill, 108),
        (pos[:few * 2], cells[:few * 2]), (pos, cells))
    report(summary("inflight", pos, steps, conv, sec, dataset="argon108", batch_size=a.batch_size,
                   refill_frequency=a.refill, **extra, **info))
    # The pool's shape is the dataset's: warmed up on the whole set.
    for every in a.device_refill:
        (sec, steps, conv, extra), info = timed(
            lambda q, c: inflight(q, c, a.batch_size, a.fmax, a.skin, every, 108, True, a.device_chunk),
            (pos, cells), (pos, cells))
        report(summary("inflight on device", pos, steps, conv, sec, dataset="argon108", batch_size=a.batch_size,
                       refill_frequency=every, chunk_size=a.device_chunk, **extra, **info))

    if a.mixed_count > 0:
        mixed_set(a, report)

    if a.fused_count < 1:
        return
    fpos, fcells = pos[:a.fused_count], cells[:a.fused_count]
    fused = relax(a.fmax, a.skin) + NVTLangevin(MODEL, dt=5.0, temperature=40.0, friction=0.01,
                                                n_steps=a.fused_steps, skin=a.skin)

    def run_fused(q, c):
        batch = nj.Batch.from_arrays(positions=q, atomic_numbers=[np.full(len(x), 18) for x in q], cell=c,
                                     pbc=[np.ones(3, bool)] * len(q), min_distance=None)
        t0 = time.perf_counter()
        result = fused.run(batch, max_steps=a.max_steps + a.fused_steps, chunk_size=a.chunk)
        jax.block_until_ready(result.state)
        return time.perf_counter() - t0, result

    (sec, result), info = timed(run_fused, (fpos, fcells), (fpos, fcells))
    atoms = sum(len(q) for q in fpos)
    report({"peer": "nvalchemi-jax", "mode": "fused FIRE -> NVT Langevin", "structures": len(fpos),
            "atoms": atoms, "md_steps": a.fused_steps, "engine_steps": result.steps, "seconds": sec,
            "atom_steps_per_s": atoms * result.steps / sec,
            "all_finished": bool(result.converged[np.asarray(result.state.status) >= 0].all()), **info})


def mixed_set(a, report):
    """The mixed-size set: fixed batches, inflight, and inflight on device at each
    ``--device-refill``, ``--mixed-repeats`` rounds, the order reversed every other round
    (one run of each has been seen to swap places with the other); with several rounds, a
    row of the medians and how often each inflight mode beat fixed batches."""
    mpos, mcells = mixed_inputs(a.mixed_count)
    mean = int(np.ceil(np.mean([len(q) for q in mpos])))
    fixed = lambda q, c: fixed_batches(q, c, a.mixed_batch, a.fmax, a.skin, a.chunk, a.max_steps)
    flying = lambda q, c: inflight(q, c, a.mixed_batch, a.fmax, a.skin, a.refill, int(1.3 * mean))
    rates = {}

    def run_fixed(r):
        (sec, steps, conv), info = timed(fixed, (mpos, mcells) if r == 0 else None, (mpos, mcells))
        return "fixed batches", summary("fixed batches", mpos, steps, conv, sec, dataset="mixed 32-500",
                                        batch_size=a.mixed_batch, repeat=r, **info)

    def run_inflight(r):
        warm = (mpos[:a.mixed_batch * 2], mcells[:a.mixed_batch * 2]) if r == 0 else None
        (sec, steps, conv, extra), info = timed(flying, warm, (mpos, mcells))
        return "inflight", summary("inflight", mpos, steps, conv, sec, dataset="mixed 32-500",
                                   batch_size=a.mixed_batch, refill_frequency=a.refill, repeat=r, **extra, **info)

    def device_run(every):
        def run(r):
            go = lambda q, c: inflight(q, c, a.mixed_batch, a.fmax, a.skin, every, int(1.3 * mean), True,
                                       a.device_chunk)
            (sec, steps, conv, extra), info = timed(go, (mpos, mcells) if r == 0 else None, (mpos, mcells))
            return f"inflight on device {every}", summary(
                "inflight on device", mpos, steps, conv, sec, dataset="mixed 32-500", batch_size=a.mixed_batch,
                refill_frequency=every, chunk_size=a.device_chunk, repeat=r, **extra, **info)
        return run

    for r in range(a.mixed_repeats):
        # Round 0 compiles each (fixed first); later rounds reverse the order.
        order = [run_fixed, run_inflight] + [device_run(every) for every in a.device_refill]
        for run in (order if r % 2 == 0 else order[::-1]):
            key, row = run(r)
            rates.setdefault(key, []).append(row["structures_per_s"])
            report(row)
    if a.mixed_repeats > 1:
        fixed_rates = rates.pop("fixed batches")
        row = {"peer": "nvalchemi-jax", "mode": "mixed medians", "dataset": "mixed 32-500",
               "repeats": a.mixed_repeats, "fixed_batches_structures_per_s": float(np.median(fixed_rates))}
        for key, values in rates.items():
            name = key.replace(" ", "_")
            row[f"{name}_structures_per_s"] = float(np.median(values))
            row[f"{name}_over_fixed"] = float(np.median(values) / np.median(fixed_rates))
            row[f"{name}_wins"] = int(sum(v > f for v, f in zip(values, fixed_rates)))
        report(row)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=64, help="inflight slots")
    p.add_argument("--refill", type=int, default=10)
    p.add_argument("--device-refill", type=int, nargs="*", default=[10],
                   help="refill frequencies of inflight on device (a row each)")
    p.add_argument("--device-chunk", type=int, default=100, help="steps per compiled call of inflight on device")
    p.add_argument("--mixed-count", type=int, default=100, help="0: no mixed set")
    p.add_argument("--mixed-only", action="store_true", help="of our rows, only the mixed set's")
    p.add_argument("--mixed-batch", type=int, default=32)
    p.add_argument("--mixed-repeats", type=int, default=1, help="alternating runs of both on the mixed set")
    p.add_argument("--fused-count", type=int, default=32)
    p.add_argument("--fused-steps", type=int, default=1000)
    p.add_argument("--fmax", type=float, default=0.01)
    p.add_argument("--skin", type=float, default=1.0)
    p.add_argument("--chunk", type=int, default=50)
    p.add_argument("--max-steps", type=int, default=3000)
    p.add_argument("--peers", nargs="*", default=["nvalchemi:inflight", "nvalchemi:fixed", "torch-sim", "ase"])
    p.add_argument("--peer-count", type=int, default=None, help="structures for torch-sim (default --count)")
    p.add_argument("--ase-count", type=int, default=10)
    p.add_argument("--peers-only", action="store_true", help="skip our runs (peers alone)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    rows = []
    pos, cells = peers.relax_inputs(a.count)
    pos, cells = list(pos), list(cells)
    few = max(1, min(len(pos), a.batch_size))

    def report(row):
        rows.append(row)
        emit([row])

    if not a.peers_only:
        ours_workloads(a, pos, cells, few, report)
    mine = {r["mode"]: r for r in rows if r.get("dataset") == "argon108"}
    for spec in a.peers:
        name, _, mode = spec.partition(":")
        count = a.ase_count if name == "ase" else (a.peer_count or a.count)
        try:
            r = peers.fire_relax(name, pos[:count], cells[:count], fmax=a.fmax, smoothing=0.5,
                                 batch_size=a.batch_size, mode=mode or "fixed")
        except peers.PeerSkipped as e:
            report({"peer": name, "mode": mode, "skipped": str(e)})
            continue
        except Exception as e:  # noqa: BLE001 - a peer crashing must not lose our numbers
            report({"peer": name, "mode": mode, "failed": f"{type(e).__name__}: {e}"[:300]})
            continue
        r["peer_device"] = r.pop("device", None)
        report({"dataset": "argon108", "mode": mode or "fixed", **r})
        for ours in mine.values():
            ours[f"ratio_vs_{spec}"] = ours["structures_per_s"] / r["structures_per_s"]
    emit([{"benchmark": "W3", **r} for r in rows], a.out)


if __name__ == "__main__":
    main()
