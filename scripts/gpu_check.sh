#!/usr/bin/env bash
# The remote-expert checks on a GPU machine (when one is lent): vLLM's tests and the benchmark,
# with vLLM on the GPU instead of the CPU build. Needs a Python with vLLM importable:
# $FUSELM_VLLM_VENV (a venv with a CUDA vLLM; scripts/setup_vllm.sh makes the CPU one), else
# the current python. Prints a report; exits non-zero when a check fails.
#   scripts/gpu_check.sh            # tests/test_engines.py, then benchmarks/remote_speed.py
set -uo pipefail
cd "$(dirname "$0")/.."
VENV="${FUSELM_VLLM_VENV:-$HOME/.cache/fuselm/vllm-venv}"
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
  PY="$VENV/bin/python"
elif python -c "import vllm" 2>/dev/null; then
  PY="$(command -v python)"; mkdir -p "$VENV/bin"; ln -sf "$PY" "$VENV/bin/python"
else
  echo "no vLLM here: install a CUDA build of vLLM into $VENV (or the current python) first" >&2
  exit 2
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
echo "vLLM: $("$PY" -c 'import vllm; print(vllm.__version__)')"
rc=0
FUSELM_VLLM_VENV="$VENV" python -m pytest -q tests/test_engines.py || rc=$?
FUSELM_VLLM_VENV="$VENV" python benchmarks/remote_speed.py --prompts 8 --max-tokens 64 --rows 32 --concurrency 8 \
  --out "${OUT:-.}/remote_speed_gpu.json" || rc=$?
exit "$rc"
