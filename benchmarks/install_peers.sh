#!/usr/bin/env bash
# Install the peer libraries of benchmarks/peers.py on the offline GPU machine.
#
#   bash benchmarks/install_peers.sh [STAGING=/tmp/peerwheels] [TARGET=/tmp/peersite]
#   export PYTHONPATH=/tmp/peersite    # then run benchmarks/peers.py
#
# STAGING holds either the parts of pack_peers.sh's archive (.whl/peers/bundle/, copied
# there over two calls), unpacked into TARGET, or wheels: those of .whl/peers/g*/ and the
# parts of .whl/peers/big/ (split wheels, NAME.whl.part-aa, -ab, ...). Parts are joined back
# here and checked against their .sha256. Wheels install with --no-deps into TARGET. Either
# way the machine's own torch, jax, numpy, etc. stay as they are; only what it lacks is added.
set -euo pipefail
staging=${1:-/tmp/peerwheels}
target=${2:-/tmp/peersite}
py=${PYTHON:-python3}

shopt -s nullglob
joined() {  # the parts of $1 joined into $1, checked against $1.sha256
  cat "$1".part-* > "$1"
  if [[ -f "$1.sha256" ]]; then
    echo "$(cat "$1.sha256")  $1" | sha256sum -c --quiet - || { echo "bad checksum: $1"; exit 1; }
  fi
  echo "joined $(basename "$1") ($(ls "$1".part-* | wc -l) parts, $(du -h "$1" | cut -f1))"
}
for first in "$staging"/*.tar.xz.part-aa; do
  joined "${first%.part-aa}"
  mkdir -p "$target" && xz -dc "${first%.part-aa}" | tar x -C "$target"
  echo "unpacked $(basename "${first%.part-aa}") into $target"
done
for first in "$staging"/*.whl.part-aa; do
  joined "${first%.part-aa}"
done

wheels=("$staging"/*.whl)
if (( ${#wheels[@]} )); then
  echo "installing ${#wheels[@]} wheels into $target"
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$target" "${wheels[@]}"
fi

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
