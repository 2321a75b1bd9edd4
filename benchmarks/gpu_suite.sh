#!/usr/bin/env bash
# Everything that needs a GPU, in one call of at most 8 minutes: the GPU tests, then the GPU benchmarks.
#
#   benchmarks/gpu_suite.sh OUTDIR            on a single-GPU machine (torch >= 2.11, triton >= 3.6 there)
#   benchmarks/gpu_suite.sh OUTDIR --dry      on a CPU: every step runs, the CUDA parts skip themselves
#
# Installs nothing from the network. Packages the machine lacks come as wheels from $FASTCLIP_WHEELS
# (made here by benchmarks/prepare_wheels.sh). fastclip itself runs from this checkout (PYTHONPATH=.).
# Writes into OUTDIR: versions.json, gpu_tests.xml, gpu_bench.json (fastclip vs open_clip, ratios),
# pytest_benchmark*.json, suite.log. Limits: tests 150 s, benchmarks 220 s (ZeRO-1/2/3 at ViT-B/16 after the train steps), accumulation
# 90 s (<= 8 min in all).
set -uo pipefail
out=${1:?usage: benchmarks/gpu_suite.sh OUTDIR [--dry]}
mode=${2:-}
cd "$(dirname "$0")/.." || exit 2
mkdir -p "$out"
exec > >(tee "$out/suite.log") 2>&1
started=$(date +%s)
py=${PYTHON:-python3}

if [ -n "${FASTCLIP_WHEELS:-}" ]; then
    site=${TMPDIR:-/tmp}/fastclip-site
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        "$FASTCLIP_WHEELS"/*.whl || { echo "gpu_suite: could not install the wheels in $FASTCLIP_WHEELS"; exit 2; }
    export PYTHONPATH="$site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
# not installed here: setup.py would map the top-level kernels/ to fastclip.kernels; a link (git-ignored) does it
"$py" -c "import fastclip.kernels" 2>/dev/null || ln -sfn ../kernels fastclip/kernels

"$py" - "$out/versions.json" <<'PY'
import json, sys, datetime, subprocess
import torch, triton
info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.cuda.is_available()}
if torch.cuda.is_available():
    info["gpu"] = torch.cuda.get_device_name(0)
    info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True).stdout.strip()
try:
    import open_clip
    info["open_clip"] = open_clip.__version__
except ImportError as e:
    info["open_clip"] = f"missing ({e}): set FASTCLIP_WHEELS"
json.dump(info, open(sys.argv[1], "w"), indent=1)
print("gpu_suite:", info)
PY

if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    if [ "$mode" != "--dry" ]; then
        echo "gpu_suite: no CUDA device here; pass --dry to check the script on a CPU"
        exit 2
    fi
    echo "gpu_suite: dry run, CUDA parts skip themselves"
fi
quick=()
[ "$mode" = "--dry" ] && quick=(--quick)

status=0
echo "== GPU tests"
timeout 150 "$py" -m pytest -q -p no:cacheprovider -m gpu tests/ --junitxml="$out/gpu_tests.xml" || status=1
echo "== GPU benchmarks"
# most important first: a run cut off by the timeout keeps what it measured (results are written per case)
timeout 220 "$py" -m pytest -q -p no:cacheprovider -m gpu "${quick[@]}" \
    benchmarks/bench_loss.py benchmarks/bench_train_step.py benchmarks/bench_data.py \
    --results "$out/gpu_bench.json" --benchmark-json "$out/pytest_benchmark.json" || status=1
echo "== GPU accumulation: contrastive batch 65,536 on one GPU"
# its own limit, last: two steps of 65,536 ViT-B/32 samples must not eat the cases above
timeout 90 "$py" -m pytest -q -p no:cacheprovider -m gpu "${quick[@]}" benchmarks/bench_accumulation.py \
    --results "$out/gpu_bench.json" --benchmark-json "$out/pytest_benchmark_accumulation.json" || status=1
echo "gpu_suite: done in $(( $(date +%s) - started )) s, status $status"
exit $status
