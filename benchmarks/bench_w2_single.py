"""W2: NVE throughput of one large periodic FCC argon crystal, against the peers.

    python benchmarks/bench_w2_single.py --atoms 32000 256000 --out results/w2.jsonl
"""

from __future__ import annotations

import argparse

import _nve
from _report import emit


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--atoms", type=int, nargs="*", default=[4000], help="4 r^3 for r cells per side")
    _nve.add_arguments(p)
    # A 1.3 Å skin (list radius 9.8 Å) still stops short of FCC argon's shell at 9.84 Å, so
    # the list is not much longer than at 1 Å (K 119 vs 99), while an atom must move 0.65 Å
    # for a rebuild: none in 1,000 steps at 32,000 atoms, 5 at 256,000, where 1 Å rebuilt
    # every ~30 steps (H200: results/w2_skin_h200_2026-11-29.jsonl). Peers get the same skin.
    p.set_defaults(skin=1.3)
    args = p.parse_args(argv)
    _nve.configure(args)
    rows = []
    for n in args.atoms:
        side = round((n / 4) ** (1 / 3))
        rows += _nve.compare(f"W2 1 x {4 * side**3}", 1, side, args.steps, args.peer_steps, args.chunk,
                             args.skin, args.peers, args.timings)
        emit(rows[-1 - len(args.peers):])
    emit([{"benchmark": "W2", **r} for r in rows], args.out)


if __name__ == "__main__":
    main()
