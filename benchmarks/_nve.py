"""W1/W2 machinery: NVE throughput of nvalchemi-jax and of each peer on identical inputs.

Inputs come from ``peers.nve_inputs`` (FCC argon, a = 5.26 Å, rattled 0.02 Å, 40 K
Maxwell-Boltzmann velocities); LJ σ 3.40 Å, ε 0.0104 eV, cutoff 8.5 Å; NVE dt 5 fs.
Our row carries ``ratio_vs_<peer>`` = our atom-steps/s over the peer's.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")   # leave GPU memory to torch peers

import time

import jax
import numpy as np

import nvalchemi_jax as nj
import peers
from nvalchemi_jax.dynamics import NVE, persistent, resident
from nvalchemi_jax.dynamics.run import fused_paths
from nvalchemi_jax.models import LennardJones

LJ = dict(sigma=3.40, epsilon=0.0104, cutoff=8.5)
PEERS = ("jax-md", "nvalchemi", "torch-sim")


def peak_bytes():
    return (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")


def batch_of(positions, cell, velocities):
    """Our batch of ``positions (B, n, 3)`` argon crystals."""
    count, n = positions.shape[:2]
    return nj.Batch.from_arrays(positions=list(positions), atomic_numbers=[np.full(n, 18)] * count,
                                cell=list(cell), pbc=[np.ones(3, bool)] * count,
                                velocities=list(velocities), min_distance=None)


def ours(positions, cell, velocities, steps, chunk, skin, timings=1):
    """Our compiled run loop; the first chunk (compilation, neighbor allocation) is timed apart.
    With ``timings`` > 1 the timed run is repeated from the same state and the median counts
    (one run of ~30 ms varied by 20 % between processes on an H200); all are reported."""
    count, n = positions.shape[:2]
    t0 = time.perf_counter()
    batch = batch_of(positions, cell, velocities)
    md = NVE(LennardJones(**LJ, shift=True), dt=5.0, n_steps=10**9, skin=skin)
    warm = md.run(batch, max_steps=chunk, chunk_size=chunk)
    jax.block_until_ready(warm.state)
    first = time.perf_counter() - t0
    samples = []
    for _ in range(timings):
        t0 = time.perf_counter()
        result = md.run(batch, state=warm.state, max_steps=steps, chunk_size=chunk)
        jax.block_until_ready(result.state)
        samples.append(time.perf_counter() - t0)
    seconds = float(np.median(samples))
    atoms, taken = count * n, result.steps - warm.steps
    nl = result.state.neighbors
    chosen = fused_paths(md, batch)
    return {"peer": "nvalchemi-jax", "version": nj.__version__, "atoms": atoms, "batch": count,
            "steps": taken, "seconds": seconds, "atom_steps_per_s": atoms * taken / seconds,
            "compile_or_warmup_s": first, "timed_runs_s": samples, "peak_bytes": peak_bytes(), "skin": skin,
            "max_neighbors": nl.spec.max_neighbors, "neighbor_method": nl.spec.method,
            "shift_dtype": nl.spec.shift_dtype, "resident_width": chosen["resident"],
            "path": path(chosen),
            "resident_tile": f"{resident.ROWS}x{resident.COLS}x{resident.NUM_WARPS}",
            "resident_parts": chosen["parts"],
            "split_tile": split_tile(chosen),
            "persistent_grid": chosen["grid"],
            "persistent_tile": (f"{persistent.ROWS}x{persistent.COLS}x{persistent.WARPS}"
                                f"x{persistent.ATOMS}x{persistent.PER_SM}"),
            "rebuilds_per_step": float(np.asarray(nl.rebuilds).max()) / result.steps,
            "lj_form": "shifted", "chunk": chunk}


def split_tile(chosen) -> str | None:
    """ROWSxCOLSxWARPS of each program when the resident kernel splits systems (``chosen``:
    ``fused_paths``' answer), else None."""
    if not (chosen["resident"] and chosen["parts"]) or not hasattr(resident, "split_shape"):
        return None     # (older versions in ab.py runs have no split_shape)
    return "x".join(map(str, resident.split_shape(chosen["resident"], chosen["parts"])))


def path(chosen) -> str:
    """How our run steps (``chosen``: ``fused_paths``' answer): resident kernels, the
    persistent kernel, the leapfrog path, or the engine."""
    return ("resident" if chosen["resident"] else "persistent" if chosen["grid"]
            else "leapfrog" if chosen["fused"] else "engine")


def compare(case, count, repeats, steps, peer_steps, chunk, skin, peer_names=PEERS, timings=1):
    """One case: ours, then each peer; rows for all of them (skipped peers say why)."""
    positions, cell, velocities = peers.nve_inputs(count, repeats)
    mine = {"case": case, **ours(positions, cell, velocities, steps, chunk, skin, timings)}
    mine["peak_bytes_per_atom"] = (mine["peak_bytes"] or 0) / mine["atoms"]
    rows = [mine]
    for name in peer_names:
        try:
            r = peers.nve(name, positions, cell, velocities, steps=peer_steps, skin=skin, **LJ)
        except peers.PeerSkipped as e:
            rows.append({"case": case, "peer": name, "skipped": str(e)})
            continue
        except Exception as e:  # noqa: BLE001 - a peer crashing must not lose our numbers
            rows.append({"case": case, "peer": name, "failed": f"{type(e).__name__}: {e}"[:300]})
            continue
        r["peer_device"] = r.pop("device", None)      # the header's "device" names the GPU
        rows.append({"case": case, **r})
        mine[f"ratio_vs_{name}"] = mine["atom_steps_per_s"] / r["atom_steps_per_s"]
    return rows


def add_arguments(parser):
    """Options shared by the W1 and W2 scripts."""
    parser.add_argument("--steps", type=int, default=500, help="our timed steps")
    parser.add_argument("--peer-steps", type=int, default=100, help="each peer's timed steps")
    parser.add_argument("--chunk", type=int, default=100)
    parser.add_argument("--timings", type=int, default=3,
                        help="timed runs of ours from the same state; the median counts")
    parser.add_argument("--skin", type=float, default=1.0)
    parser.add_argument("--peers", nargs="*", default=list(PEERS))
    parser.add_argument("--shifts", choices=("int8", "packed"), default=None,
                        help="our neighbor lists' shift storage (default: the library's)")
    parser.add_argument("--split-tile", default=None, metavar="ROWSxCOLSxWARPS",
                        help="split resident kernel: least rows per program, walked column block, warps of "
                             "blocks over resident.SMALL_BLOCK pairs")
    parser.add_argument("--resident-tile", default=None, metavar="ROWSxCOLSxWARPS",
                        help="resident NVE kernel's tile and warps (default: the library's)")
    parser.add_argument("--persistent-tile", default=None, metavar="ROWSxCOLSxWARPSxATOMSxPER_SM",
                        help="persistent NVE kernel's tile, warps, update block and programs per "
                             "multiprocessor (default: the library's)")
    parser.add_argument("--out", default=None)


def configure(args):
    """Library settings the options change (before anything is allocated)."""
    if args.shifts is not None:
        from nvalchemi_jax import neighbors
        neighbors.DEFAULT_SHIFT_DTYPE = args.shifts
    if args.split_tile is not None:
        from nvalchemi_jax.dynamics import resident
        resident.SPLIT_ROWS, resident.SPLIT_COLS, resident.SPLIT_WARPS = (int(v) for v in args.split_tile.split("x"))
    if args.persistent_tile is not None:
        from nvalchemi_jax.dynamics import persistent
        (persistent.ROWS, persistent.COLS, persistent.WARPS, persistent.ATOMS,
         persistent.PER_SM) = (int(v) for v in args.persistent_tile.split("x"))
    if args.resident_tile is not None:
        from nvalchemi_jax.dynamics import resident
        resident.ROWS, resident.COLS, resident.NUM_WARPS = (int(v) for v in args.resident_tile.split("x"))
