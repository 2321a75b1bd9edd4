#!/usr/bin/env bash
# Wheels that a bare GPU machine (Python 3.12; torch, triton, numpy, pytest, pytest-benchmark, timm, regex,
# huggingface-hub there) lacks, into DIR (default .whl/, git-ignored):
#   benchmarks/prepare_wheels.sh [DIR]   then on the GPU machine: FASTCLIP_WHEELS=DIR benchmarks/gpu_suite.sh OUT
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.whl}
mkdir -p "$dir"
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
pip_dl() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" -d "$dir" "$@"; }
pip_dl open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.2.13 braceexpand==0.1.7 hjson==3.1.0 \
    pydantic==2.12.5 pydantic-core==2.41.5 annotated-types==0.7.0 typing-inspection==0.4.2 webdataset==0.2.86
# deepspeed ships as an sdist: build its (pure-Python) wheel here
python3 -m pip wheel -q --no-deps -w "$dir" deepspeed==0.19.8
ls -la "$dir"
