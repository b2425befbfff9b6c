"""Experts on a real serving engine: a vLLM server (CPU build, its own virtual environment made
by scripts/setup_vllm.sh) started on 127.0.0.1 with SmolLM2-135M's float32 weights, against the
same weights in-process (transformers). Skips when that environment is absent."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

from .conftest import requires_bundled

httpx = pytest.importorskip("httpx")

VENV = Path(os.environ.get("FUSELM_VLLM_VENV", Path.home() / ".cache/fuselm/vllm-venv"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def smollm_hf_dir():
    from fuselm.models import assets
    from fuselm.models.catalog import BUNDLED

    return assets.ensure_converted(BUNDLED["smollm2-135m"])


@pytest.fixture(scope="module")
def vllm_url(smollm_hf_dir, tmp_path_factory):
    python = VENV / "bin" / "python"
    if not python.is_file():
        pytest.skip(f"vLLM not set up in {VENV} (scripts/setup_vllm.sh)")
    port = _free_port()
    log = open(tmp_path_factory.mktemp("vllm") / "vllm.log", "w")
    proc = subprocess.Popen(
        [
            str(python),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(smollm_hf_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--dtype",
            "float32",
            "--max-logprobs",
            "20",
            "--gpu-memory-utilization",
            "0.25",
        ],  # fmt: skip
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM exited: {Path(log.name).read_text()[-2000:]}")
            try:
                if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline:
                raise RuntimeError("vLLM not ready in 600 s")
            time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def local(smollm_hf_dir):
    from fuselm.models.hf import TransformersBackend

    return TransformersBackend.from_directory(smollm_hf_dir, name="smollm2-135m")


@pytest.mark.integration
@requires_bundled("smollm2-135m")
def test_vllm_tokenizes_scores_and_ranks_as_the_same_weights_in_process(vllm_url, local):
    from fuselm.models.engines import VLLMEngine

    engine = VLLMEngine(vllm_url)
    try:
        prompt = "The capital of France is"
        ids = engine.tokenize(prompt)
        assert ids == local.tokenize(prompt)  # the engine's own tokens, BOS handling included
        full = engine.tokenize(prompt + " Paris")
        assert full[: len(ids)] == ids and len(full) == len(ids) + 1
        cache = local.new_cache()
        lp = local.extend(cache, ids)
        top = engine.next_topk(ids, 5)
        assert len(top) == 5
        best = max(top, key=top.get)
        assert best == int(torch.argmax(lp))
        for tok, value in top.items():
            assert value == pytest.approx(float(lp[tok]), abs=2e-3)
        # two continuations of one prefix in one request, one of them an unlikely token
        other = int(torch.argsort(lp)[len(lp) // 2])
        scores = engine.score([full, ids + [other]], start=len(ids))
        assert scores[0][0] == pytest.approx(float(lp[full[-1]]), abs=2e-3)
        assert scores[1][0] == pytest.approx(float(lp[other]), abs=2e-3)
        with pytest.raises(ValueError):
            engine.score([full], start=0)
        # a greedy rollout with top-2: the same tokens as in-process greedy where the top-2
        # gap is clear (near-ties may go either way between engines), the same log-probs
        roll = engine.rollout(ids, 8, k=2)
        assert len(roll.token_ids) == len(roll.token_logprobs) == len(roll.top) <= 8
        compared = 0
        for tok, value, top in zip(roll.token_ids, roll.token_logprobs, roll.top):
            assert len(top) >= 2 and tok in top
            ranked = torch.topk(lp, 2)
            if float(ranked.values[0] - ranked.values[1]) < 0.05:
                break
            assert tok == int(ranked.indices[0]) and value == pytest.approx(float(lp[tok]), abs=2e-3)
            lp = local.extend(cache, [tok])
            compared += 1
        assert compared >= 1  # " Paris" is clear
    finally:
        engine.close()


def test_an_engine_that_is_not_there_is_a_one_line_error():
    from fuselm.models.engines import EngineError, VLLMEngine

    port = _free_port()
    with pytest.raises(EngineError, match=f"127.0.0.1:{port}"):
        VLLMEngine(f"http://127.0.0.1:{port}", model="m", timeout_s=2).tokenize("x")
