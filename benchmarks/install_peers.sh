#!/usr/bin/env bash
# Install the peer libraries of benchmarks/peers.py on the offline GPU machine.
#
#   bash benchmarks/install_peers.sh [STAGING=/tmp/peerwheels] [TARGET=/tmp/peersite]
#   export PYTHONPATH=/tmp/peersite    # then run benchmarks/peers.py
#
# STAGING holds the wheels of .whl/peers/g*/ and the parts of .whl/peers/big/ (copied
# there over several calls, each under the per-call carry limit). Split wheels
# (NAME.whl.part-aa, -ab, ...) are joined back here and checked against NAME.whl.sha256.
# Everything installs with --no-deps into TARGET: the machine's own torch, jax, numpy,
# etc. stay as they are; the wheels carry only what it lacks (one version each).
set -euo pipefail
staging=${1:-/tmp/peerwheels}
target=${2:-/tmp/peersite}
py=${PYTHON:-python3}

shopt -s nullglob
for first in "$staging"/*.whl.part-aa; do
  whl=${first%.part-aa}
  cat "$whl".part-* > "$whl"
  if [[ -f "$whl.sha256" ]]; then
    echo "$(cat "$whl.sha256")  $whl" | sha256sum -c --quiet - || { echo "bad checksum: $whl"; exit 1; }
  fi
  echo "joined $(basename "$whl") ($(ls "$whl".part-* | wc -l) parts, $(du -h "$whl" | cut -f1))"
done

wheels=("$staging"/*.whl)
echo "installing ${#wheels[@]} wheels into $target"
"$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$target" "${wheels[@]}"

export PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}"
err=$(mktemp)
check() {  # module, distribution
  if out=$("$py" -c "import $1; from importlib.metadata import version; print(version('$2'))" 2>"$err"); then
    echo "peer $1: OK $2 $(echo "$out" | tail -1)"
  else
    echo "peer $1: FAILED: $(tail -1 "$err")"
  fi
}
check jax_md jax-md
check nvalchemi nvalchemi-toolkit
check torch_sim torch-sim-atomistic
check warp warp-lang
check ase ase
echo "now: export PYTHONPATH=$target\${PYTHONPATH:+:\$PYTHONPATH}"
