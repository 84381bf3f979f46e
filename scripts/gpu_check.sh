#!/usr/bin/env bash
# Everything the GPU work needs from a lent NVIDIA machine, in as few calls as possible.
#
#   scripts/gpu_check.sh env tests kernels profile train bench    # any subset of the stages, in any order
#
# Logs go to $OUT (the device tool's return folder) or ./gpu_logs. The machine has no network and
# no ../shared: when ../shared/data is absent, a copy carried in .devdata/ is put there first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_logs}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MINIGPT_OFFLINE=1
if [ ! -e ../shared/data ] && [ -d .devdata ]; then mkdir -p ../shared && cp -r .devdata ../shared/data; fi

stage() {  # stage NAME TIMEOUT_S COMMAND...: run with a time limit, log to $OUT/NAME.log, say how it ended
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >>"$OUT/$name.log" 2>&1
    echo "[$name] exit $? after $((SECONDS - t0)) s: $*" | tee -a "$OUT/$name.log"
}

for s in "$@"; do
    case $s in
    env)
        {
            nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
            $PY -c 'import sys, numpy, cupy, torch; print(sys.version.split()[0], "numpy", numpy.__version__,
                    "cupy", cupy.__version__, "torch", torch.__version__, "cuda", cupy.cuda.runtime.runtimeGetVersion())'
        } >"$OUT/env.log" 2>&1
        cat "$OUT/env.log"
        ;;
    tests)  # the whole suite (GPU tests included), then the GPU tests with the kernels switched off
        stage tests "${TESTS_LIMIT:-300}" $PY -m pytest -q -rfEs -p no:cacheprovider --timeout=120 ${PYTEST_ARGS:-}
        MINIGPT_NO_CUDA_KERNELS=1 stage tests "${TESTS_LIMIT:-300}" \
            $PY -m pytest -q -rfE -p no:cacheprovider --timeout=120 -m gpu tests/gpu tests/test_cuda_ops.py
        ;;
    bench)  # bench_train.py side by side with PyTorch eager on the GPU
        for config in ${BENCH_CONFIGS:-M GPT2}; do
            for tf32 in "" --tf32; do
                stage bench "${BENCH_LIMIT:-150}" $PY scripts/bench_train.py --preset "$config" --device cuda --vs-torch \
                    --steps "${BENCH_STEPS:-10}" $tf32
            done
        done
        grep -E "^config|GEMM peak|^minigpt|^torch|ratio" "$OUT/bench.log"
        ;;
    kernels)  # each CUDA kernel against the CuPy array code it replaces
        for config in M GPT2; do stage kernels 120 $PY scripts/bench_kernels.py --config $config; done
        grep -vE "^\[" "$OUT/kernels.log"
        ;;
    profile)  # where the host time of a config-M training step goes (cProfile, minigpt alone)
        stage profile 120 $PY -m cProfile -s tottime scripts/bench_train.py --child minigpt --preset M --device cuda --steps 30
        grep -A 30 "Ordered by" "$OUT/profile.log"
        ;;
    train)  # the default Shakespeare run on the GPU (compare its val loss with the CPU run's)
        stage train "${TRAIN_LIMIT:-300}" $PY scripts/train_gpt.py --device cuda --out-dir /tmp/gpu_run \
            --data ../shared/data/tinyshakespeare.txt ${TRAIN_ARGS:-}
        grep -E "val loss|tokens/s|^\[train\]" "$OUT/train.log" | tail -6
        ;;
    *) echo "unknown stage $s (env tests kernels profile train bench)" >&2; exit 2 ;;
    esac
done
