#!/usr/bin/env bash
# The one prepared command for a machine with a CUDA GPU and a CUDA torch but no network (nothing is installed:
# it uses the system python with the torch, triton, transformers, peft, accelerate and pytest-benchmark there).
#
#   tools/gpu_check.sh [OUTDIR]      # OUTDIR: $1, else $OUT, else ./gpu_check_out
#
# Without a GPU (no torch, or torch.cuda.is_available() false) it says so and exits 0, touching nothing.
# Otherwise, each phase under `timeout` and the whole run under 8 minutes:
#   1. env      nvidia-smi, python / torch / triton versions                          -> OUTDIR/env.txt
#   2. build    python setup.py build_ext --inplace (CUDAExtension for this GPU's arch) -> OUTDIR/build.log
#   3. tests    pytest tests -m cuda: every test that needs CUDA (the CUDA and Triton backend sweeps, the Triton
#               query tiling, CUDA graphs, CUDA topk order)                            -> OUTDIR/tests.log, tests.xml
#   4. bench    the GPU benchmarks: kernels on the 'gpu-large' shapes, then the engine vs baselines on the
#               random-weight Qwen2-VL-7B shapes ('7b-bf16')      -> OUTDIR/bench_{ops,engine}.{log,json}
# OUTDIR/summary.txt has each phase's exit status and seconds; the script exits 1 if any phase failed or did
# not fit in the budget (GPU_CHECK_BUDGET_S, default 470 s; a phase gets min(its cap, the time left)).
set -uo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-$(command -v python || command -v python3 || true)}"
if [ -z "$PY" ]; then
  echo "gpu_check: no python on PATH; nothing to do"
  exit 0
fi
if ! why="$("$PY" - 2>&1 <<'EOF'
import sys
try:
    import torch
except Exception as e:  # noqa: BLE001 - any import failure means: no usable torch here
    sys.exit(f"torch cannot be imported ({type(e).__name__}: {e})")
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} sees no CUDA device (torch.version.cuda={torch.version.cuda})")
EOF
)"; then
  echo "gpu_check: no GPU: ${why##*$'\n'}; nothing to do"
  exit 0
fi

OUTDIR="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
START=$(date +%s)
DEADLINE=$((START + ${GPU_CHECK_BUDGET_S:-470}))   # default: 8 minutes, less a margin for the summary
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
SUMMARY="$OUTDIR/summary.txt"
: > "$SUMMARY"
FAILED=0

# run NAME CAP_SECONDS LOG CMD...: CMD under `timeout min(CAP, time left)`, output to LOG, status to the summary.
run() {
  local name=$1 cap=$2 log=$3
  shift 3
  local left=$((DEADLINE - $(date +%s)))
  local limit=$((cap < left ? cap : left))
  if [ "$limit" -le 5 ]; then
    echo "$name: not run (time budget spent)" | tee -a "$SUMMARY"
    FAILED=1
    return 0
  fi
  local t0 rc
  t0=$(date +%s)
  echo "gpu_check: $name (limit ${limit}s) -> $log"
  timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
  rc=$?
  local verdict="ok"
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then verdict="TIMED OUT"; elif [ $rc -ne 0 ]; then verdict="FAILED"; fi
  [ "$verdict" = "ok" ] || FAILED=1
  echo "$name: $verdict (exit $rc, $(( $(date +%s) - t0 ))s)" | tee -a "$SUMMARY"
  tail -n 3 "$log" | sed 's/^/    /'
}

run env 30 "$OUTDIR/env.txt" bash -c '
  nvidia-smi || true
  "$0" - <<EOF
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton: not installed")
EOF' "$PY"

# Only this GPU's architecture: a fat binary for every arch would take several times longer to compile.
ARCH="$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability(0))' 2>/dev/null)"
run build 240 "$OUTDIR/build.log" env ${ARCH:+TORCH_CUDA_ARCH_LIST=$ARCH} MAX_JOBS="$(nproc)" \
  "$PY" setup.py build_ext --inplace
run build-check 60 "$OUTDIR/build_check.txt" "$PY" -c '
import torch, lvr_engine.ops as ops
have = ops.available_backends()
print(have)
assert "cuda" in have["cuda"], "the CUDA backend did not build: see build.log"'

run tests 150 "$OUTDIR/tests.log" "$PY" -m pytest tests -m cuda -q -rs -p no:cacheprovider \
  --continue-on-collection-errors --junitxml="$OUTDIR/tests.xml"

export LVR_BENCH_BUDGET_S="${LVR_BENCH_BUDGET_S:-5}"   # seconds of rounds per engine benchmark
run bench-ops 120 "$OUTDIR/bench_ops.log" "$PY" -m pytest benchmarks/test_ops.py --benchmark-only -k gpu -q \
  -p no:cacheprovider --benchmark-json="$OUTDIR/bench_ops.json"
run bench-engine 240 "$OUTDIR/bench_engine.log" "$PY" -m pytest benchmarks/test_engine.py --benchmark-only -k 7b \
  -q -p no:cacheprovider --benchmark-json="$OUTDIR/bench_engine.json"
[ -f benchmarks/.benchmarks/last_engine_results.json ] && cp benchmarks/.benchmarks/last_engine_results.json \
  "$OUTDIR/engine_ratios.json"

echo "total: $(( $(date +%s) - START ))s" | tee -a "$SUMMARY"
echo "gpu_check: logs in $OUTDIR"
exit $FAILED
