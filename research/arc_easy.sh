#!/usr/bin/env bash
# ARC-Easy (docs/tasks.md, "ARC-Easy"): each bundled member alone, the three ensembles of
# docs/results.md with product and mixture, each ensemble calibrated on the validation rows and
# its choice evaluated on the 1000 test rows, and the calibrated setups again through lm-eval's
# own command line. Every command resumes: run the script again after an interruption.
# Run from the repository root with ../shared beside it; one CPU (taskset) when another job runs.
set -euo pipefail
cd "$(dirname "$0")/.."
TASK=examples/arc_easy.yaml
OUT=${ARC_OUT:-runs/arc}
declare -A ENSEMBLES=(
  [default]=smollm2-135m,qwen2.5-coder-0.5b
  [gemma-qwen]=gemma3-270m,qwen2.5-coder-1.5b
  [qwens]=qwen2.5-coder-1.5b,qwen2.5-coder-0.5b
)
run() { echo "+ $*" >&2; "$@"; }

members() {
  for m in smollm2-135m gemma3-270m qwen2.5-coder-0.5b qwen2.5-coder-1.5b; do
    run fuselm eval --task $TASK --models $m --threads 1 --out $OUT/test/$m --no-progress >/dev/null
  done
}
fused() {  # ENSEMBLE: product and mixture of its members on the test rows
  for method in product mixture; do
    run fuselm eval --task $TASK --models ${ENSEMBLES[$1]} --method $method --threads 1 --out $OUT/test/$1-$method --no-progress >/dev/null
  done
}
calibrated() {  # ENSEMBLE: calibrated on the validation rows, its choice on the test rows
  run fuselm calibrate --task $TASK --models ${ENSEMBLES[$1]} --threads 1 --out $OUT/$1.calib.yaml --no-progress >/dev/null
  run fuselm eval --task $TASK --calibration $OUT/$1.calib.yaml --threads 1 --out $OUT/test/$1-calibrated --no-progress >/dev/null
}
through_lm_eval() {  # ENSEMBLE: the calibrated setup through lm-eval's own command line (from the task file's directory)
  [ -d "$OUT/lm-eval/$1" ] && return 0
  (cd examples && run fuselm lm-eval --model fuselm --model_args "calibration=../$OUT/$1.calib.yaml,progress=false" \
    --tasks arc_easy --include_path . --output_path "../$OUT/lm-eval/$1" --log_samples >"../$OUT/lm-eval-$1.txt" 2>&1)
}
fused_through_lm_eval() {  # ENSEMBLE METHOD: a fused rule through lm-eval's command line
  [ -d "$OUT/lm-eval/$1-$2" ] && return 0
  (cd examples && run fuselm lm-eval --model fuselm --model_args "models=${ENSEMBLES[$1]//,/+},method=$2,progress=false" \
    --tasks arc_easy --include_path . --output_path "../$OUT/lm-eval/$1-$2" --log_samples >"../$OUT/lm-eval-$1-$2.txt" 2>&1)
}

# Arguments: the steps to run (default: all), e.g. `research/arc_easy.sh "fused qwens" "calibrated qwens"`.
if [ $# -eq 0 ]; then
  set -- members
  for ens in default gemma-qwen qwens; do set -- "$@" "fused $ens" "calibrated $ens" "through_lm_eval $ens"; done
  set -- "$@" "fused_through_lm_eval default product"
fi
for step in "$@"; do $step; done
echo "done: fuselm report $OUT/test/* --baseline qwen2.5-coder-1.5b" >&2
