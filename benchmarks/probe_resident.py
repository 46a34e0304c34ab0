"""The resident NVE kernel's device time per step, per variant (W1: B crystals of 256 argon
atoms), without the run loop around it: one compiled ``resident.steps`` call of L and of 2L
steps, timed alternately; the slope between them is the time per step, the rest the call's
fixed cost. Variants set the split kernel's programs per system (``parts``), warps, column
block and one-block limit (``resident.WHOLE_TILE``).

    python benchmarks/probe_resident.py --batches 1 4 --variants p32:s4:t0 auto p64:w2 --out x.jsonl

A variant is ``auto`` (the library's choice) or ``pP`` (programs per system, 0: the unsplit
kernel; ``resident.parts_for``'s when left out) and any of ``wW`` (warps,
``SPLIT_WARPS``), ``sS`` (warps for blocks of at most ``SMALL_BLOCK`` pairs), ``cC``
(column block when a program's pairs are walked), ``tT`` (``WHOLE_TILE``: the most pairs a
program takes in one block), joined with ``:``. Unset knobs keep the library's values.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from _nve import LJ, batch_of
from _report import header
from peers import nve_inputs
from nvalchemi_jax.dynamics import NVE, resident
from nvalchemi_jax.models import LennardJones

KNOBS = {"w": "SPLIT_WARPS", "s": "SMALL_WARPS", "c": "SPLIT_COLS", "t": "WHOLE_TILE"}


def parse(variant):
    """``(programs per system or None, {knob: value})``."""
    parts, settings = None, {}
    for item in variant.split(":"):
        if item == "auto":
            continue
        if item[0] == "p":
            parts = int(item[1:])
        elif item[0] in KNOBS:
            settings[KNOBS[item[0]]] = int(item[1:])
        else:
            raise SystemExit(f"variant {variant!r}: unknown item {item!r}")
    return parts, settings


def per_step(md, batch, state, width, parts, length, repeats):
    """Median wall times of one call of ``length`` and of ``2 * length`` steps, alternating."""
    calls = {n: jax.jit(lambda s, n=n: resident.steps(md, s, batch, n, width, parts)) for n in (length, 2 * length)}
    for f in calls.values():
        jax.block_until_ready(f(state))
    times = {n: [] for n in calls}
    for _ in range(repeats):
        for n, f in calls.items():
            t0 = time.perf_counter()
            out = f(state)
            jax.block_until_ready(out)
            times[n].append(time.perf_counter() - t0)
    short, long = (float(np.median(times[n])) for n in (length, 2 * length))
    taken = int(out[1])
    return {"us_per_step": (long - short) / length * 1e6, "fixed_us": (2 * short - long) * 1e6,
            "call_ms": {str(n): float(np.median(t)) * 1e3 for n, t in times.items()}, "steps_taken": taken}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1])
    p.add_argument("--variants", nargs="+", default=["p32:s4:t0", "auto"],
                   help="p32:s4:t0: the split kernel as it was until 2026-11-30 (session 18)")
    p.add_argument("--length", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    md = NVE(LennardJones(**LJ, shift=True), dt=5.0, n_steps=10**9, skin=1.0)
    defaults = {name: getattr(resident, name) for name in KNOBS.values()}
    for count in args.batches:
        batch = batch_of(*nve_inputs(count, 4))
        state = md.run(batch, max_steps=10, chunk_size=10).state
        width = resident.plan(md, batch)
        for variant in args.variants:
            parts, settings = parse(variant)
            for name, value in {**defaults, **settings}.items():
                setattr(resident, name, value)
            if parts is None:
                parts = resident.parts_for(count, width)
            row = {**header(), "probe": "resident", "batch": count, "width": width, "variant": variant,
                   "parts": parts, **{name: getattr(resident, name) for name in KNOBS.values()}}
            try:
                row.update(per_step(md, batch, state, width, parts, args.length, args.repeats))
            except Exception as e:       # a variant that does not compile is reported, not fatal
                row["error"] = f"{type(e).__name__}: {e}"[:500]
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
