#!/usr/bin/env bash
# The GPU call that settles step parity with open_clip (benchmarks/bench_step_parity.py), at most 7 minutes, most
# telling first, every figure on disk the moment it exists:
#
#   benchmarks/gpu_parity.sh OUTDIR            on a single-GPU machine (torch >= 2.11, triton >= 3.6 there)
#   benchmarks/gpu_parity.sh OUTDIR --dry      on a CPU: every stage starts, the CUDA parts skip themselves
#
# Stages (limit; estimate on an H100/H200): the alignment micro-benchmarks, a bias and a LayerNorm 16-byte aligned
# vs 2 bytes off, with their kernels (60; 25); ViT-B/32 at its large batch (2,048 on an H200: run it there to
# compare with the first run; 1,024 on an 80 GB card), data excluded: the layout before, the
# aligned default, ZeRO-1, amp_bf16 and open_clip in alternating rounds, then the data-included rate with the
# automatic worker count (180; 140); the same at batch 256 (80; 50); train.compile step at the large batch beside eager and
# open_clip (150; 120). Each stage gets at most what is left of the 420 s deadline (GPU_PARITY_SECONDS).
# Wheels as for benchmarks/gpu_suite.sh ($FASTCLIP_WHEELS, benchmarks/prepare_wheels.sh); DALI's data path is
# benchmarks/gpu_dali.sh's. Writes into OUTDIR: versions.json, gpu_bench.json (fastclip vs open_clip, ratios),
# suite.log.
set -uo pipefail
[ $# -ge 1 ] || { echo "usage: benchmarks/gpu_parity.sh OUTDIR [--dry]"; exit 2; }
cd "$(dirname "$0")/.." || exit 2
py=${PYTHON:-python3}
# shellcheck source=benchmarks/gpu_env.sh
. benchmarks/gpu_env.sh
gpu_begin gpu_parity "$1" "${2:-}" "${GPU_PARITY_SECONDS:-420}"
gpu_wheels gpu_parity || exit 2
gpu_versions "$out/versions.json"

run_case() {  # run_case NAME LIMIT ESTIMATE TEST-ID: one test of bench_step_parity.py, its figures into gpu_bench.json
    local name=$1 limit=$2 estimate=$3
    stage "$name" "$limit" "$estimate" "$py" -m pytest -q -p no:cacheprovider -m gpu "${quick[@]}" \
        --results "$out/gpu_bench.json" "benchmarks/bench_step_parity.py::$4"
}
run_case "alignment kernels" 60 25 "test_alignment_kernels_gpu"
run_case "step parity ViT-B/32 large batch" 180 140 "test_step_parity_gpu[large-eager]"
run_case "step parity ViT-B/32 batch 256" 80 50 "test_step_parity_gpu[256-eager]"
run_case "compile step ViT-B/32 large batch" 150 120 "test_step_parity_gpu[large-compiled]"
echo "gpu_parity: done in $(($(date +%s) - started)) s, status $status"
exit $status
