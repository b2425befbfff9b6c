"""llama-cpp-python's own server, `python -m llama_cpp.server ARGS`, loading models as fuselm's
llama.cpp backend does: on a CPU with AMX (`amx_tile` in /proc/cpuinfo), without llama.cpp's
"extra" weight buffers, whose AMX matmul in llama.cpp 0.3.36 crashes on the first decode of the
bundled Q4 models (SIGSEGV in ggml_backend_amx_mul_mat; see DEVELOPERS.md). Elsewhere it is the
server unchanged.

    python scripts/llamacpp_server.py --model MODEL.gguf --host 127.0.0.1 --port 8040 --n_ctx 2048
"""

from __future__ import annotations

import runpy

import llama_cpp.llama_cpp as lib

from fuselm.models.llamacpp import cpu_has_amx

if cpu_has_amx():
    _default = lib.llama_model_default_params

    def _no_extra_buffers():
        params = _default()
        params.use_extra_bufts = False
        return params

    lib.llama_model_default_params = _no_extra_buffers  # what llama_cpp.Llama asks for its model's params

runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
