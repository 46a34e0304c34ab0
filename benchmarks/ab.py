"""Same-call A/B of code versions: one benchmark script run for each version in alternating
rounds, every JSON line tagged with its version and round, appended to one file.

A GPU's figures drift between device calls by more than many changes are worth, so
versions are compared inside one call, in alternating order. The device machine gets a
copy of the working tree without git, so older versions are exported here first:

    python benchmarks/ab.py prepare old=HEAD~1     # -> benchmarks/_ab/old (git-ignored:
                                                    #    carry it to the device machine)

then, on the device (each version is a package directory, or "." for the working tree;
``--setup NAME=statement`` runs Python before that version's script, e.g. a module switch;
``--env NAME=VAR=VALUE`` sets an environment variable for that version, e.g. ``XLA_FLAGS``):

    python benchmarks/ab.py run --version old=benchmarks/_ab/old --version new=. \\
        --setup packed="import nvalchemi_jax.neighbors as n; n.DEFAULT_SHIFT_DTYPE = 'packed'" \\
        --version packed=. --rounds 2 --out $OUT/ab.jsonl -- \\
        bench_w2_single.py --atoms 32000 256000 --steps 300 --peers

Round r runs the versions in the given order when r is odd and reversed when even. A
failed run is reported and the others go on.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def prepare(specs):
    """``NAME=COMMIT``: the package at that commit, exported to ``benchmarks/_ab/NAME``."""
    for spec in specs:
        name, _, commit = spec.partition("=")
        dest = os.path.join(HERE, "_ab", name)
        shutil.rmtree(dest, ignore_errors=True)
        os.makedirs(dest)
        archive = subprocess.run(["git", "-C", ROOT, "archive", commit, "nvalchemi_jax"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)
        print(f"{name}: {commit} -> {os.path.relpath(dest, ROOT)}")


def _pairs(items, what):
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"--{what} takes NAME=VALUE, got {item!r}")
        out[name] = value
    return out


def run(versions, setups, rounds, out, script, envs=None):
    """Every version's run of ``script`` (a list: the script and its arguments) per round."""
    names = list(versions)
    values = {name: [] for name in names}
    for r in range(1, rounds + 1):
        for name in (names if r % 2 else names[::-1]):
            path = os.path.abspath(os.path.join(ROOT, versions[name]))
            with tempfile.TemporaryDirectory() as tmp:
                rows_file = os.path.join(tmp, "rows.jsonl")
                # The version's package must be the one imported (an editable install of the
                # working tree could shadow PYTHONPATH).
                code = (f"import sys, runpy, os, nvalchemi_jax as nj\n"
                        f"assert os.path.abspath(nj.__file__).startswith({path!r} + os.sep), nj.__file__\n"
                        f"{setups.get(name, '')}\n"
                        "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
                env = dict(os.environ, PYTHONPATH=os.pathsep.join(
                    [path] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
                env.update((envs or {}).get(name, {}))
                done = subprocess.run([sys.executable, "-c", code, *script, "--out", rows_file],
                                      cwd=HERE, env=env, capture_output=True, text=True)
                if done.returncode != 0:
                    print(f"round {r} {name}: exit {done.returncode}\n{done.stderr[-2000:]}", flush=True)
                rows = [json.loads(line) for line in open(rows_file)] if os.path.exists(rows_file) else []
            with open(out, "a") as f:
                for row in rows:
                    row.update(version=name, round=r)
                    f.write(json.dumps(row) + "\n")
                    if "atom_steps_per_s" in row:
                        values[name].append((row.get("case"), row["atom_steps_per_s"]))
                        print(f"round {r} {name:>12} {row.get('case')}: {row['atom_steps_per_s']:.4g}",
                              flush=True)
    return values


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    pp = sub.add_parser("prepare", help="export NAME=COMMIT versions to benchmarks/_ab/NAME")
    pp.add_argument("specs", nargs="+")
    pr = sub.add_parser("run", help="alternating rounds of one script over the versions")
    pr.add_argument("--version", action="append", required=True, help="NAME=DIR ('.': the working tree)")
    pr.add_argument("--setup", action="append", default=[], help="NAME=python statement")
    pr.add_argument("--env", action="append", default=[], help="NAME=VAR=VALUE (an environment variable)")
    pr.add_argument("--rounds", type=int, default=2)
    pr.add_argument("--out", required=True)
    pr.add_argument("script", nargs=argparse.REMAINDER, help="-- SCRIPT ARGS (from benchmarks/)")
    a = p.parse_args(argv)
    if a.command == "prepare":
        prepare(a.specs)
        return
    script = a.script[1:] if a.script[:1] == ["--"] else a.script
    if not script:
        raise SystemExit("run needs a script after --")
    envs = {}
    for item in a.env:
        name, _, assignment = item.partition("=")
        var, sep, value = assignment.partition("=")
        if not (name and var and sep):
            raise SystemExit(f"--env takes NAME=VAR=VALUE, got {item!r}")
        envs.setdefault(name, {})[var] = value
    versions, setups = _pairs(a.version, "version"), _pairs(a.setup, "setup")
    unknown = (set(setups) | set(envs)) - set(versions)
    if unknown:
        raise SystemExit(f"--setup / --env name versions that --version does not: {sorted(unknown)}")
    run(versions, setups, a.rounds, a.out, script, envs)


if __name__ == "__main__":
    main()
