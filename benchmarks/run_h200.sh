#!/usr/bin/env bash
# The committed GPU measurements, each workload bounded by a timeout so that one device
# call (10 minutes at most) finishes:
#   profile         per-kernel tables of the step and the pair kernel's block shapes (~4 min)
#   part1           W1 + W2 with all the peers (~5-8 min)
#   part2           W3, W4, W5 and the neighbor-method profile (~5 min)
#   part2-peers     nvalchemi's W3 inflight, warmed up on its timed inputs (~8 min)
#   part2-fixed-peers  torch-sim's and nvalchemi's W3 as one batch, and ASE (~3 min)
#   shifts-ab       W1/W2 with packed against int8 neighbor shifts, alternating rounds
#   resident        W1 with resident NVE kernels (jax-md alongside), and their tile sweep
#   shifts-w2       W2 with packed against int8 neighbor shifts, alternating rounds
#   leapfrog        W2 by the leapfrog path against the engine, alternating rounds, and a
#                   kernel table of its step
#   w1-peers        W1 with jax-md alongside (1,000 steps)
#   w2-peers        W2 with jax-md alongside (1,000 steps)
#   persistent-profile  kernel table of a chunk in the persistent kernel (32,000 atoms)
#   w3-device       W3 with inflight on device at three refill frequencies
#   split           W1 at B = 1, 4, 64: resident systems split over programs vs not, alternating
#   persistent      W2: the persistent leapfrog kernel vs XLA leapfrog steps, alternating, and
#                   its tiles ($PERSISTENT_TILES)
#   skin            W2 at the skins $SKINS (default 1.0 1.3 1.4 Å), ours only
#   skin-persistent W2 at 256,000 atoms in the persistent kernel at $PERSISTENT_SKIN (1.3 Å)
# Parts joined with commas (resident,shifts-w2) share one kernel check.
# Each part first checks the fused kernels against the XLA forms on this GPU and falls back
# to the XLA forms if they disagree (CHECKED=<exit status> reuses an earlier check's). Run from the repository root on the H200 after
# install_peers.sh; results (JSON lines + logs) go to $2 (default benchmarks/results).
#
#   export PYTHONPATH=/tmp/peersite:$PWD; bash benchmarks/run_h200.sh part1 $OUT
set -uo pipefail
part=${1:?a part: profile, part1, part2, part2-peers, part2-fixed-peers, ...}
out=$(realpath -m "${2:-benchmarks/results}")
day=$(date +%F)
mkdir -p "$out"
cd "$(dirname "$0")"
export PYTHONUNBUFFERED=1
run() {  # name, seconds, script and its arguments
  local name=$1 limit=$2
  shift 2
  timeout "$limit" python3 "$@" --out "$out/${name}_h200_$day.jsonl" > "$out/$name.log" 2>&1
  echo "$name: exit $? ($(grep -c . "$out/${name}_h200_$day.jsonl" 2>/dev/null || echo 0) rows)"
}
kernels="check_kernels_$part"
if [ -n "${CHECKED:-}" ]; then   # the check's exit status from an earlier run of check_kernels.py
  checked=$CHECKED
else
  timeout 240 python3 check_kernels.py --out "$out/${kernels}_h200_$day.jsonl" > "$out/$kernels.log" 2>&1
  checked=$?
fi
if [ $checked -ge 8 ] && [ $checked -lt 16 ]; then   # 8 + a bit per fused NVE path that failed
  failed=$((checked - 8))
  for bit in "1 RESIDENT" "2 LEAPFROG" "4 PERSISTENT"; do
    set -- $bit
    if [ $((failed & $1)) -ne 0 ]; then
      echo "$2 NVE path failed its check (see $kernels.log): not used in this part"
      export NVALCHEMI_JAX_$2=0
    fi
  done
elif [ $checked -ne 0 ]; then
  echo "fused kernels failed their check (see $kernels.log): XLA forms for this part"
  export NVALCHEMI_JAX_KERNELS=xla
fi
for part in ${part//,/ }; do   # parts may be joined with commas: one kernel check for all
case $part in
  profile)
    run profile_step 230 profile_step.py --batches 1 1024 --big 32000 256000 --skin 1.0 \
      --trace --blocks 32x16x4 64x16x4 32x32x4 16x16x4 32x8x4 ;;
  part1)   # every peer installed (install_peers.sh); ours 1,000 steps as in w1-peers / w2-peers
    run w1_batched 270 bench_w1_batched.py --batches 1 64 1024 4096 --steps 1000 --chunk 500 --peer-steps 50
    run w2_single 280 bench_w2_single.py --atoms 32000 256000 --steps 1000 --peer-steps 20 ;;
  part2)
    run w3_relax 230 bench_w3_relax.py --count 10000 --batch-size 2048 --refill 20 --mixed-count 1000 \
      --mixed-batch 128 --mixed-repeats 3 --fused-count 500 --peers
    run w4_hooks 100 bench_w4_hooks.py --batches 1024 --steps 1000 --repeats 5
    run w5_compile 60 bench_w5_compile.py --count 600 --batch-size 128
    run profile_step_methods 100 profile_step.py --batches 1024 4096 --skin 1.0 --method cell_list ;;
  w3-device)   # W3 with inflight on device at three refill frequencies
    run w3_device 280 bench_w3_relax.py --count 10000 --batch-size 2048 --refill 20 --device-refill 5 10 20 \
      --mixed-count 1000 --mixed-batch 128 --mixed-repeats 5 --fused-count 0 --peers ;;
  split)   # W1 with small batches: resident systems split over several programs, against unsplit
    for round in 1 2; do
      for parts in "" 0; do
        NVALCHEMI_JAX_RESIDENT_PARTS=$parts run w1_split_tmp 100 bench_w1_batched.py --batches 1 4 64 \
          --steps 1000 --chunk 500 --peers
        sed "s/^{/{\"parts_env\": \"${parts:-auto}\", \"round\": $round, /" \
          "$out/w1_split_tmp_h200_$day.jsonl" >> "$out/w1_split_ab_h200_$day.jsonl"
        rm -f "$out/w1_split_tmp_h200_$day.jsonl"
      done
    done ;;
  part2-peers)   # nvalchemi's W3 inflight, warmed up on its timed inputs (~8 min in all)
    run w3_relax_peers_inflight 560 bench_w3_relax.py --count 10000 --batch-size 2048 --peers-only \
      --peers nvalchemi:inflight ;;
  part2-fixed-peers)   # torch-sim's and nvalchemi's W3 as one batch, and ASE on 10 (~3 min)
    run w3_relax_torchsim 150 bench_w3_relax.py --count 10000 --peers-only --peers torch-sim
    run w3_relax_peers_fixed 250 bench_w3_relax.py --count 10000 --batch-size 2048 --peers-only \
      --peers nvalchemi:fixed ase --ase-count 10 ;;
  shifts-ab)   # packed vs int8 shift storage, ours only, two alternating rounds, one file (~5 min)
    for round in 1 2; do
      order="int8 packed"; [ $round = 2 ] && order="packed int8"
      for shifts in $order; do
        run w1_shifts_tmp 120 bench_w1_batched.py --batches 1024 4096 --steps 300 --peers --shifts $shifts
        run w2_shifts_tmp 120 bench_w2_single.py --atoms 32000 256000 --steps 300 --peers --shifts $shifts
        cat "$out"/w[12]_shifts_tmp_h200_$day.jsonl >> "$out/shifts_ab_h200_$day.jsonl"
        rm -f "$out"/w[12]_shifts_tmp_h200_$day.jsonl
      done
    done ;;
  resident)   # W1: resident kernels (with jax-md if installed), then a tile sweep; ours only
    run w1_resident 150 bench_w1_batched.py --batches 1 64 1024 4096 --steps 300 --peer-steps 50 --peers jax-md
    for tile in 64x16x4 128x16x8 256x16x8 64x32x4; do
      run w1_tile_tmp 35 bench_w1_batched.py --batches 1 1024 4096 --steps 1000 --chunk 500 \
        --peers --resident-tile $tile
      cat "$out/w1_tile_tmp_h200_$day.jsonl" >> "$out/w1_resident_tiles_h200_$day.jsonl"
      rm -f "$out/w1_tile_tmp_h200_$day.jsonl"
    done ;;
  shifts-w2)   # packed vs int8 shift storage, W2 only, two alternating rounds, one file
    for shifts in int8 packed packed int8; do
      run w2_shifts_tmp 60 bench_w2_single.py --atoms 32000 256000 --steps 300 --peers --shifts $shifts
      cat "$out/w2_shifts_tmp_h200_$day.jsonl" >> "$out/w2_shifts_ab_h200_$day.jsonl"
      rm -f "$out/w2_shifts_tmp_h200_$day.jsonl"
    done ;;
  leapfrog)   # the leapfrog path (NVALCHEMI_JAX_LEAPFROG) vs the engine, ours only, one file
    if [ "${NVALCHEMI_JAX_LEAPFROG:-1}" = 0 ]; then echo "leapfrog: skipped (failed its check)"; continue; fi
    for flag in 0 1 1 0; do
      NVALCHEMI_JAX_LEAPFROG=$flag run w2_leapfrog_tmp 70 bench_w2_single.py --atoms 32000 256000 \
        --steps 1000 --peers
      cat "$out/w2_leapfrog_tmp_h200_$day.jsonl" >> "$out/w2_leapfrog_ab_h200_$day.jsonl"
      rm -f "$out/w2_leapfrog_tmp_h200_$day.jsonl"
    done
    run profile_step_leapfrog 100 profile_step.py --batches --big 32000 256000 --skin 1.0 \
      --steps 100 --path leapfrog --trace ;;
  persistent)   # W2: the persistent leapfrog kernel vs leapfrog steps in XLA, alternating, then tiles
    if [ "${NVALCHEMI_JAX_PERSISTENT:-1}" = 0 ]; then echo "persistent: skipped (failed its check)"; continue; fi
    for flag in 1 0; do
      # 150 s: with the kernel forced on, 256,000 atoms compile for over a minute
      NVALCHEMI_JAX_PERSISTENT=$flag run w2_persistent_tmp 150 bench_w2_single.py --atoms 32000 256000 \
        --steps 1000 --peers
      cat "$out/w2_persistent_tmp_h200_$day.jsonl" >> "$out/w2_persistent_ab_h200_$day.jsonl"
      rm -f "$out/w2_persistent_tmp_h200_$day.jsonl"
    done
    for tile in ${PERSISTENT_TILES:-256x16x16x512x1 128x16x32x512x1}; do
      NVALCHEMI_JAX_PERSISTENT=1 run w2_ptile_tmp 150 bench_w2_single.py --atoms 32000 256000 --steps 1000 \
        --peers --persistent-tile $tile
      cat "$out/w2_ptile_tmp_h200_$day.jsonl" >> "$out/w2_persistent_tiles_h200_$day.jsonl"
      rm -f "$out/w2_ptile_tmp_h200_$day.jsonl"
    done ;;
  skin)   # W2 at three skins (ours only, default paths)
    for skin in ${SKINS:-1.0 1.3 1.4}; do
      run w2_skin_tmp 150 bench_w2_single.py --atoms 32000 256000 --steps 1000 --peers --skin $skin
      cat "$out/w2_skin_tmp_h200_$day.jsonl" >> "$out/w2_skin_h200_$day.jsonl"
      rm -f "$out/w2_skin_tmp_h200_$day.jsonl"
    done ;;
  skin-persistent)   # W2 at 256,000 atoms in the persistent kernel (compiles for over a minute)
    if [ "${NVALCHEMI_JAX_PERSISTENT:-1}" = 0 ]; then echo "persistent: skipped (failed its check)"; continue; fi
    NVALCHEMI_JAX_PERSISTENT=1 run w2_skin_persistent 200 bench_w2_single.py --atoms 256000 --steps 1000 \
      --peers --skin ${PERSISTENT_SKIN:-1.3} ;;
  w1-peers)   # W1 with jax-md alongside (after install_peers.sh), 1,000 steps in chunks of 500
    run w1_batched 250 bench_w1_batched.py --batches 1 64 1024 4096 --steps 1000 --chunk 500 --peer-steps 50 \
      --peers jax-md ;;
  w2-peers)   # W2 with jax-md alongside (after install_peers.sh), 1,000 steps, the default 1.3 Å skin
    run w2_single 280 bench_w2_single.py --atoms 32000 256000 --steps 1000 --peer-steps 20 --peers jax-md ;;
  persistent-profile)   # kernel table of a chunk of the persistent kernel, 32,000 atoms
    run profile_step_persistent 110 profile_step.py --batches --big 32000 --skin 1.3 --steps 100 \
      --path persistent --trace ;;
  *) echo "unknown part $part (profile, part1, part2, part2-peers, part2-fixed-peers, ...)"; exit 2 ;;
esac
done
