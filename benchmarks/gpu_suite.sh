#!/usr/bin/env bash
# Everything that needs a GPU, in one call of at most 8 minutes, most telling first, every figure on disk the moment
# it exists (a stage cut by its limit keeps what it measured):
#
#   benchmarks/gpu_suite.sh OUTDIR            on a single-GPU machine (torch >= 2.11, triton >= 3.6 there)
#   benchmarks/gpu_suite.sh OUTDIR --dry      on a CPU: every step runs, the CUDA parts skip themselves
#
# Stages (limit; estimate on an H100/H200): precheck, no wheels needed (90 s; 60 s: versions, matmul peak, the
# bf16 error rules, the fused losses' times and memory against open_clip's math, SigLipLoss ~15 s of it); GPU tests
# (110; 70); loss vs open_clip itself, ClipLoss and SigLipLoss (75; 40); the AdamW step, torch fused / DeepSpeed
# FusedAdam / foreach, which decides optim.fused's default (30; 15); train step ViT-B/32, with peak memory and one
# profiled step of each side by kernel kind (110; 85); data, nvJPEG (60; 35); train step ViT-B/16 (90; 65);
# ZeRO-1/2/3 at ViT-B/16 (70; 50); contrastive batch 65,536 (60; 40); then, past the default deadline unless
# GPU_SUITE_SECONDS gives it room, train.compile at ViT-B/32 (150; 120). Each stage gets at most what is left of
# the 460 s deadline (GPU_SUITE_SECONDS; the estimates before compile add up to 460 s); a stage's pytest is stopped
# with SIGINT (it writes its files) and killed 15 s later.
# Installs nothing from the network: open_clip, DeepSpeed and the rest come as wheels from $FASTCLIP_WHEELS
# (benchmarks/prepare_wheels.sh). fastclip runs from this checkout (PYTHONPATH=.).
# Writes into OUTDIR (8 files at most): precheck.jsonl, precheck.json, versions.json, gpu_tests.xml,
# gpu_bench.json (fastclip vs open_clip, ratios), pytest_benchmark.json, suite.log.
set -uo pipefail
[ $# -ge 1 ] || { echo "usage: benchmarks/gpu_suite.sh OUTDIR [--dry]"; exit 2; }
cd "$(dirname "$0")/.." || exit 2
py=${PYTHON:-python3}
# shellcheck source=benchmarks/gpu_env.sh
. benchmarks/gpu_env.sh
gpu_begin gpu_suite "$1" "${2:-}" "${GPU_SUITE_SECONDS:-460}"  # a shorter budget runs the stages in order until it is spent

stage "precheck" 90 60 "$py" benchmarks/gpu_precheck.py "$out" --tiles "${quick[@]}"

gpu_wheels gpu_suite || exit 2
gpu_versions "$out/versions.json"

bench() {  # bench NAME LIMIT ESTIMATE PYTEST-ARGS...: one benchmark stage, figures into gpu_bench.json
    local name=$1 limit=$2 estimate=$3
    shift 3
    stage "$name" "$limit" "$estimate" "$py" -m pytest -q -p no:cacheprovider -m gpu "${quick[@]}" \
        --results "$out/gpu_bench.json" --benchmark-json "$out/pytest_benchmark.json" "$@"
}
# the files that hold GPU tests (tests/ whole would collect ~420 CPU tests on device time first)
gpu_tests=$(grep -l "mark.gpu" tests/test_*.py)
# shellcheck disable=SC2086
stage "GPU tests" 110 70 "$py" -m pytest -q -p no:cacheprovider -m gpu $gpu_tests --junitxml="$out/gpu_tests.xml"
bench "loss vs open_clip" 75 40 benchmarks/bench_loss.py
bench "AdamW step" 30 15 benchmarks/bench_optimizer.py
bench "train step ViT-B/32" 110 85 benchmarks/bench_train_step.py -k "test_train_step_gpu and ViT-B-32"
bench "data" 60 35 benchmarks/bench_data.py
bench "train step ViT-B/16" 90 65 benchmarks/bench_train_step.py -k "test_train_step_gpu and ViT-B-16"
bench "ZeRO stages" 70 50 benchmarks/bench_train_step.py -k test_zero_stages_gpu
bench "contrastive batch 65,536" 60 40 benchmarks/bench_accumulation.py
bench "compile ViT-B/32" 150 120 benchmarks/bench_train_step.py -k test_compile_gpu
echo "gpu_suite: done in $(($(date +%s) - started)) s, status $status"
exit $status
