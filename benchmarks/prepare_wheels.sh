#!/usr/bin/env bash
# Wheels that a bare GPU machine (Python 3.12; torch, triton, numpy, pytest, pytest-benchmark, timm, regex,
# huggingface-hub there) lacks, into DIR (default .whl/, git-ignored):
#   benchmarks/prepare_wheels.sh [DIR]   then on the GPU machine: FASTCLIP_WHEELS=DIR benchmarks/gpu_suite.sh OUT
# DALI and what it needs there (about 250 MB, more than one call may carry), as one tar cut into parts of 52 MiB
# (one part beside the main wheels still fits a call) with a manifest of checksums, into DIR (default .dali/,
# git-ignored): each call carries the manifest and one part (benchmarks/gpu_dali.sh says how):
#   benchmarks/prepare_wheels.sh --dali [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64)
pip_dl() {  # pip_dl DIR REQUIREMENT...
    local into=$1
    shift
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
        -d "$into" "$@"
}

if [ "${1:-}" = "--dali" ]; then
    dir=${2:-.dali}
    rm -rf "$dir"
    mkdir -p "$dir/wheels"
    # nvidia-dali's requirements, the image's own left out (numpy, packaging, six, PyYAML); of nvImageCodec's
    # extras only nvJPEG: fastclip's shards hold JPEGs (and PNGs, decoded on the CPU)
    pip_dl "$dir/wheels" nvidia-dali-cuda130==2.4.0 nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-nvjpeg==13.0.4.44 \
        nvidia-libnvcomp-cu13==5.3.0.16 astunparse==1.6.3 gast==0.7.0 optree==0.20.0 nvtx==0.2.17 makefun==1.16.0 \
        libcst==1.9.0
    tar -C "$dir" -cf "$dir/dali.tar" wheels  # wheels are zip files: compressing again gains nothing
    rm -rf "$dir/wheels"
    split -b 52M -d -a 2 "$dir/dali.tar" "$dir/part-"
    (cd "$dir" && sha256sum dali.tar part-* >manifest.txt)
    rm "$dir/dali.tar"
    ls -la "$dir"
    exit 0
fi

dir=${1:-.whl}
mkdir -p "$dir"
pip_dl "$dir" open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.2.13 braceexpand==0.1.7 hjson==3.1.0 \
    pydantic==2.12.5 pydantic-core==2.41.5 annotated-types==0.7.0 typing-inspection==0.4.2 webdataset==0.2.86
# deepspeed ships as an sdist: build its (pure-Python) wheel here
python3 -m pip wheel -q --no-deps -w "$dir" deepspeed==0.19.8
ls -la "$dir"
