# shellcheck shell=bash
# Sourced by benchmarks/gpu_suite.sh and benchmarks/gpu_dali.sh, from the checkout's root, with $py set: what a
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
