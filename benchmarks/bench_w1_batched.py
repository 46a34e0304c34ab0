"""W1: NVE throughput of B periodic FCC argon crystals of 256 atoms, against the peers.

    python benchmarks/bench_w1_batched.py --batches 1 64 1024 4096 --out results/w1.jsonl
"""

from __future__ import annotations

import argparse

import _nve
from _report import emit


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="*", default=[1, 16])
    _nve.add_arguments(p)
    args = p.parse_args(argv)
    _nve.configure(args)
    rows = []
    for b in args.batches:
        rows += _nve.compare(f"W1 B={b} x 256", b, 4, args.steps, args.peer_steps, args.chunk,
                             args.skin, args.peers, args.timings)
        emit(rows[-1 - len(args.peers):])          # progress, case by case
    emit([{"benchmark": "W1", **r} for r in rows], args.out)


if __name__ == "__main__":
    main()
