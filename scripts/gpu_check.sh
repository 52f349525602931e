#!/usr/bin/env bash
# GPU check (make gpu-check): one prepared run that a short GPU loan can afford twice.
#
#   make gpu-check                                  (make's own .venv, installed first)
#   make gpu-check PYTHON=python3                   (that interpreter as it is, from this source tree)
#   OUT_DIR=gpu_results DATA=data PYTHON=python3 bash scripts/gpu_check.sh
#
# Preflight first: CuPy imports, a device is visible, one kernel compiles and runs. Without
# that it prints one line saying why and exits 3 within seconds, writing nothing. Then the
# stages, each under its own time limit (at most 7.5 minutes in all), each writing its
# results into OUT_DIR/<UTC time>-<device>/ as it finishes, with summary.md rewritten after
# every stage (device, CuPy/CUDA versions, commit), so a run cut short still reports:
#   tests      the suite's GPU cases (MINIREUSE_GPU_ONLY: the CPU cases are the CPU suite's and
#              would not fit the stage); one skipped for lack of a GPU fails it
#              (MINIREUSE_REQUIRE_GPU, tests/conftest.py)
#   kernels    per-kernel times of conv2, with cuBLAS and cuDNN (PyTorch) from the same run
#   bench      the layer bench of conv2 and fc3
#   step       the whole training step: eager, CUDA graph, PyTorch when it imports
#   train-*    one epoch on 5000 images, exact and with reuse (needs CIFAR-10 in DATA)
# Everything runs with --device gpu. Exit status: 0 when every stage passed.
set -u

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT_DIR=${OUT_DIR:-gpu_results}
DATA=${DATA:-data}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1

RUN=$(timeout 25 "$PYTHON" scripts/gpu_check_report.py preflight "$OUT_DIR")
rc=$?
if [ "$rc" -ne 0 ]; then
    case $rc in
        3) echo "$RUN" ;;
        124) echo "gpu-check: no usable GPU, nothing measured or written: the preflight did not finish in 25 s" ;;
        *) echo "gpu-check: no usable GPU, nothing measured or written: the preflight with $PYTHON failed (exit $rc)" ;;
    esac
    exit 3
fi
echo "gpu-check: results go to $RUN"

FAILED=()
run_stage() {   # name, time limit in seconds, command...
    local name=$1 limit=$2
    shift 2
    echo "=== $name (at most ${limit} s)"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$RUN/$name.log"
    local rc=${PIPESTATUS[0]}
    local status="passed"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        status="timed out after ${limit} s"
    elif [ "$rc" -ne 0 ]; then
        status="failed (exit $rc)"
    fi
    [ "$status" = passed ] || FAILED+=("$name: $status")
    printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" >> "$RUN/stages.tsv"
    "$PYTHON" scripts/gpu_check_report.py summary "$RUN" || FAILED+=("summary after $name")
    echo "=== $name: $status ($((SECONDS - start)) s)"
}

MINIREUSE_GPU_ONLY=1 MINIREUSE_REQUIRE_GPU=1 run_stage tests 210 "$PYTHON" -m pytest -q -rs -p no:cacheprovider \
    --junitxml="$RUN/tests.xml" tests
run_stage kernels 50 "$PYTHON" scripts/kernel_times.py --data "$DATA" --repeats 10 \
    --json "$RUN/kernel_times.json" --markdown "$RUN/kernel_times.md"
run_stage bench 40 "$PYTHON" -m minireuse bench layers --device gpu --quiet --data "$DATA" --layers conv2,fc3 \
    --family offset --repeats 3 --json "$RUN/bench_layers.json"
run_stage step 50 "$PYTHON" -m minireuse bench step --device gpu --data "$DATA" --quiet \
    --json "$RUN/bench_step.json"
for reuse in off adaptive; do
    run_stage "train-$reuse" 45 "$PYTHON" -m minireuse train --device gpu --data "$DATA" --no-download --quiet \
        --epochs 1 --limit-train 5000 --reuse "$reuse" --graph auto --out "$RUN/train-$reuse"
done

echo "gpu-check: wrote $RUN/summary.md"
if [ "${#FAILED[@]}" -gt 0 ]; then
    printf 'FAILED: %s\n' "${FAILED[@]}"
    exit 1
fi
echo "gpu-check: all stages passed"
