"""An expert on llama-cpp-python's own server (`python -m llama_cpp.server`, extra `[server]`),
started on 127.0.0.1 with the bundled SmolLM2-135M GGUF, against the same file in process
(llama.cpp): generation through it, the refusal of everything that needs scores, and the
quirk that is the reason for that refusal."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import httpx
import pytest

from .conftest import requires_bundled, run_cli, wait_until_ready
from .engine_support import ResettingProxy, engine_process, free_port, remote_model

pytestmark = [pytest.mark.integration, requires_bundled("smollm2-135m")]

COUNT = "1, 2, 3, 4, 5,"
PROMPTS = ["The capital of France is", COUNT, "def fibonacci(n):", "Three rivers of Europe are"]
ANSWER = "Question: What is 2+2?\nAnswer:"


@pytest.fixture(scope="module")
def smollm_gguf():
    from fuselm.models import assets
    from fuselm.models.catalog import BUNDLED

    return assets.ensure_gguf(BUNDLED["smollm2-135m"])


@pytest.fixture(scope="module")
def llamacpp_server(smollm_gguf, tmp_path_factory):
    if importlib.util.find_spec("sse_starlette") is None or importlib.util.find_spec("starlette_context") is None:
        pytest.skip("llama-cpp-python's server extra is not installed (pip install 'llama-cpp-python[server]')")
    port = free_port()
    # llama_cpp.server, without the AMX weight buffers that crash it on such a CPU (as fuselm loads models)
    launcher = Path(__file__).resolve().parents[1] / "scripts" / "llamacpp_server.py"
    cmd = [sys.executable, str(launcher), "--model", str(smollm_gguf), "--host", "127.0.0.1",
           "--port", str(port), "--n_ctx", "2048", "--n_threads", "1"]  # fmt: skip
    yield from engine_process("llamacpp-server", cmd, port, "/v1/models", tmp_path_factory.mktemp("llamacpp"))


@pytest.fixture(scope="module")
def in_process():
    from fuselm.config import ModelConfig
    from fuselm.models.loading import load_model

    model = load_model(ModelConfig(name="smollm2-135m", backend="llamacpp", threads=1))
    yield model
    model.close()


def own_greedy(model, prompt: str, max_tokens: int):
    """The model's own greedy tokens after `prompt`, in one rollout (what llama.cpp's generation
    gives: each token after the tokens before it, never the committed text read back)."""
    session = model.session(prompt)
    try:
        return session.rollout(max_tokens)
    finally:
        session.close()


NEAR_TIE = 0.1  # top-1 minus top-2 probability under which two llama.cpp set-ups may choose apart


def same_or_near_tie(text: str, own) -> bool:
    """`text` is the model's own greedy text, or parts from it where the in-process top-2 were a
    near-tie (the server and this process batch their passes differently: float sums differ)."""
    if text == own.text:
        return True
    cut = next((i for i, (a, b) in enumerate(zip(text, own.text)) if a != b), min(len(text), len(own.text)))
    token = max(i for i, start in enumerate(own.token_offsets) if start <= cut)
    return own.margins[token] < NEAR_TIE


def test_single_through_the_server_is_the_models_own_greedy_text_in_one_request(llamacpp_server, in_process):
    from fuselm.config import GenerationConfig
    from fuselm.fusion.loop import generate

    remote = remote_model(llamacpp_server.url, name="smol-llamacpp", kind="llamacpp-server")
    same = 0
    for prompt in PROMPTS:
        before = remote.engine.requests["/v1/completions (stream)"]
        got = generate([remote], prompt, "single", GenerationConfig(max_new_tokens=24, chat="raw"))
        want = own_greedy(in_process, prompt, 24)
        assert got.text and same_or_near_tie(got.text, want), (got.text, want.text)
        if got.text == want.text:
            same += 1
            assert (got.stats.new_tokens, got.finish_reason == "eos") == (len(want.token_ids), want.finished)
        # the whole generation read one stream (the session read on in it, token by token)
        assert remote.engine.requests["/v1/completions (stream)"] - before == 1
    assert same >= 2
    # where the committed text reads back as the same tokens, in-process `single` agrees too
    gen = GenerationConfig(max_new_tokens=30, chat="raw")
    assert generate([remote], COUNT, "single", gen).text == generate([in_process], COUNT, "single", gen).text
    # a generation that ends on the model's end of sequence says so
    got = generate([remote], ANSWER, "single", GenerationConfig(max_new_tokens=200, chat="raw"))
    want = own_greedy(in_process, ANSWER, 200)
    assert (got.text, got.finish_reason) == (want.text, "eos" if want.finished else "length")
    # sampled on the server: a seed gives the same text twice
    sampled = GenerationConfig(max_new_tokens=16, chat="raw", temperature=0.9, seed=7)
    twice = [generate([remote], PROMPTS[0], "single", sampled).text for _ in range(2)]
    assert twice[0] == twice[1] and twice[0]


def test_stop_strings_and_a_stream_interrupted_by_another_request(llamacpp_server, in_process):
    from fuselm.config import GenerationConfig
    from fuselm.fusion.loop import generate

    remote = remote_model(llamacpp_server.url, name="smol-llamacpp", kind="llamacpp-server")
    gen = GenerationConfig(max_new_tokens=40, chat="raw", stop=["\n"])
    got = generate([remote], ANSWER, "single", gen).text
    assert got == own_greedy(in_process, ANSWER, 40).text.split("\n")[0] and got
    # The server runs one request at a time and a new one interrupts a running stream: a session
    # whose stream was cut reads what came and asks again from there. On a text whose tokens read
    # back as themselves (checked first), that gives the uninterrupted text wherever the cut fell.
    want = own_greedy(in_process, COUNT, 41).text
    assert want == generate([in_process], COUNT, "single", GenerationConfig(max_new_tokens=41, chat="raw")).text
    session = remote.session(COUNT)
    first = session.rollout(200, until=lambda r: len(r.text) if r.text else None)  # a stream of 200, one read
    assert len(first.token_offsets) == 1
    session.append(first.text)
    with httpx.Client(base_url=llamacpp_server.url, timeout=60) as client:  # another client's request
        client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 4, "temperature": 0})
    rest = session.rollout(40)
    session.close()
    assert first.text + rest.text == want
    assert session.stats.forward_passes == 2  # the interrupted stream, and the one asked again


def test_a_connection_reset_under_a_request_is_asked_again_and_too_many_are_one_error(llamacpp_server):
    from fuselm.config import GenerationConfig
    from fuselm.errors import EngineError
    from fuselm.fusion.loop import generate

    gen = GenerationConfig(max_new_tokens=12, chat="raw")
    direct = generate([remote_model(llamacpp_server.url, name="smol", kind="llamacpp-server")], COUNT, "single", gen)
    proxy = ResettingProxy(llamacpp_server.url, resets=2)  # fewer than the 3 attempts a request gets
    try:
        remote = remote_model(proxy.url, name="smol", kind="llamacpp-server")
        assert generate([remote], COUNT, "single", gen).text == direct.text
        assert proxy.reset == 2
    finally:
        proxy.close()
    proxy = ResettingProxy(llamacpp_server.url, resets=1000)  # a peer that resets everything
    try:
        remote = remote_model(proxy.url, name="smol", kind="llamacpp-server")
        with pytest.raises(EngineError, match=r"^expert 'smol': llamacpp-server at .*: ReadError \(.*\): \S") as e:
            generate([remote], COUNT, "single", gen)
        assert "\n" not in str(e.value) and proxy.reset == 3  # three attempts, then the one-line error
    finally:
        proxy.close()


def test_methods_that_need_scores_or_top_k_refuse_the_server_before_any_request(llamacpp_server, in_process):
    from fuselm.errors import FuselmError
    from fuselm.fusion.methods import build_method

    remote = remote_model(llamacpp_server.url, name="smol-llamacpp", kind="llamacpp-server")
    for method in ("adafuse", "fixed-span", "sequence-select", "token-average", "unite"):
        with pytest.raises(FuselmError, match=r"'smol-llamacpp' on llamacpp-server at .* gives rollouts") as e:
            build_method(method, [remote, in_process])
        assert "methods that run on it: single" in str(e.value)
    assert sum(remote.engine.requests.values()) == 0  # nothing was sent


def test_the_servers_echoed_log_probs_are_shifted_by_one_position(llamacpp_server, in_process):
    """The measured reason fuselm does not score through this server (llama-cpp-python 0.3.36,
    SmolLM2, which has no BOS): with `echo`, the log-prob reported at " Paris" is that of
    " Paris" after " Paris"; the right one sits in the previous position's top-k. If this test
    fails, the server was fixed and scoring through it can be reconsidered."""
    text = "The capital of France is Paris"
    session = in_process.session("The capital of France is")
    right = session.score([" Paris"])[0].logprob
    session.close()
    body = {"prompt": text, "echo": True, "logprobs": 5, "max_tokens": 1, "temperature": 0}
    with httpx.Client(base_url=llamacpp_server.url, timeout=60) as client:
        lp = client.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]
    i = lp["tokens"].index(" Paris")
    assert abs(lp["token_logprobs"][i] - right) > 1.0  # not the log-prob of " Paris" where it stands
    assert lp["top_logprobs"][i - 1][" Paris"] == pytest.approx(right, abs=0.05)  # one position early


def test_cli_generate_over_the_server_and_its_one_line_refusal(llamacpp_server, in_process):
    ref = f"smol=llamacpp-server:{llamacpp_server.url}"
    out = run_cli("generate", "--models", ref, "--raw", "--max-new-tokens", "12", PROMPTS[0])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == own_greedy(in_process, PROMPTS[0], 12).text.strip()
    refused = run_cli("generate", "--method", "adafuse", "--models", f"{ref},smollm2-135m", "--raw", PROMPTS[0])
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "method 'adafuse' needs" in refused.stderr and "'smol' on llamacpp-server" in refused.stderr


def test_fuselm_serve_with_the_server_as_its_model_from_the_command_line(llamacpp_server, in_process, tmp_path):
    import subprocess

    port = free_port()
    cmd = [sys.executable, "-m", "fuselm.cli", "serve", "--models", f"smol=llamacpp-server:{llamacpp_server.url}",
           "--id", "smol-lcs", "--port", str(port)]  # fmt: skip
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(proc, url, tmp_path / "serve.log")
        body = {"model": "smol-lcs", "prompt": COUNT, "max_tokens": 12}
        answer = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
        assert answer["choices"][0]["text"] == own_greedy(in_process, COUNT, 12).text
        assert answer["usage"]["completion_tokens"] == 12
        chat = {"model": "smol-lcs", "messages": [{"role": "user", "content": "hi"}]}
        refused = httpx.post(url + "/v1/chat/completions", json=chat, timeout=60)
        assert refused.status_code == 400 and "no chat template" in refused.json()["error"]["message"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
