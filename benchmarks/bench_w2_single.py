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
    args = p.parse_args(argv)
    _nve.configure(args)
    rows = []
    for n in args.atoms:
        side = round((n / 4) ** (1 / 3))
        rows += _nve.compare(f"W2 1 x {4 * side**3}", 1, side, args.steps, args.peer_steps, args.chunk,
                             args.skin, args.peers)
        emit(rows[-1 - len(args.peers):])
    emit([{"benchmark": "W2", **r} for r in rows], args.out)


if __name__ == "__main__":
    main()
