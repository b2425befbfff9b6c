#!/usr/bin/env bash
# SGLang 0.5.23 on a CPU-only machine, in a virtual environment of its own, for the
# remote-expert tests and benchmarks that talk to an SGLang server.
# SGLang's requirements pin a CUDA stack and torch==2.14.1, which cannot be installed
# here, so it is installed with --no-deps on torch 2.13.0 (CPU), together with the
# CPU-usable part of its requirements, each pinned and installed with --no-deps so that
# the resolver never pulls the CUDA stack. Two workarounds on top:
#  - torchvision 0.28.0 from PyPI is a CUDA build whose ops do not load on CPU torch;
#    two unguarded register_fake calls in torchvision/_meta_registrations.py then break
#    `import torchvision` (which SGLang imports), so they are skipped when the ops are
#    missing (patched below; the original is kept as _meta_registrations.py.orig);
#  - SGLang's CPU kernels (sgl_kernel) are not on PyPI: a stand-in package
#    (scripts/sglang_cpu/sgl_kernel) goes on PYTHONPATH and SGLang's CPU engine runs its
#    torch-native fallbacks. Checked with SmolLM2-135M (Llama architecture) only.
# Start a server with $VENV/bin/fuselm-sglang-server (written below), e.g.
#   fuselm-sglang-server --model-path DIR --host 127.0.0.1 --port P --dtype float32 \
#     --max-total-tokens 16384
# It sets OMP_NUM_THREADS (default 1), SGLANG_USE_CPU_ENGINE=1 and PYTHONPATH and adds
# --device cpu. Without --max-total-tokens SGLang sizes the KV cache to most of the
# free memory (12 GB for SmolLM2-135M here).
# The venv is at $FUSELM_SGLANG_VENV (default below); rerunning only checks it (and
# refreshes the stand-in and the launcher).
set -euo pipefail
VENV="${FUSELM_SGLANG_VENV:-$HOME/.cache/fuselm/sglang-venv}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STUB_SRC="$HERE/sglang_cpu/sgl_kernel/__init__.py"
[ -f "$STUB_SRC" ] || { echo "missing $STUB_SRC" >&2; exit 1; }

# The stand-in in a directory of its own (no .pth file: it is on the path only where
# the launcher puts it), and the launcher. Cheap, so done on every run.
install_stub_and_launcher() {
  VENV="$(cd "$VENV" && pwd)"
  mkdir -p "$VENV/sgl_kernel_stub/sgl_kernel"
  if ! cmp -s "$STUB_SRC" "$VENV/sgl_kernel_stub/sgl_kernel/__init__.py"; then
    cp "$STUB_SRC" "$VENV/sgl_kernel_stub/sgl_kernel/__init__.py"
  fi
  local launcher="$VENV/bin/fuselm-sglang-server" tmp
  tmp="$(mktemp)"
  cat > "$tmp" <<LAUNCHER
#!/usr/bin/env bash
# SGLang server on CPU (written by fuselm scripts/setup_sglang.sh).
# Usage: fuselm-sglang-server --model-path DIR [sglang.launch_server options]
export OMP_NUM_THREADS="\${OMP_NUM_THREADS:-1}"
export SGLANG_USE_CPU_ENGINE=1
export PYTHONPATH="$VENV/sgl_kernel_stub\${PYTHONPATH:+:\$PYTHONPATH}"
exec "$VENV/bin/python" -m sglang.launch_server --device cpu "\$@"
LAUNCHER
  if cmp -s "$tmp" "$launcher"; then rm -f "$tmp"; else mv "$tmp" "$launcher"; fi
  chmod 755 "$launcher"
}

# The imports that broke the server's start-up here, one by one: torchvision
# (unpatched), soundfile, sgl_kernel; http_server pulls in most of SGLang.
check() {
  OMP_NUM_THREADS=1 SGLANG_USE_CPU_ENGINE=1 PYTHONPATH="$VENV/sgl_kernel_stub" \
    "$VENV/bin/python" -W ignore -c "
import torch, torchvision, sgl_kernel, sglang
assert sgl_kernel.__version__ == '0.0.0-stub', sgl_kernel.__file__
import sglang.srt.entrypoints.http_server, sglang.srt.mem_cache.memory_pool
print('SGLang', sglang.__version__, 'torch', torch.__version__,
      'torchvision', torchvision.__version__, 'in', '$VENV')
"
}

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import sglang, torch" 2>/dev/null; then
  install_stub_and_launcher
  if check 2>/dev/null; then
    echo "SGLang already set up in $VENV"
    exit 0
  fi
  echo "SGLang in $VENV does not import; reinstalling" >&2
fi

python3 -m venv "$VENV"
install_stub_and_launcher
PINS="$VENV/fuselm-sglang-pins.txt"
# pip freeze of the venv this was first made to work in, less torch, sglang and
# torchvision (installed apart). setuptools is not in pip freeze; it was 84.2.1 there.
cat > "$PINS" <<'PINS'
setuptools==84.2.1
aiohappyeyeballs==2.7.1
aiohttp==3.14.5
aiosignal==1.4.0
annotated-doc==0.0.7
annotated-types==0.8.0
anthropic==2.16.0
anyio==4.16.0
apache-tvm-ffi==0.1.11
asttokens==3.0.2
attrs==26.1.0
blobfile==3.0.0
build==1.6.1
certifi==2026.10.19.post1
cffi==2.1.1
charset-normalizer==3.5.3
click==8.5.1
compressed-tensors==0.18.0
datasets==5.2.0
dill==0.4.1
distro==1.9.0
docstring_parser==0.18.0
easydict==1.14
einops==0.8.2
executing==2.3.0
fastapi==0.165.0
filelock==4.3.1
frozenlist==1.8.0
fsspec==2026.9.0
gguf==0.19.0
grpcio==1.85.3
grpcio-health-checking==1.85.1
grpcio-reflection==1.85.1
h11==0.16.0
hf-xet==1.8.0
httpcore==1.0.9
httpcore2==2.16.2
httpx==0.29.0
httpx2==2.16.2
huggingface_hub==1.33.0
idna==3.20
interegular==0.3.3
ipython==9.18.1
ipython_pygments_lexers==1.1.1
jedi==0.20.1
Jinja2==3.1.6
jiter==0.19.0
jsonschema==4.26.0
jsonschema-specifications==2025.9.1
llguidance==1.9.1
llvmlite==0.47.0
loguru==0.7.3
lxml==6.1.3
markdown-it-py==4.3.0
MarkupSafe==3.0.4
matplotlib-inline==0.2.2
mdurl==0.1.2
mistral_common==1.13.1
mpmath==1.3.0
msgspec==0.23.0
multidict==7.2.1
multiprocess==0.70.19
networkx==3.6.1
ninja==1.13.2
numba==0.65.1
numpy==2.3.5
nvidia-ml-py==13.615.71
openai==2.8.0
openai-harmony==0.0.4
opentelemetry-api==1.45.2
orjson==3.13.0
packaging==26.4
pandas==3.1.1
parso==0.8.7
partial-json-parser==0.2.1.1.post7
pexpect==4.9.0
pillow==13.0.0
prometheus_client==0.26.0
prompt_toolkit==3.0.53
propcache==0.5.4
protobuf==7.36.2
psutil==7.2.2
ptyprocess==0.7.0
pure_eval==0.2.4
py-spy==0.4.3
pyarrow==26.0.1
pybase64==1.5.1
pycountry==26.2.16
pycparser==3.12
pycryptodomex==3.24.2
pydantic==2.14.4
pydantic-extra-types==2.11.1
pydantic_core==2.50.5
Pygments==2.21.0
pyproject_hooks==1.3.3
python-dateutil==2.9.0.post0
python-multipart==0.0.34
PyYAML==6.0.4
pyzmq==27.3.0
referencing==0.37.0
regex==2026.11.19
requests==2.34.2
rich==15.0.0
rpds-py==2026.9.1
safetensors==0.8.0
scipy==1.17.1
sentencepiece==0.2.1
setproctitle==1.3.8
shellingham==1.5.4
six==1.17.0
smg-grpc-proto==0.4.28
smg-grpc-servicer==0.14.1
sniffio==1.3.1
soundfile==0.13.1
stack-data==0.6.3
starlette==1.10.0
sympy==1.14.0
tiktoken==0.14.0
timm==1.0.25
tokenizers==0.23.2
tqdm==4.70.1
traitlets==5.16.1
transformers==5.19.0
triton==3.9.0
truststore==0.10.5
typer==0.29.2
typing-inspection==0.4.5
typing_extensions==4.16.0
urllib3==2.8.0
uvicorn==0.55.0
uvloop==0.23.0
watchfiles==1.3.0
wcwidth==0.9.4
xgrammar==0.2.7
xxhash==4.1.0
yarl==1.25.1
zstandard==0.25.0
PINS
"$VENV/bin/pip" install -q --upgrade pip
# torch 2.13.0 (CPU; pip finds a local CPU wheel), its own requirements held to the pins.
"$VENV/bin/pip" install -q torch==2.13.0 -c "$PINS"
"$VENV/bin/pip" install -q --no-deps sglang==0.5.23 torchvision==0.28.0
"$VENV/bin/pip" install -q --no-deps -r "$PINS"

# torchvision: skip the two unguarded register_fake calls when its ops did not load.
"$VENV/bin/python" - <<'PY'
import pathlib, shutil, sysconfig
path = pathlib.Path(sysconfig.get_paths()["purelib"]) / "torchvision" / "_meta_registrations.py"
text = path.read_text()
if "_safe_register_fake" not in text:
    anchor = "import torchvision.extension  # noqa: F401\n"
    assert anchor in text and text.count("@torch.library.register_fake(") == 2, path
    shutil.copy2(path, path.with_name(path.name + ".orig"))
    helper = (
        "\n\ndef _safe_register_fake(*a, **k):\n"
        "    if not torchvision.extension._has_ops():\n"
        "        return lambda f: f\n"
        "    return torch.library.register_fake(*a, **k)\n"
    )
    text = text.replace(anchor, anchor + helper, 1)
    text = text.replace("@torch.library.register_fake(", "@_safe_register_fake(")
    path.write_text(text)
    print("patched", path)
PY
check
