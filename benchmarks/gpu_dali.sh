#!/usr/bin/env bash
# DALI on the GPU machine, whose image lacks it. Its wheels (about 250 MB) are more than one call may carry, so
# `benchmarks/prepare_wheels.sh --dali` cuts them into parts (.dali/part-NN beside .dali/manifest.txt). Each call
# carries the manifest and one part; this script stashes the part outside the checkout, where files stay while the
# machine stays warm (about 30 s after a call: make the calls back to back; a fresh machine starts an empty stash,
# and the script says which parts it holds). The call that completes the set checks every checksum, installs DALI
# into the stash and runs the DALI GPU checks: a short training run and the corrupt-JPEG test with
# --data.loader dali (mixed decode on the GPU), and the data benchmark against open_clip's loader.
#
#   benchmarks/gpu_dali.sh OUTDIR            on the GPU machine (FASTCLIP_WHEELS as for gpu_suite.sh)
#   benchmarks/gpu_dali.sh OUTDIR --dry      on a CPU: stash, check and install as there; the CUDA checks skip
#
# A device session, its 15 minutes permitting (the main suite takes 8; five calls of a part each, about half a
# minute apiece when warm, then the checks, about 3): call 1 carries .whl, .dali/manifest.txt and .dali/part-00 and
# runs `benchmarks/gpu_dali.sh /tmp/dali-stash; FASTCLIP_WHEELS=.whl benchmarks/gpu_suite.sh $OUT`; each later call
# carries .whl, the manifest and the next part and runs `FASTCLIP_WHEELS=.whl benchmarks/gpu_dali.sh $OUT` (the
# install comes only once every part is in; open_clip and DeepSpeed from an earlier gpu_suite.sh are found too).
# Writes OUTDIR/dali.log, and once complete OUTDIR/dali_tests.xml and OUTDIR/dali_bench.json.
# Exit status: 0 the checks ran and passed; 1 a check failed; 2 no manifest, or the install failed; 3 parts are
# still missing (the log names them).
set -uo pipefail
out=${1:?usage: benchmarks/gpu_dali.sh OUTDIR [--dry]}
mode=${2:-}
cd "$(dirname "$0")/.." || exit 2
repo=$PWD
mkdir -p "$out"
exec > >(tee "$out/dali.log") 2>&1
parts=${FASTCLIP_DALI_PARTS:-.dali}
stash=${FASTCLIP_DALI_STASH:-${TMPDIR:-/tmp}/fastclip-dali}
py=${PYTHON:-python3}
mkdir -p "$stash"

if [ ! -f "$parts/manifest.txt" ]; then
    echo "gpu_dali: no $parts/manifest.txt: carry it with every part (benchmarks/prepare_wheels.sh --dali makes both)"
    exit 2
fi
if [ -f "$stash/manifest.txt" ] && ! cmp -s "$parts/manifest.txt" "$stash/manifest.txt"; then
    echo "gpu_dali: the parts were cut again since the stash began: starting it afresh"
    rm -rf "${stash:?}"/*
fi
cp "$parts/manifest.txt" "$stash/"
for part in "$parts"/part-*; do
    [ -e "$part" ] && cp "$part" "$stash/" && echo "gpu_dali: stashed $(basename "$part") in $stash"
done

cd "$stash" || exit 2
if [ ! -f site/.installed ]; then
    missing=()
    while read -r sum name; do
        [[ $name == part-* ]] || continue
        if [ ! -f "$name" ]; then
            missing+=("$name")
        elif ! echo "$sum  $name" | sha256sum -c --status; then
            echo "gpu_dali: $name does not match its checksum (cut short in transit?): carry it again"
            rm -f "$name"
            missing+=("$name")
        fi
    done <manifest.txt
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "gpu_dali: still missing ${missing[*]}; carry the manifest and the next of them in a call right after this"
        exit 3
    fi
    cat part-* >dali.tar && grep ' dali.tar$' manifest.txt | sha256sum -c --status || {
        echo "gpu_dali: the parts do not add up to the manifest's dali.tar: cut them again (prepare_wheels.sh --dali)"
        rm -f dali.tar
        exit 2
    }
    rm -rf wheels site && tar -xf dali.tar && rm -f dali.tar
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target site wheels/*.whl || {
        echo "gpu_dali: pip could not install the DALI wheels (the parts stay stashed: the next call tries again)"
        exit 2
    }
    touch site/.installed
    rm -f part-*  # only now: a failed install keeps what the calls brought
    echo "gpu_dali: installed $(ls wheels/*.whl | wc -l) wheels into $stash/site"
fi
cd "$repo" || exit 2

# shellcheck source=benchmarks/gpu_env.sh
. benchmarks/gpu_env.sh
gpu_env
export PYTHONPATH="$PYTHONPATH:$stash/site"
gpu_wheels gpu_dali || exit 2  # open_clip, DeepSpeed and the rest: installed now, or by an earlier gpu_suite.sh
"$py" -c "import nvidia.dali as d; print('gpu_dali: DALI', d.__version__, 'from', d.__file__)" || exit 2
quick=()
[ "$mode" = "--dry" ] && quick=(--quick)
status=0
timeout -s INT -k 15 240 "$py" -m pytest -q -p no:cacheprovider -m gpu tests/test_train.py tests/test_data.py -k dali \
    --junitxml="$out/dali_tests.xml" || status=1
timeout -s INT -k 15 120 "$py" -m pytest -q -p no:cacheprovider -m gpu "${quick[@]}" benchmarks/bench_data.py \
    -k "test_data_gpu and dali" --results "$out/dali_bench.json" || status=1
echo "gpu_dali: done, status $status"
exit $status
