#!/usr/bin/env bash
# Fetch (on a machine with network) the peers' wheels that the offline H200 image lacks, for
# Python 3.12 x86-64, into .whl/peers/ (git-ignored): warp-lang split into 40 MB parts under
# big/, the rest in groups g1/, g2/, ... of at most 45 MB (one GPU call carries ~64 MB).
# Then follow "Running on the H200 with the peers" in benchmarks/README.md.
#
#   bash benchmarks/fetch_peer_wheels.sh            # from the repository root
set -euo pipefail
dest=.whl/peers
mkdir -p "$dest/all" "$dest/big"
wheels=(
  jax-md==0.2.29 jraph==0.0.6.dev0 e3nn-jax==0.21.0 ml-collections==1.1.0 dm-tree==0.1.10
  nvalchemi-toolkit==0.2.0 nvalchemi-toolkit-ops==0.5.0 warp-lang==1.19.0 nvidia-physicsnemo==2.2.2
  tensordict==0.15.3 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
  typing-inspection==0.4.5 zarr==3.4.2 numcodecs==0.17.1 donfig==0.8.1.post1 google-crc32c==1.9.0
  s3fs==2026.9.0 fsspec==2026.9.0 aiobotocore==3.10.0 aioitertools==0.13.0 botocore==1.43.117
  jmespath==1.1.0 torch-sim-atomistic==0.6.2 tables==3.11.1 blosc2==4.14.1 ndindex==1.10.1
  numexpr==2.14.2 msgspec==0.22.0 ase==3.29.0 beartype==0.23.1 importlib-metadata==10.2.0
  lazy-importer==0.1.0 loguru==0.7.3 nvtx==0.2.17 periodictable==2.0.2 plotext==6.1.0
  plum-dispatch==2.10.1 pyvers==0.2.3 termcolor==3.3.0 treelib==1.8.0
)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do platforms+=(--platform "$p"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$dest/all" "${wheels[@]}"

warp=$(ls "$dest"/all/warp_lang-*.whl)
( cd "$dest/big" && sha256sum "../all/$(basename "$warp")" | cut -d' ' -f1 > "$(basename "$warp").sha256" \
  && split -b 40M "../all/$(basename "$warp")" "$(basename "$warp").part-" )
rm "$warp"
group=1 size=0 limit=$((45 * 1024 * 1024))
for whl in $(ls -S "$dest"/all/*.whl); do
  n=$(stat -c %s "$whl")
  if (( size + n > limit )); then group=$((group + 1)); size=0; fi
  mkdir -p "$dest/g$group" && mv "$whl" "$dest/g$group/" && size=$((size + n))
done
rmdir "$dest/all"
du -sh "$dest"/*
