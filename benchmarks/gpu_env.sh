# shellcheck shell=bash
# Sourced by benchmarks/gpu_suite.sh, gpu_parity.sh and gpu_dali.sh, from the checkout's root, with $py set: what a
# bare GPU machine needs before fastclip runs there from this checkout.

gpu_env() {  # the process limits, PYTHONPATH and the kernels link
    # the torch loader's GPU decode hands file descriptors between processes: the image's soft limit is too low
    ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
    export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
    # not installed here: setup.py would map the top-level kernels/ to fastclip.kernels; a link (git-ignored) does it
    "$py" -c "import fastclip.kernels" 2>/dev/null || ln -sfn ../kernels fastclip/kernels
}

gpu_wheels() {  # gpu_wheels NAME: $FASTCLIP_WHEELS installed (open_clip, DeepSpeed, ...) and on PYTHONPATH
    local site=${TMPDIR:-/tmp}/fastclip-site  # kept on a warm machine: a later call finds an earlier install
    if [ -n "${FASTCLIP_WHEELS:-}" ]; then
        "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
            "$FASTCLIP_WHEELS"/*.whl || { echo "$1: could not install the wheels in $FASTCLIP_WHEELS"; return 2; }
    fi
    if [ -d "$site" ]; then
        export PYTHONPATH="$PYTHONPATH:$site"
    fi
}

gpu_begin() {  # gpu_begin NAME OUTDIR MODE BUDGET: the log, the clock, the mode; exits 2 without CUDA unless --dry
    local name=$1
    out=$2 mode=$3 budget=$4 status=0 quick=()
    mkdir -p "$out"
    exec > >(tee "$out/suite.log") 2>&1
    started=$(date +%s)
    deadline=$((started + budget))
    [ "$mode" = "--dry" ] && quick=(--quick)
    gpu_env
    if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        if [ "$mode" != "--dry" ]; then
            echo "$name: no CUDA device here; pass --dry to check the script on a CPU"
            exit 2
        fi
        echo "$name: dry run, CUDA parts skip themselves"
    fi
}

# after gpu_begin ($started, $budget, $deadline); a stage that fails or is skipped sets status=1
stage() {  # stage NAME LIMIT ESTIMATE CMD...: run CMD under min(LIMIT, time left), SIGINT first
    local name=$1 limit=$2 estimate=$3 t0 left
    shift 3
    t0=$(date +%s)
    left=$((deadline - t0))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 10 ]; then
        echo "== $name: skipped, $left s left of the suite's $budget"
        status=1
        return
    fi
    echo "== $name (limit ${limit} s, estimate ${estimate} s; $((t0 - started)) s into the suite)"
    timeout -s INT -k 15 "$limit" "$@" || { echo "== $name: exit $?"; status=1; }
    echo "== $name: $(($(date +%s) - t0)) s"
}

gpu_versions() {  # gpu_versions FILE: the card, driver and the versions that run there, as JSON
    "$py" - "$1" <<'PY'
import json, sys, datetime, subprocess
import torch, triton
info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.cuda.is_available()}
if torch.cuda.is_available():
    info["gpu"] = torch.cuda.get_device_name(0)
    info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True).stdout.strip()
for name in ("open_clip", "deepspeed", "nvidia.dali"):
    try:
        info[name] = __import__(name, fromlist=["_"]).__version__
    except ImportError as e:
        info[name] = f"missing ({e})"
json.dump(info, open(sys.argv[1], "w"), indent=1)
print("gpu_suite:", info)
PY
}
