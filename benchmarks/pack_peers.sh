#!/usr/bin/env bash
# Pack the peers' wheels (fetch_peer_wheels.sh, under .whl/peers/) into one xz archive of the
# installed tree, split into parts that one GPU call each can carry: two calls instead of five.
#
#   bash benchmarks/pack_peers.sh            # from the repository root; ~5 min on 2 cores
#
# What shrinks it: xz of the installed files (warp's CUDA library alone is 112 MB deflated in
# its wheel), and warp-lang without warp-clang.so (68 MB, its CPU JIT: Warp loads it only when
# present, for CPU kernels, and the peers run on the GPU), examples and tests.
# install_peers.sh unpacks the archive (parts joined, checked against the .sha256) on the GPU.
set -euo pipefail
src=.whl/peers
dest=$src/bundle
part_mb=${PART_MB:-58}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/wheels" "$dest"
cp "$src"/g*/*.whl "$work/wheels/"
for first in "$src"/big/*.whl.part-aa; do     # warp-lang, split by fetch_peer_wheels.sh
  whl=$(basename "${first%.part-aa}")
  cat "${first%.part-aa}".part-* > "$work/wheels/$whl"
  echo "$(cat "$src/big/$whl.sha256")  $work/wheels/$whl" | sha256sum -c --quiet -
done
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do platforms+=(--platform "$p"); done
python3 -m pip install -q --no-index --no-deps --no-compile --target "$work/site" --python-version 3.12 \
  --implementation cp --only-binary=:all: --ignore-requires-python "${platforms[@]}" "$work"/wheels/*.whl
site=$work/site
rm -rf "$site"/warp/bin/warp-clang.so "$site"/warp/examples "$site"/warp/tests
record=$(ls "$site"/warp_lang-*.dist-info/RECORD)
grep -v '^warp/bin/warp-clang.so,\|^warp/examples/\|^warp/tests/' "$record" > "$work/RECORD" && mv "$work/RECORD" "$record"
rm -f "$dest"/peersite.tar.xz*
tar cf - -C "$site" . | xz -T0 -9 > "$work/peersite.tar.xz"
( cd "$work" && sha256sum peersite.tar.xz | cut -d' ' -f1 ) > "$dest/peersite.tar.xz.sha256"
split -b "${part_mb}M" "$work/peersite.tar.xz" "$dest/peersite.tar.xz.part-"
ls -la "$dest"
