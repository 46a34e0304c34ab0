"""Where a step's time goes: model evaluation (closed form vs autodiff), the neighbor-list
check, and the whole compiled step, for W1/W2-like systems. Prints JSON lines.

    python benchmarks/profile_step.py --batches 1 1024 --big 256000
"""

from __future__ import annotations

import argparse
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from _report import emit, gpu_kernels, kernel_table, median_seconds
from _nve import batch_of
from peers import nve_inputs
from nvalchemi_jax import _pallas, neighbors
from nvalchemi_jax.dynamics import NVE, leapfrog, persistent
from nvalchemi_jax.dynamics.run import CHUNK_COMPILER_OPTIONS, chunk_steps
from nvalchemi_jax.models import LennardJones, compute, pair_kernel


def variadic_row_sums(terms):
    """Alternative to ``pair._row_sums``: one variadic reduce for all terms (one kernel?)."""
    init = tuple(jnp.zeros((), t.dtype) for t in terms)
    return list(jax.lax.reduce(tuple(terms), init, lambda a, b: tuple(x + y for x, y in zip(a, b)), (1,)))


ROW_SUMS = {"separate": None, "variadic": variadic_row_sums}


def kernels_of(chunk, state, top=60):
    """Per-kernel GPU time of one chunk (see ``_report.kernel_table``)."""
    return kernel_table(*gpu_kernels(lambda: chunk(state)), top)


def kernel_blocks(model, batch, positions, nl, blocks):
    """Force pass by the fused kernel for each ``(rows, cols)`` block shape: time and the
    largest deviation from the XLA form (float32: ~1e-6 of the largest force)."""
    before = _pallas.mode()
    os.environ["NVALCHEMI_JAX_KERNELS"] = "xla"
    f = jax.jit(lambda p, nl: compute(model, p, batch.cell, batch, nl).forces)
    ref = f(positions, nl)
    out = {"xla": {"forces_us": 1e6 * median_seconds(f, positions, nl)}}
    default = pair_kernel.BLOCK_ROWS, pair_kernel.BLOCK_COLS, pair_kernel.NUM_WARPS
    for rows, cols, warps in blocks:
        pair_kernel.BLOCK_ROWS, pair_kernel.BLOCK_COLS, pair_kernel.NUM_WARPS = rows, cols, warps
        os.environ["NVALCHEMI_JAX_KERNELS"] = "pallas"
        f = jax.jit(lambda p, nl: compute(model, p, batch.cell, batch, nl).forces)
        try:
            err = float(jnp.max(jnp.abs(f(positions, nl) - ref)) / jnp.max(jnp.abs(ref)))
            out[f"{rows}x{cols}x{warps}"] = {"forces_us": 1e6 * median_seconds(f, positions, nl),
                                     "max_rel_err": err}
        except Exception as e:   # a block shape Triton rejects
            out[f"{rows}x{cols}x{warps}"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    os.environ["NVALCHEMI_JAX_KERNELS"] = before
    pair_kernel.BLOCK_ROWS, pair_kernel.BLOCK_COLS, pair_kernel.NUM_WARPS = default
    return out


def profile(name, batch, steps, trace=False, skin=0.5, row_sums="separate", blocks=(),
            method="auto", hlo_dir=None, path="engine"):
    model = LennardJones(sigma=3.40, epsilon=0.0104, cutoff=8.5, shift=True)
    md = NVE(model, dt=5.0, n_steps=10**9, skin=skin, neighbor_method=method)
    state = jax.block_until_ready(md.init(batch))
    nl, atoms = state.neighbors, int(np.asarray(batch.n_atoms).sum())
    row = {"case": name, "skin": skin, "row_sums": row_sums, "atoms": atoms, "K": nl.spec.max_neighbors, "method": nl.spec.method,
           "xla_flags": os.environ.get("XLA_FLAGS", "")}
    for how in ("auto", "autodiff"):
        f = jax.jit(lambda p, nl, how=how: compute(model, p, batch.cell, batch, nl, method=how).forces)
        row[f"forces_{how}_us"] = 1e6 * median_seconds(f, state.positions, nl)
    row["pair_kernel"] = _pallas.mode()
    if blocks:
        row["kernel_blocks"] = kernel_blocks(model, batch, state.positions, nl, blocks)
    row["needs_rebuild_us"] = 1e6 * median_seconds(jax.jit(lambda p, nl: neighbors.needs_rebuild(
        nl, p, batch.cell, batch)), state.positions, nl)
    row["build_us"] = 1e6 * median_seconds(jax.jit(lambda p: neighbors.build(nl.spec, p, batch.cell, batch).indices),
                                  state.positions, repeat=5)
    limit = jnp.asarray(steps, jnp.int32)
    row["path"] = path
    fused = path in ("leapfrog", "persistent") and leapfrog.plan(md, batch)
    if path != "engine" and not fused:
        raise SystemExit(f"--path {path}: this run does not qualify (on a GPU? NVALCHEMI_JAX_LEAPFROG?)")
    grid = persistent.programs(atoms) if path == "persistent" else 0
    row["grid"] = grid
    chunk = jax.jit(lambda s: chunk_steps(md, s, batch, limit, length=steps, fused=fused, grid=grid)[0],
                    compiler_options=CHUNK_COMPILER_OPTIONS)
    t0 = time.perf_counter()
    state = jax.block_until_ready(chunk(state))
    row["first_chunk_s"] = time.perf_counter() - t0
    row["step_us"] = 1e6 * median_seconds(chunk, state, repeat=3) / steps
    row["atom_steps_per_s"] = atoms / row["step_us"] * 1e6
    row["rebuilds"] = int(np.asarray(state.neighbors.rebuilds).max())
    if trace:
        row["kernels_us_count"] = kernels_of(chunk, state)
    hlo = chunk.lower(state).compile().as_text()
    if hlo_dir:     # to see what each kernel of the trace computes
        os.makedirs(hlo_dir, exist_ok=True)
        with open(os.path.join(hlo_dir, f"chunk_{re.sub(r'[^A-Za-z0-9]', '', name)}_skin{skin}.hlo.txt"), "w") as f:
            f.write(hlo)
    row["hlo_fusions"] = hlo.count(" fusion(") + hlo.count("=fusion(")
    row["hlo_conditionals"] = hlo.count(" conditional(")
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="*", default=[1, 16])
    p.add_argument("--big", type=int, nargs="*", default=[])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--skin", type=float, nargs="*", default=[0.5])
    p.add_argument("--row-sums", choices=list(ROW_SUMS), default="separate",
                   help="how the force pass sums its per-pair terms (an experiment)")
    p.add_argument("--blocks", nargs="*", default=[],
                   help="fused-kernel blocks to time, rows x cols x warps, e.g. 64x16x4 32x32x2")
    p.add_argument("--method", default="auto", help="neighbor-list method (auto, all_pairs, cell_list)")
    p.add_argument("--path", choices=("engine", "leapfrog", "persistent"), default="engine",
                   help="the chunk to time: the engine's scan, leapfrog steps in XLA, or the "
                        "persistent kernel")
    p.add_argument("--trace", action="store_true", help="add a per-kernel time table (GPU)")
    p.add_argument("--hlo-dir", default=None, help="write each chunk's optimized HLO here")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if ROW_SUMS[args.row_sums] is not None:
        from nvalchemi_jax.models import pair
        pair._row_sums = ROW_SUMS[args.row_sums]
    blocks = [tuple(int(v) for v in (b + "x4").split("x")[:3]) for b in args.blocks]
    rows = []
    for skin in args.skin:
        rows += [profile(f"B={b} x 256", batch_of(*nve_inputs(b, 4)), args.steps, args.trace, skin, args.row_sums,
                         blocks, args.method, args.hlo_dir, args.path) for b in args.batches]
        for n in args.big:
            side = round((n / 4) ** (1 / 3))
            rows.append(profile(f"1 x {4 * side**3}", batch_of(*nve_inputs(1, side)), args.steps, args.trace, skin,
                                args.row_sums, blocks, args.method, args.hlo_dir, args.path))
    emit([{"benchmark": "profile_step", **r} for r in rows], args.out)


if __name__ == "__main__":
    main()
