#!/usr/bin/env bash
# GPU check: every test (GPU ones included), the layer bench, and per-kernel
# times of conv2 (with cuDNN for a ratio when PyTorch imports), and the whole
# training step against PyTorch eager (PyTorch is optional: pip install -e '.[compare]';
# without it the step stage still times every minireuse row and its table says the
# PyTorch row was skipped and why); writes
# $OUT_DIR/<date>-<device>.md and .json with the device name, the commit and the numbers.
#
#   bash scripts/gpu_check.sh            (make gpu-check)
#   OUT_DIR=gpu_results DATA=data PYTHON=python3 bash scripts/gpu_check.sh
#
# Every stage runs even when an earlier one failed; each failure is reported and
# the exit status is non-zero if any stage failed. Stage time limits keep the
# whole run under 7 minutes.
set -u

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT_DIR=${OUT_DIR:-gpu_results}
DATA=${DATA:-data}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT_DIR"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

STAGES=()
STATUS=()
run_stage() {   # name, time limit in seconds, command...
    local name=$1 limit=$2
    shift 2
    echo "=== $name"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$WORK/$name.log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 124 ] && echo "=== $name: timed out after ${limit}s"
    echo "=== $name: exit $rc ($((SECONDS - start)) s)"
    STAGES+=("$name")
    STATUS+=("$rc")
}

PARALLEL=()
"$PYTHON" -c "import xdist" 2>/dev/null && PARALLEL=(-n 8)
run_stage tests 240 "$PYTHON" -m pytest -q -rs ${PARALLEL[@]+"${PARALLEL[@]}"} tests
run_stage bench 60 "$PYTHON" -m minireuse bench layers --quiet --data "$DATA" --layers conv2,fc3 \
    --family offset --repeats 3 --json "$WORK/bench_gpu.json"
run_stage kernels 40 "$PYTHON" scripts/kernel_times.py --data "$DATA" --repeats 10 \
    --json "$WORK/kernel_times.json" --markdown "$WORK/kernel_times.md"
run_stage step 60 "$PYTHON" -m minireuse bench step --data "$DATA" --quiet \
    --json "$WORK/step_gpu.json"
[ -f "$WORK/bench_gpu.json" ] && cp "$WORK/bench_gpu.json" "$OUT_DIR/bench_gpu.json"
[ -f "$WORK/step_gpu.json" ] && cp "$WORK/step_gpu.json" "$OUT_DIR/step_gpu.json"

STAGE_LIST=$(IFS=,; echo "${STAGES[*]}")
STATUS_LIST=$(IFS=,; echo "${STATUS[*]}")
"$PYTHON" - "$WORK" "$OUT_DIR" "$STAGE_LIST" "$STATUS_LIST" <<'EOF'
import datetime, json, re, subprocess, sys
from pathlib import Path

work, out_dir, names, codes = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3].split(","), sys.argv[4].split(",")
try:
    import cupy
    device = cupy.cuda.runtime.getDeviceProperties(0)["name"]
    device = device.decode() if isinstance(device, bytes) else device
except Exception as e:  # no GPU: the report still says why
    device = f"no GPU ({type(e).__name__})"
try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    commit = commit.stdout.strip() if commit.returncode == 0 and commit.stdout.strip() else "unknown"
except (OSError, subprocess.SubprocessError):
    commit = "unknown"
date = datetime.date.today().isoformat()
stem = f"{date}-{re.sub(r'[^A-Za-z0-9]+', '-', device).strip('-')}"


def load(name):
    path = work / name
    return json.loads(path.read_text()) if path.exists() else None


def tail(name, n):
    path = work / f"{name}.log"
    return "\n".join(path.read_text().splitlines()[-n:]) if path.exists() else "(no output)"


stages = {n: int(c) for n, c in zip(names, codes)}
report = dict(date=date, device=device, commit=commit, stages=stages,
              bench=load("bench_gpu.json"), kernels=load("kernel_times.json"), step=load("step_gpu.json"))
lines = [f"# GPU check {date}: {device}", "", f"commit {commit}", "", "| stage | exit |", "|---|---|"]
lines += [f"| {n} | {c} |" for n, c in stages.items()]
lines += ["", "## tests", "", "```text", tail("tests", 30), "```", "", "## layer bench", "", "```text",
          tail("bench", 40), "```", "", "## training step (bench step)", "", "```text",
          tail("step", 25), "```", ""]
kernels = work / "kernel_times.md"
lines.append(kernels.read_text() if kernels.exists() else "## conv2 kernels\n\n(not measured: see the exit status)\n")
(out_dir / f"{stem}.json").write_text(json.dumps(report, indent=1))
(out_dir / f"{stem}.md").write_text("\n".join(lines))
print(f"wrote {out_dir / stem}.md and .json")
EOF
REPORT_RC=$?

FAILED=0
for i in "${!STAGES[@]}"; do
    if [ "${STATUS[$i]}" -ne 0 ]; then
        echo "FAILED: ${STAGES[$i]} (exit ${STATUS[$i]})"
        FAILED=1
    fi
done
[ "$REPORT_RC" -ne 0 ] && { echo "FAILED: report (exit $REPORT_RC)"; FAILED=1; }
[ "$FAILED" -eq 0 ] && echo "gpu-check: all stages passed"
exit "$FAILED"
