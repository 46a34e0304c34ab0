"""Where a run's time goes outside its kernels: the host's work to launch each chunk, and
the run loop's fixed costs (W2 by default: one crystal of 32,000 argon atoms, 1.3 Å skin).

A GPU chunk is a CUDA graph (``run.CHUNK_COMPILER_OPTIONS``); XLA updates the graph's
nodes on the host when a launch's buffers differ from the last one's, which every chained
chunk's do. Modes, each printing one JSON object (appended to ``--out``):

- ``overhead``: ``run()`` of 1,000 steps against chained ``run_chunk`` calls (chunks of 100
  and 1,000 steps), and the host-side pieces of ``run()``;
- ``variants``: the host time to launch one chunk (median) and 10 chained chunks' wall time,
  for the chunk compiled as the library does, with fewer persistent segments, without
  XLA's loop unrolling in command buffers, and with the state donated;
- ``sync-first``: ``run()`` alone against ``run()`` preceded by a host test of whether any
  system runs (what ``run`` did before its first chunk until 2026-11-29), alternating;
- ``pieces``: where ``run()``'s time beyond its chunks goes: chained chunks launched from
  this thread, then from the launcher thread, then through ``dispatch`` and waited for
  chunk by chunk as ``run`` does, then ``run()`` itself; 10 x 100 and 1 x 1,000 steps;
- ``queue-ab``: ``run()`` of ``--steps`` in chunks of ``--chunk`` as it was before
  2026-11-29 (result fields fetched one by one at the end, every launch from the launcher
  thread), as it is (the result fields copied as each chunk ends), and with 2 and 3 chunks
  queued ahead; alternating, in one process;
- ``profile``: ``cProfile`` of ten ``run()`` calls (10 x 100 steps): the host functions
  that take its time, waits included;
- ``lengths``: one chunk at lengths 10 to 2,000 steps, launched on an idle device: host
  launch time and time to result (slope: device time per step; intercept: fixed cost);
- ``host-trace``: ``jax.profiler``'s host and device events over 20 launches of a 10-step
  chunk, per launch: what the host does to launch one;
- ``stamps``: ``run()``'s loop rebuilt here with the host's clock read at each chunk's
  launch (its queuing, its launch done) and settling, alternating with ``run()``
  itself and with chunks chained by hand: when each chunk's result reaches the host;
- ``copies``: what ``run()`` adds to chunks chained by hand, one piece at a time: the
  flags copied to the host after each chunk, every field ``run`` copies, each chunk waited
  for one chunk behind (``run``'s queue), the launcher thread (every chunk launched from
  it, as ``run`` did until 2026-11-30), then ``run()`` itself;
  alternating, medians;
- ``launches``: ``run()`` of ``--steps`` in chunks of ``--chunk`` with the host's time in
  each chunk's launch recorded (``run_chunk``, or ``run_chained_chunk`` where a version has it),
  against the run's wall time per chunk: the host's margin;
- ``timeline``: ``jax.profiler``'s device events of one ``run()`` of ``--steps`` in chunks of
  ``--chunk``: when the device starts and stops within the run, its idle time, the largest
  idle gaps with the kernels either side, and the time between the big kernels' launches.
  The profiler slows launches of graphs with many nodes (W2 at 32,000 atoms: 126 ms traced
  against 33 ms), so read its proportions, not its times.

    python benchmarks/probe_dispatch.py variants --repeats 20 --out results/probe_dispatch.jsonl
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from _nve import LJ, batch_of
from _report import header, median_seconds, traced_events
from peers import nve_inputs
from nvalchemi_jax.dynamics import NVE, persistent
from nvalchemi_jax.dynamics.run import CHUNK_COMPILER_OPTIONS, chunk_steps, fused_paths, run_chunk
from nvalchemi_jax.models import LennardJones

STATICS = ("length", "resident", "fused", "parts", "grid")


def timed(f, n=5):
    """Median wall time of ``f()`` in µs, waited for (after one untimed call)."""
    return median_seconds(f, repeat=n) * 1e6


def overhead(md, batch, state, path):
    out = {}
    for chunk in (100, 1000):
        md.run(batch, state=state, max_steps=chunk, chunk_size=chunk)
        out[f"run_1000_chunk{chunk}_us"] = timed(
            lambda: md.run(batch, state=state, max_steps=1000, chunk_size=chunk).state, 3)
        out[f"run_{chunk}_chunk{chunk}_us"] = timed(
            lambda: md.run(batch, state=state, max_steps=chunk, chunk_size=chunk).state, 3)

        def raw(k):
            s = state
            for _ in range(k):
                s, _ = run_chunk(md, s, batch, chunk, length=chunk, **path)
            return s
        out[f"raw_{1000 // chunk}x{chunk}_us"] = timed(lambda: raw(1000 // chunk), 3)
        out[f"raw_1x{chunk}_us"] = timed(lambda: raw(1), 5)
    out["check_us"] = timed(lambda: md.check(batch), 5)
    out["fused_paths_us"] = timed(lambda: fused_paths(md, batch), 5)
    out["any_running_us"] = timed(lambda: bool(jnp.any(md.running(state, batch))), 5)
    out["run_0_us"] = timed(lambda: md.run(batch, state=state, max_steps=0).state, 5)
    return out


def variants(md, batch, state, path):
    out = {}

    def series(name, options, segments=persistent.SEGMENTS, donate=False, n=10):
        kept = persistent.SEGMENTS
        persistent.SEGMENTS = segments
        jax.clear_caches()
        try:
            fn = jax.jit(chunk_steps, static_argnames=STATICS, compiler_options=options,
                         donate_argnames=("state",) if donate else ())
            r, _ = fn(md, jax.tree.map(jnp.copy, state), batch, 100, length=100, **path)
            jax.block_until_ready(r)
            s = r if donate else state
            ts = []
            t00 = time.perf_counter()
            for _ in range(n):
                t0 = time.perf_counter()
                s, _ = fn(md, s, batch, 100, length=100, **path)
                ts.append((time.perf_counter() - t0) * 1e6)
            jax.block_until_ready(s)
            total = (time.perf_counter() - t00) * 1e6
            out[name] = {"dispatch_us_median": float(np.median(ts[2:])), "total_us": round(total),
                         "us_per_step": total / n / 100}
        except Exception as e:  # noqa: BLE001 - an option this XLA lacks
            out[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
        finally:
            persistent.SEGMENTS = kept
        print(name, out[name], flush=True)

    series("base", CHUNK_COMPILER_OPTIONS)
    series("segments2", CHUNK_COMPILER_OPTIONS, segments=2)
    series("segments1", CHUNK_COMPILER_OPTIONS, segments=1)
    series("va_remap", {**CHUNK_COMPILER_OPTIONS, "xla_gpu_enable_command_buffer_va_remapping": True})
    series("no_cb_unroll", {**CHUNK_COMPILER_OPTIONS, "xla_gpu_command_buffer_unroll_loops": False})
    series("donate", CHUNK_COMPILER_OPTIONS, donate=True)
    jax.clear_caches()
    md.run(batch, state=state, max_steps=100, chunk_size=100)
    out["run_1000_chunk100_us"] = timed(
        lambda: md.run(batch, state=state, max_steps=1000, chunk_size=100).state, 3)
    return out


def sync_first(md, batch, state, path):
    bool(jnp.any(md.running(state, batch)))
    res = {"plain": [], "synced_first": []}
    for rep in range(6):
        for name in (("plain", "synced_first") if rep % 2 else ("synced_first", "plain")):
            t0 = time.perf_counter()
            if name == "synced_first":
                bool(jnp.any(md.running(state, batch)))
            r = md.run(batch, state=state, max_steps=1000, chunk_size=100)
            jax.block_until_ready(r.state)
            res[name].append((time.perf_counter() - t0) * 1e3)
    return {k: {"ms": [round(x, 2) for x in v], "median_ms": float(np.median(v))} for k, v in res.items()}


def pieces(md, batch, state, path):
    from nvalchemi_jax.dynamics.run import dispatch

    def main_thread(k, n):
        s = state
        for _ in range(k):
            s, _ = run_chunk(md, s, batch, n, length=n, **path)
        return s

    def launcher(k, n):
        s = state
        for _ in range(k):
            s = dispatch(md, s, batch, n, n, worker=True, **path)
        return s.state

    def settled(k, n):         # run()'s loop: queue chunk i + 1, then settle chunk i
        current = dispatch(md, state, batch, n, n, **path)
        for i in range(k):
            following = dispatch(md, current, batch, n, n, **path) if i + 1 < k else None
            current.settle()
            if following is None:
                return current.state
            current = following

    out = {}
    for k, n in ((10, 100), (1, 1000)):
        tag = f"{k}x{n}"
        md.run(batch, state=state, max_steps=k * n, chunk_size=n)
        out[f"main_thread_{tag}_us"] = timed(lambda: main_thread(k, n), 7)
        out[f"launcher_{tag}_us"] = timed(lambda: launcher(k, n), 7)
        out[f"settled_{tag}_us"] = timed(lambda: settled(k, n), 7)
        out[f"run_{tag}_us"] = timed(lambda: md.run(batch, state=state, max_steps=k * n, chunk_size=n).state, 7)
        print(tag, {key: round(v) for key, v in out.items() if tag in key}, flush=True)
    return out


def queue_ab(md, batch, state, path, steps=1000, chunk=100, rounds=8):
    from nvalchemi_jax.dynamics import run as run_module

    new_dispatch = run_module.dispatch

    def old_dispatch(dyn, state, batch, limit, length, prepare=None, **statics):
        def launch():     # the launch before 2026-11-29 (session 15): records and flags only
            start = state.state if isinstance(state, run_module.Chunk) else state
            new, (buffers, flags) = run_chunk(dyn, start, batch, limit, length=length, **statics)
            for leaf in jax.tree.leaves((buffers, flags)):
                leaf.copy_to_host_async()
            return start, new, buffers, flags
        return run_module.Chunk(run_module._LAUNCHER.submit(run_module._in_callers_settings(launch)), limit)

    variants = {"before": (1, old_dispatch), "copies": (1, new_dispatch),
                "queued2": (2, new_dispatch), "queued3": (3, new_dispatch)}
    kept = run_module.QUEUED_AHEAD
    times = {name: [] for name in variants}
    try:
        for r in range(rounds):
            for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
                run_module.QUEUED_AHEAD, run_module.dispatch = variants[name]
                md.run(batch, state=state, max_steps=chunk, chunk_size=chunk)   # warm
                t0 = time.perf_counter()
                jax.block_until_ready(md.run(batch, state=state, max_steps=steps, chunk_size=chunk).state)
                times[name].append((time.perf_counter() - t0) * 1e3)
    finally:
        run_module.QUEUED_AHEAD, run_module.dispatch = kept, new_dispatch
    out = {"steps": steps, "chunk": chunk,
           **{name: {"ms": [round(t, 2) for t in v], "median_ms": float(np.median(v)),
                     "atom_steps_per_s": float(batch.num_atoms * steps / np.median(v) * 1e3)}
              for name, v in times.items()}}
    print({k: (v["median_ms"] if isinstance(v, dict) else v) for k, v in out.items()}, flush=True)
    return out


def profile(md, batch, state, path):
    import cProfile
    import io
    import pstats

    md.run(batch, state=state, max_steps=1000, chunk_size=100)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(10):
        jax.block_until_ready(md.run(batch, state=state, max_steps=1000, chunk_size=100).state)
    prof.disable()
    out = {}
    for order in ("tottime", "cumulative"):
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats(order).print_stats(30)
        out[order] = text.getvalue().splitlines()
        print("\n".join(out[order]), flush=True)
    text = io.StringIO()
    pstats.Stats(prof, stream=text).print_callers("asarray|_value")   # which waits are whose
    out["callers"] = text.getvalue().splitlines()
    print("\n".join(out["callers"]), flush=True)
    return out


def lengths(md, batch, state, path):
    """One chunk, launched when the device is idle, at several lengths: the host's time to
    launch it and the time to its result (medians of 9); the slope between lengths is the
    device time per step, the intercept the chunk's fixed cost. Then ``run()`` of 1,000
    steps in chunks of 500 and of 1,000."""
    out = {"chunks": [], "runs": []}
    for length in (10, 100, 500, 1000, 2000):
        jax.block_until_ready(run_chunk(md, state, batch, length, length=length, **path))
        launch, total = [], []
        for _ in range(9):
            t0 = time.perf_counter()
            new = run_chunk(md, state, batch, length, length=length, **path)
            t1 = time.perf_counter()
            jax.block_until_ready(new)
            launch.append(t1 - t0)
            total.append(time.perf_counter() - t0)
        out["chunks"].append({"length": length, "launch_us": 1e6 * float(np.median(launch)),
                              "total_us": 1e6 * float(np.median(total))})
        print(json.dumps(out["chunks"][-1]), flush=True)
    for chunk in (500, 1000):
        md.run(batch, state=state, max_steps=1000, chunk_size=chunk)
        out["runs"].append({"chunk": chunk, "run_1000_us": timed(
            lambda: md.run(batch, state=state, max_steps=1000, chunk_size=chunk).state, 7)})
    return out


def host_trace(md, batch, state, path, launches=20, top=40):
    """``jax.profiler`` over ``launches`` launches of a 10-step chunk, each waited for: the
    host's events (PJRT's execute, XLA's thunks and CUDA graph updates, transfers of
    arguments, Python) and the device's, in µs per launch, the largest first."""
    from collections import defaultdict

    for _ in range(3):
        jax.block_until_ready(run_chunk(md, state, batch, 10, length=10, **path))
    launch = []

    def launches_waited():
        for _ in range(launches):
            t0 = time.perf_counter()
            new = run_chunk(md, state, batch, 10, length=10, **path)
            launch.append(time.perf_counter() - t0)
            jax.block_until_ready(new)

    events = traced_events(launches_waited)
    if not events:
        raise RuntimeError("jax.profiler wrote no Perfetto trace")
    total, count = defaultdict(float), defaultdict(int)
    for process, name, us, _ in events:
        key = ("device" if "/device:" in process else "host", name[:100])
        total[key] += us
        count[key] += 1
    ranked = sorted(total, key=total.get, reverse=True)[:top]
    rows = [{"where": w, "name": n, "us_per_launch": round(total[w, n] / launches, 1), "events": count[w, n]}
            for w, n in ranked]
    for row in rows:
        print(json.dumps(row), flush=True)
    return {"launch_us_median": 1e6 * float(np.median(launch)), "events": rows}


def stamps(md, batch, state, path, steps=1000, chunk=100, rounds=6):
    from nvalchemi_jax.dynamics.run import dispatch

    def loop():
        """run()'s loop without its overflow and early-end branches (neither happens here)."""
        t0 = time.perf_counter()
        marks = {"queued": [], "launched": [], "settled": []}
        pending, planned, current = [], 0, state
        while True:
            while len(pending) <= 1 and planned < steps:
                limit = min(chunk, steps - planned)
                c = dispatch(md, pending[-1] if pending else current, batch, limit, chunk, **path)
                c.launched.add_done_callback(lambda _: marks["launched"].append(time.perf_counter() - t0))
                marks["queued"].append(time.perf_counter() - t0)
                pending.append(c)
                planned += limit
            if not pending:
                break
            c = pending.pop(0)
            c.settle()
            marks["settled"].append(time.perf_counter() - t0)
            current = c.state
        np.asarray(current.status), int(current.global_step)
        marks["end"] = time.perf_counter() - t0
        return current, marks

    def by_hand():
        s = state
        for _ in range(steps // chunk):
            s, _ = run_chunk(md, s, batch, chunk, length=chunk, **path)
        return s

    jax.block_until_ready(loop()[0])
    jax.block_until_ready(by_hand())
    times = {"run": [], "loop": [], "by_hand": []}
    kept = []
    for r in range(rounds):
        for name in (list(times) if r % 2 == 0 else list(times)[::-1]):
            t0 = time.perf_counter()
            if name == "run":
                jax.block_until_ready(md.run(batch, state=state, max_steps=steps, chunk_size=chunk).state)
            elif name == "loop":
                s, marks = loop()
                jax.block_until_ready(s)
                kept.append(marks)
            else:
                jax.block_until_ready(by_hand())
            times[name].append((time.perf_counter() - t0) * 1e3)
    ms = lambda v: [round(1e3 * x, 3) for x in v]
    out = {"steps": steps, "chunk": chunk,
           **{name: {"ms": [round(t, 2) for t in v], "median_ms": float(np.median(v))} for name, v in times.items()},
           "marks_ms": [{k: (ms(v) if isinstance(v, list) else round(1e3 * v, 3)) for k, v in m.items()}
                        for m in kept]}
    print(json.dumps({k: (v["median_ms"] if isinstance(v, dict) else v) for k, v in out.items()
                      if k != "marks_ms"}), flush=True)
    for m in out["marks_ms"][:2]:
        print(json.dumps(m), flush=True)
    return out


def copies(md, batch, state, path, steps=1000, chunk=100, rounds=8):
    from nvalchemi_jax.dynamics.run import dispatch

    n = steps // chunk

    def by_hand(copy=None, settle=False):
        s, waiting = state, []
        for _ in range(n):
            s, (buffers, flags) = run_chunk(md, s, batch, chunk, length=chunk, **path)
            if copy == "flags":
                flags.copy_to_host_async()
            elif copy == "all":
                for leaf in jax.tree.leaves((buffers, flags, s.status, s.failure, s.global_step)):
                    leaf.copy_to_host_async()
            if settle:
                waiting.append(flags)
                if len(waiting) > 1:
                    np.asarray(waiting.pop(0))
        return s

    def worker():
        pending = [dispatch(md, state, batch, chunk, chunk, worker=True, **path)]
        for k in range(n):
            if k + 1 < n:
                pending.append(dispatch(md, pending[-1], batch, chunk, chunk, worker=True, **path))
            current = pending.pop(0)
            current.settle()
        return current.state

    variants = {"hand": lambda: by_hand(), "hand_flags": lambda: by_hand("flags"),
                "hand_all": lambda: by_hand("all"), "hand_all_settled": lambda: by_hand("all", True),
                "worker_settled": worker,
                "run": lambda: md.run(batch, state=state, max_steps=steps, chunk_size=chunk).state}
    for f in variants.values():
        jax.block_until_ready(f())
    times = {name: [] for name in variants}
    for r in range(rounds):
        for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
            t0 = time.perf_counter()
            jax.block_until_ready(variants[name]())
            times[name].append((time.perf_counter() - t0) * 1e3)
    out = {"steps": steps, "chunk": chunk,
           **{name: {"ms": [round(t, 3) for t in v], "median_ms": float(np.median(v))} for name, v in times.items()}}
    print(json.dumps({k: (round(v["median_ms"], 3) if isinstance(v, dict) else v) for k, v in out.items()}),
          flush=True)
    return out


def timeline(md, batch, state, path, steps=1000, chunk=100, top=25):
    """One ``run()`` under ``jax.profiler``: the device's kernels placed on the host's clock."""
    from collections import defaultdict

    for _ in range(2):
        jax.block_until_ready(md.run(batch, state=state, max_steps=steps, chunk_size=chunk).state)

    def one_run():
        with jax.profiler.TraceAnnotation("timeline_run"):
            return md.run(batch, state=state, max_steps=steps, chunk_size=chunk).state

    events = traced_events(one_run)
    runs = [(ts, us) for process, name, us, ts in events if name == "timeline_run"]
    if not runs:
        raise RuntimeError("jax.profiler wrote no trace of the run")
    t0, span = runs[0]
    device = sorted((ts, ts + us, name) for process, name, us, ts in events
                    if "/device:" in process and ts + us >= t0)
    if not device:
        raise RuntimeError("the trace holds no device events (timeline needs a GPU)")
    busy, gaps, end, last = 0.0, [], None, None
    for start, stop, name in device:
        if end is None:
            end, last = start, name
        if start > end:
            gaps.append((start - end, last, name))
        busy += max(0.0, stop - max(start, end))
        if stop >= end:
            end, last = stop, name
    pairs = defaultdict(lambda: [0.0, 0])
    for gap, before, after in gaps:
        pairs[before[:60], after[:60]][0] += gap
        pairs[before[:60], after[:60]][1] += 1
    ranked = sorted(pairs.items(), key=lambda kv: kv[1][0], reverse=True)[:top]
    kernels = defaultdict(float)
    for start, stop, name in device:
        kernels[name] += stop - start
    big = max(kernels, key=kernels.get)
    starts = [start for start, _, name in device if name == big]
    out = {"steps": steps, "chunk": chunk, "run_us": span, "device_first_after_us": device[0][0] - t0,
           "device_last_before_end_us": t0 + span - end, "device_span_us": end - device[0][0],
           "device_busy_us": busy, "device_idle_us": sum(g for g, _, _ in gaps), "kernels": len(device),
           "big_kernel": big[:90], "big_kernel_us": kernels[big], "big_kernel_launches": len(starts),
           "between_big_kernels_us": [round(b - a, 1) for a, b in zip(starts, starts[1:])],
           "gaps": [{"us": round(v[0], 1), "count": v[1], "before": k[0], "after": k[1]} for k, v in ranked]}
    print(json.dumps({k: v for k, v in out.items() if k != "gaps"}), flush=True)
    for row in out["gaps"]:
        print(json.dumps(row), flush=True)
    return out


def launches(md, batch, state, path, steps=1000, chunk=100, rounds=7):
    """``run()`` with the host's time in each chunk's compiled call recorded (``run_chunk``,
    or ``run_chained_chunk`` in versions that have it, such as the session-19 experiment
    with the state donated), and each run's wall time per chunk launched: how much of a
    chunk's time its compiled call takes on the host. The run loop's own work (the copies
    it queues, its waits) comes on top, so the margin a busy host eats into is smaller."""
    from nvalchemi_jax.dynamics import run as run_module

    names = [name for name in ("run_chunk", "run_chained_chunk") if hasattr(run_module, name)]
    originals = {name: getattr(run_module, name) for name in names}
    spent = []

    def timed_launch(name):
        def launch(*args, **kwargs):
            t0 = time.perf_counter()
            result = originals[name](*args, **kwargs)
            spent.append((name, (time.perf_counter() - t0) * 1e6))
            return result
        return launch

    jax.block_until_ready(md.run(batch, state=state, max_steps=steps, chunk_size=chunk).state)
    walls = []
    try:
        for name in names:
            setattr(run_module, name, timed_launch(name))
        for _ in range(rounds):
            t0 = time.perf_counter()
            jax.block_until_ready(md.run(batch, state=state, max_steps=steps, chunk_size=chunk).state)
            walls.append((time.perf_counter() - t0) * 1e6)
    finally:
        for name, fn in originals.items():
            setattr(run_module, name, fn)
    if not spent:
        raise RuntimeError(f"no chunk launch was timed: run() called none of {names}")
    used = sorted({name for name, _ in spent})
    per_launch = [us for _, us in spent]
    per_run = len(per_launch) / rounds      # more than steps / chunk when chunks end early
    out = {"steps": steps, "chunk": chunk, "launched": used, "launches": len(per_launch),
           "launches_per_run": per_run,
           "launch_us_median": float(np.median(per_launch)),
           "launch_us_quartiles": [float(q) for q in np.percentile(per_launch, [25, 75])],
           "launch_us_max": float(np.max(per_launch)), "run_us_median": float(np.median(walls)),
           "run_us": [round(w) for w in walls],
           "run_us_per_chunk": float(np.median(walls)) / per_run}
    print(json.dumps(out), flush=True)
    return out


MODES = {"overhead": overhead, "variants": variants, "sync-first": sync_first, "pieces": pieces,
         "queue-ab": queue_ab, "profile": profile, "lengths": lengths, "host-trace": host_trace, "timeline": timeline,
         "stamps": stamps, "copies": copies, "launches": launches}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=list(MODES))
    p.add_argument("--repeats", type=int, default=20, help="FCC cells per edge (20: 32,000 atoms)")
    p.add_argument("--count", type=int, default=1, help="crystals (W1: --count 1 --repeats 4 --skin 1)")
    p.add_argument("--skin", type=float, default=1.3)
    p.add_argument("--steps", type=int, default=1000, help="queue-ab, timeline, stamps, copies, launches: steps per run")
    p.add_argument("--chunk", type=int, default=100, help="queue-ab, timeline, stamps, copies, launches: steps per chunk")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    batch = batch_of(*nve_inputs(args.count, args.repeats))
    md = NVE(LennardJones(**LJ, shift=True), dt=5.0, n_steps=10**9, skin=args.skin)
    state = md.run(batch, max_steps=100, chunk_size=100).state
    jax.block_until_ready(state)
    path = fused_paths(md, batch)
    row = {**header(), "probe": args.mode, "atoms": int(batch.num_atoms), "systems": args.count, "skin": args.skin,
           "path": {k: int(v) for k, v in path.items()}}
    extra = (dict(steps=args.steps, chunk=args.chunk)
             if args.mode in ("queue-ab", "timeline", "stamps", "copies", "launches") else {})
    row.update(MODES[args.mode](md, batch, state, path, **extra))
    print(json.dumps(row))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
