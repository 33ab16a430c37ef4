#!/usr/bin/env bash
# One prepared check of dcnv2 on a fresh CUDA machine with torch already installed (docs/gpu.md).
#
#   OUT=/some/dir bash scripts/gpu_check.sh            # on the GPU machine: ~8 minutes
#   OUT=/tmp/gc bash scripts/gpu_check.sh --dry-run    # anywhere: the same steps on the CPU at tiny sizes
#
# Steps: build the extension against the installed torch; the CUDA tests (pytest -m cuda); benchmarks/cuda_ops.py
# in float32/float16/bfloat16 (default and deterministic backward; RoI pooling vs roi_align); AMP training steps of
# the paper's R-50 Faster R-CNN mdconv-c3c5-mdpool and of the dcnv2 mimicking preset at 800 px; torch.compile of a
# DCNv2 layer; CUDA vs CPU on random layers. Everything goes to $OUT/gpu_check.md (the summary table and each
# step's output) and $OUT/models.json; a failed step is reported and the others still run. Exit status 1 if any
# step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
OUT="${OUT:-outputs/gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
REPORT="$OUT/gpu_check.md"
SUMMARY=()
START=$(date +%s)
: > "$REPORT"

step() {  # step NAME TIMEOUT_S COMMAND...
  local name="$1" limit="$2"; shift 2
  local t0=$(date +%s) log="$OUT/step.log" status
  echo "== $name" | tee -a "$REPORT"
  timeout "$limit" "$@" > "$log" 2>&1
  status=$?
  local dt=$(( $(date +%s) - t0 ))
  { echo '```'; tail -c 6000 "$log"; echo '```'; echo; } >> "$REPORT"
  tail -n 4 "$log"
  if [[ $status -eq 0 ]]; then SUMMARY+=("| $name | ok | ${dt} s |")
  elif [[ $status -eq 124 ]]; then SUMMARY+=("| $name | TIMED OUT after ${limit} s | ${dt} s |")
  else SUMMARY+=("| $name | FAILED (exit $status) | ${dt} s |"); fi
}

if [[ $DRY -eq 1 ]]; then
  echo "gpu_check: DRY RUN on the CPU (tiny sizes, Triton interpreter for the benchmark; numbers mean nothing)" | tee -a "$REPORT"
  step "extension importable (dry run: not rebuilt)" 120 "$PY" -c "import dcnv2, dcnv2._C; print('dcnv2', dcnv2.__file__)"
  step "CUDA tests, rehearsed on the CPU kernels" 300 env DCNV2_CUDA_TESTS_ON_CPU=1 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py
  step "benchmarks/cuda_ops.py --smoke" 300 "$PY" benchmarks/cuda_ops.py --smoke
  step "models: AMP training, torch.compile, CUDA vs CPU" 400 "$PY" scripts/gpu_check_models.py --out "$OUT/models.json" --dry-run
else
  step "environment" 60 "$PY" -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name()); import triton; print('triton', triton.__version__)"
  step "build the extension against this torch" 240 "$PY" -m pip install --no-build-isolation --no-deps -e .
  step "dcnv2 backend" 60 "$PY" -c "import dcnv2.ops.triton as t; print(t.describe())"
  step "CUDA tests" 180 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py
  for dtype in float32 float16 bfloat16; do
    step "benchmarks/cuda_ops.py --dtype $dtype" 120 "$PY" benchmarks/cuda_ops.py --dtype "$dtype" --repeats 10
  done
  step "models: AMP training, torch.compile, CUDA vs CPU" 200 "$PY" scripts/gpu_check_models.py --out "$OUT/models.json"
fi

{
  echo "## Summary ($(( $(date +%s) - START )) s in all)"
  echo
  echo "| step | result | time |"
  echo "|---|---|---:|"
  printf '%s\n' "${SUMMARY[@]}"
} > "$OUT/summary.md"
cat "$OUT/summary.md" | tee -a "$REPORT"
grep -qE "FAILED|TIMED OUT" "$OUT/summary.md" && exit 1
exit 0
