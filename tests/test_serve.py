"""`fuselm serve`: the real server as a subprocess on 127.0.0.1, driven by the real `openai`
client and by plain HTTP (httpx), with tiny local models."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from .conftest import requires_bundled

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("sse_starlette")

KEY = "test-key-123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, config: dict, tmp: Path, env: dict | None = None):
        self.port = free_port()
        path = tmp / "serve.yaml"
        path.write_text(yaml.safe_dump({**config, "port": self.port}))
        self.log = open(tmp / "serve.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fuselm.cli", "serve", "--config", str(path)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        self.url = f"http://127.0.0.1:{self.port}"
        self.tmp = tmp
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {(tmp / 'serve.log').read_text()}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server not ready in 300 s")

    def client(self, key: str | None = KEY):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key or "none", max_retries=0, timeout=120)

    def post(self, path: str, body, key: str | None = KEY, **kw):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        if isinstance(body, (bytes, str)):
            return httpx.post(self.url + path, content=body, headers={**headers, "content-type": "application/json"},
                              timeout=120, **kw)  # fmt: skip
        return httpx.post(self.url + path, json=body, headers=headers, timeout=120, **kw)

    def metric(self, name: str, **labels) -> float:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        want = ",".join(f'{k}="{v}"' for k, v in labels.items())
        total = 0.0
        for line in text.splitlines():
            m = re.match(rf"^{name}(?:\{{([^}}]*)\}})? (\S+)$", line)
            if m and all(part in (m.group(1) or "") for part in want.split(",") if part):
                total += float(m.group(2))
        return total

    def stop(self) -> None:
        """SIGTERM: uvicorn finishes in-flight requests, shuts down, and exits by the signal."""
        self.proc.terminate()
        try:
            rc = self.proc.wait(timeout=60)
        finally:
            self.log.close()
        log = (self.tmp / "serve.log").read_text()
        assert rc in (0, -signal.SIGTERM), f"exit status {rc}\n{log}"
        assert "Traceback" not in log and "never retrieved" not in log, log


@pytest.fixture(scope="module")
def server(tiny_dirs, tmp_path_factory):
    if not {"llama", "qwen2"} <= tiny_dirs.keys():
        pytest.skip("needs the smollm2 and qwen tokenizers")
    llama, qwen = str(tiny_dirs["llama"]), str(tiny_dirs["qwen2"])
    config = {
        "api_key": KEY,
        "limits": {
            "max_concurrent": 1,
            "max_queue": 1,
            "max_tokens": 600,
            "max_n": 2,
            "max_prompt_tokens": 200,
            "max_body_bytes": 65536,
        },  # fmt: skip
        "setups": [
            {"id": "tiny", "models": [{"name": llama}], "generation": {"max_new_tokens": 12}},
            {
                "id": "fused",
                "models": [{"name": llama}, {"name": qwen}],
                "method": "adafuse",
                "generation": {"max_new_tokens": 12},
            },  # fmt: skip
        ],
    }
    s = Server(config, tmp_path_factory.mktemp("serve"))
    yield s
    # SIGTERM while a stream is generating: the stream ends and the server exits cleanly.
    client, resp, lines = _stream_lines(s, {"model": "fused", "prompt": "Once", "max_tokens": 480, "stream": True})
    assert next(line for line in lines if line.startswith("data:"))
    s.stop()
    rest = [line[5:].strip() for line in lines if line.startswith("data:")]  # the stream ended
    client.close()
    assert rest[-1] == "[DONE]" and json.loads(rest[-2])["error"]["code"] == "shutting_down", rest[-3:]


def test_models_health_ready(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    ready = httpx.get(server.url + "/ready").json()
    assert ready["status"] == "ready" and set(ready["models"]) == {"tiny", "fused"}
    models = server.client().models.list()
    assert {m.id for m in models.data} == {"tiny", "fused"}


@pytest.mark.parametrize("model", ["tiny", "fused"])
def test_streamed_answers_concatenate_to_the_plain_ones(server, model):
    c = server.client()
    plain = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "Tell me a story"}])
    assert plain.choices[0].finish_reason in {"stop", "length"}
    text = plain.choices[0].message.content
    assert text
    chunks = list(
        c.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Tell me a story"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed == text
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == plain.choices[0].finish_reason

    done = c.completions.create(model=model, prompt="The weather is", max_tokens=7)
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model=model, prompt="The weather is", max_tokens=7, stream=True) if ch.choices)  # fmt: skip
    assert streamed == done.choices[0].text and done.usage.completion_tokens <= 7


def test_usage_counts_the_tokens(server, tiny_dirs):
    from fuselm.models.hf import TransformersBackend

    c = server.client()
    r = c.completions.create(model="tiny", prompt="The weather is", max_tokens=5)
    backend = TransformersBackend.from_directory(tiny_dirs["llama"])
    assert r.usage.prompt_tokens == len(backend.tokenize("The weather is"))  # a completion's prompt is raw text
    assert r.usage.completion_tokens == 5 or r.choices[0].finish_reason == "stop"
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    raw = server.post("/v1/completions", {"model": "tiny", "prompt": "The weather is", "max_tokens": 5,
                                          "fuselm": {"trace": True}}).json()  # fmt: skip
    info = raw["choices"][0]["fuselm"]
    assert raw["choices"][0]["text"] == r.choices[0].text  # greedy: the same answer
    assert info["stats"]["new_tokens"] == r.usage.completion_tokens
    assert "".join(t["text"] for t in info["trace"]).startswith(r.choices[0].text)


def test_a_traced_stream_names_the_model_of_every_span(server):
    """With `fuselm.trace`, each streamed chunk carries its text cut by the winning model: the
    spans join to the chunk's text, and their sources follow the final trace."""
    body = {"model": "fused", "messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 12,
            "stream": True, "fuselm": {"trace": True}}  # fmt: skip
    client, resp, lines = _stream_lines(server, body, path="/v1/chat/completions")
    try:
        assert resp.status_code == 200
        events = [json.loads(line[5:]) for line in lines if line.startswith("data:") and "[DONE]" not in line]
    finally:
        resp.close()
        client.close()
    pieces, final = [], None
    for e in events:
        choice = e["choices"][0]
        ext = choice.get("fuselm") or {}
        if "spans" in ext:
            assert "".join(sp["text"] for sp in ext["spans"]) == choice["delta"]["content"] != ""
            pieces += ext["spans"]
        elif "trace" in ext:
            final = ext
    assert final is not None and pieces
    text = "".join(sp["text"] for sp in pieces)
    by_char = [st["source"] for st in final["trace"] for _ in st["text"]][: len(text)]
    assert [sp["source"] for sp in pieces for _ in sp["text"]] == by_char
    assert {sp["source"] for sp in pieces} <= set(final["models"])


def test_n_choices_and_models_loaded_once(server):
    r = server.client().completions.create(model="tiny", prompt="The weather is", max_tokens=4, n=2, temperature=1.0,
                                           seed=7)  # fmt: skip
    assert [c.index for c in r.choices] == [0, 1]
    assert r.usage.completion_tokens <= 8 and all(c.text for c in r.choices)
    # the largest seed: choice 1's own seed wraps around the 64-bit range
    top = server.post("/v1/completions", {"model": "tiny", "prompt": "The weather is", "max_tokens": 2, "n": 2,
                                          "temperature": 1.0, "seed": 2**63 - 1})  # fmt: skip
    assert top.status_code == 200 and len(top.json()["choices"]) == 2, top.text
    # two setups share the tiny llama model: it is loaded once (llama + qwen = 2 models)
    assert server.metric("fuselm_models_loaded") == 2


def test_the_fuselm_extension_picks_another_method(server):
    body = {"model": "fused", "prompt": "The weather is", "max_tokens": 6, "fuselm": {"method": "fixed-span",
            "options": {"n_words": 2}, "trace": True}}  # fmt: skip
    r = server.post("/v1/completions", body)
    assert r.status_code == 200, r.text
    info = r.json()["choices"][0]["fuselm"]
    assert info["method"] == "fixed-span" and info["trace"]


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"model": "nope", "prompt": "x"}, 404, "model"),
        ({"model": "tiny", "prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
        ({"model": "tiny", "prompt": "x", "max_tokens": 601}, 400, "max_tokens"),
        ({"model": "tiny", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": "tiny", "prompt": "x", "n": 3}, 400, "n"),
        ({"model": "tiny", "prompt": "x", "temperature": -1}, 400, "temperature"),
        ({"model": "tiny", "prompt": "x", "seed": 2**64}, 400, "seed"),  # found by the fuzzer: a 500 before
        ({"model": "tiny", "prompt": "word " * 300}, 400, "prompt"),
        ({"model": "tiny", "prompt": "x", "max_tokens": 500, "stop": [""]}, 400, "stop"),
        ({"model": "tiny", "prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty"),
        ({"model": "tiny", "prompt": ["a", "b"]}, 400, "prompt"),
        ({"model": "tiny", "messages": []}, 400, None),
        ({"model": "fused", "prompt": "x", "fuselm": {"method": "adafsue"}}, 400, "fuselm.method"),
        ({"model": "fused", "prompt": "x", "fuselm": {"options": {"theta": 7}}}, 400, "fuselm.options"),
        ({"model": "fused", "prompt": "x", "fuselm": {"method": "token-average"}}, 400, "fuselm.method"),
        ({"model": "tiny", "prompt": "x", "fuselm": {"nope": 1}}, 400, "fuselm.nope"),
    ],
)
def test_bad_requests_get_openai_errors(server, body, status, param):
    r = server.post("/v1/completions", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    assert "Traceback" not in r.text


def test_bad_json_body_size_and_key(server):
    r = server.post("/v1/chat/completions", b'{"model": "tiny", "messages": [')
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = server.post("/v1/completions", {"model": "tiny", "prompt": "x" * 70000})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    for key in (None, "wrong-key"):
        r = server.post("/v1/completions", {"model": "tiny", "prompt": "x"}, key=key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong-key").models.list()
    assert httpx.get(server.url + "/v1/models").status_code == 401


def _stream_lines(server, body, key: str | None = KEY, path: str = "/v1/completions"):
    """Open a streaming request and return (client, response, its line iterator); the caller closes them."""
    client = httpx.Client(timeout=120)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    req = client.build_request("POST", server.url + path, json=body, headers=headers)
    resp = client.send(req, stream=True)
    return client, resp, resp.iter_lines()


def test_over_capacity_is_429_and_a_disconnect_frees_the_slot(server):
    # AdaFuse over two tiny models: slow enough (several seconds for 480 tokens) to be mid-stream
    long = {"model": "fused", "prompt": "Once upon a time", "max_tokens": 480, "stream": True}
    cancelled_before = server.metric("fuselm_requests_total", status="499")
    c1, r1, lines1 = _stream_lines(server, long)  # takes the one slot
    assert r1.status_code == 200
    first = next(line for line in lines1 if line.startswith("data:"))
    assert json.loads(first[5:])["choices"]
    c2, r2, _ = _stream_lines(server, long)  # waits in the one queue place
    time.sleep(0.5)
    third = server.post("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2})
    assert third.status_code == 429, third.text
    assert third.headers["retry-after"] == "1" and third.json()["error"]["type"] == "rate_limit_error"
    # Both clients go away mid-stream: their generations stop and free the slot.
    r1.close(), c1.close(), r2.close(), c2.close()
    deadline = time.time() + 60
    while time.time() < deadline and server.metric("fuselm_requests_running") > 0:
        time.sleep(0.2)
    assert server.metric("fuselm_requests_running") == 0
    ok = server.post("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2})
    assert ok.status_code == 200, ok.text
    deadline = time.time() + 30
    while time.time() < deadline and server.metric("fuselm_requests_total", status="499") < cancelled_before + 1:
        time.sleep(0.2)
    assert server.metric("fuselm_requests_total", status="499") >= cancelled_before + 1  # stopped, not finished


def test_replicas_serve_requests_side_by_side(tiny_dirs, tmp_path):
    """`replicas: 2`: the models are loaded twice, and a second request runs on the free copy
    while a long stream holds the first (with one copy it waits for the stream to end); a
    request for another method (the fuselm extension) runs on either copy."""
    if not {"llama", "qwen2"} <= tiny_dirs.keys():
        pytest.skip("needs the smollm2 and qwen tokenizers")
    models = [{"name": str(tiny_dirs["llama"])}, {"name": str(tiny_dirs["qwen2"])}]
    setup = {"id": "fused", "models": models, "method": "adafuse", "replicas": 2}
    s = Server({"limits": {"max_concurrent": 3}, "setups": [setup]}, tmp_path)
    try:
        assert s.metric("fuselm_models_loaded") == 4
        long = {"model": "fused", "prompt": "Once upon a time", "max_tokens": 480, "stream": True}
        c1, r1, lines1 = _stream_lines(s, long, key=None)
        next(line for line in lines1 if line.startswith("data:"))  # the stream holds one copy
        short = {"model": "fused", "prompt": "The weather is", "max_tokens": 3,
                 "fuselm": {"method": "fixed-span", "options": {"n_words": 1}}}  # fmt: skip
        for _ in range(2):
            r = s.post("/v1/completions", short, key=None)
            assert r.status_code == 200, r.text
        assert s.metric("fuselm_requests_running") == 1  # the stream is still generating
        r1.close(), c1.close()
    finally:
        s.stop()


def test_metrics_and_playground(server):
    server.client().completions.create(model="tiny", prompt="x", max_tokens=2)
    assert server.metric("fuselm_generated_tokens_total", model="tiny") >= 2
    assert server.metric("fuselm_forward_passes_total", model="tiny") >= 1
    assert server.metric("fuselm_request_seconds_count", endpoint="completions", model="tiny") >= 1
    page = httpx.get(server.url + "/").text
    assert "fuselm playground" in page and "/v1/chat/completions" in page


def test_deadline_and_sigterm_with_a_request_in_flight(tiny_dirs, tmp_path):
    if not {"llama", "qwen2"} <= tiny_dirs.keys():
        pytest.skip("needs the smollm2 and qwen tokenizers")
    models = [{"name": str(tiny_dirs["llama"])}, {"name": str(tiny_dirs["qwen2"])}]
    config = {"limits": {"request_timeout_s": 1.0}, "setups": [{"id": "fused", "models": models, "method": "adafuse"}]}
    s = Server(config, tmp_path)
    long = {"model": "fused", "prompt": "Once upon a time", "max_tokens": 480}
    r = s.post("/v1/completions", long, key=None)
    assert r.status_code == 408 and r.json()["error"]["code"] == "deadline_exceeded", r.text
    # A stream past its deadline ends with an error event, then [DONE].
    client, resp, lines = _stream_lines(s, {**long, "stream": True}, key=None)
    events = [line[5:].strip() for line in lines if line.startswith("data:")]
    client.close()
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "deadline_exceeded"
    s.stop()


def test_bad_configs_are_one_line_errors(tmp_path):
    from .conftest import run_cli

    r = run_cli("serve", "--models", "smollm2-135m", "--method", "adafsue")
    assert r.returncode == 1 and "did you mean 'adafuse'" in r.stderr.lower()
    path = tmp_path / "s.yaml"
    path.write_text(
        yaml.safe_dump({"setups": [{"id": "a", "models": [{"name": "x"}]}, {"id": "a", "models": [{"name": "y"}]}]})
    )
    r = run_cli("serve", "--config", str(path))
    assert r.returncode == 1 and "unique" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def fuzz_server(tiny_dirs, tmp_path_factory):
    config = {
        "api_key": KEY,
        "limits": {"max_tokens": 4, "max_n": 2, "max_concurrent": 2, "max_queue": 64},
        "setups": [{"id": "tiny", "models": [{"name": str(tiny_dirs["llama"])}], "generation": {"max_new_tokens": 4}}],
    }
    s = Server(config, tmp_path_factory.mktemp("fuzz"))
    yield s
    s.stop()


def test_fuzzed_requests_never_get_a_5xx(fuzz_server):
    """Requests generated from the server's own OpenAPI document (schemathesis), valid and
    invalid, over 1,000 of them: every answer is below 500."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    seen: dict[int, int] = {}
    failures = []

    def fuzz(path: str, strategy):
        @settings(max_examples=260, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(case=strategy)
        def call(case):
            r = case.call(base_url=fuzz_server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
            seen[r.status_code] = seen.get(r.status_code, 0) + 1
            if r.status_code >= 500:
                failures.append((path, case.body, r.status_code, r.text[:300]))

        call()

    for path in ("/v1/completions", "/v1/chat/completions"):
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            fuzz(path, schema[path]["POST"].as_strategy(generation_mode=mode))
    assert sum(seen.values()) >= 1000, seen
    assert failures == [], failures[:3]
    assert seen.get(200, 0) > 0 and seen.get(400, 0) > 0, seen  # both kinds were really generated


def test_playground_streams_a_coloured_answer_in_headless_chromium(tiny_dirs, tmp_path):
    """The page at / in a real headless Chromium: pick the fused model, generate, and the
    answer streams in, each span coloured by the model that won it as it arrives; a screenshot
    is kept."""
    import shutil

    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from fuselm.viz import PALETTE

    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        pytest.skip("Chromium and chromedriver not installed (apt-get install chromium chromium-driver; .ci/run does)")
    if not {"llama", "qwen2"} <= tiny_dirs.keys():
        pytest.skip("needs the smollm2 and qwen tokenizers")
    models = [{"name": str(tiny_dirs["llama"])}, {"name": str(tiny_dirs["qwen2"])}]
    s = Server({"setups": [{"id": "fused", "models": models, "method": "adafuse"}]}, tmp_path)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1000,800"):  # fmt: skip
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    try:
        browser.get(s.url + "/")
        wait = WebDriverWait(browser, 120)
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#model option"))
        Select(browser.find_element(By.ID, "model")).select_by_value("fused")
        max_tokens = browser.find_element(By.ID, "max")
        max_tokens.clear()
        max_tokens.send_keys("16")
        # record whether a coloured span is on the page while the answer is still streaming
        browser.execute_script("""
            window.colouredWhileStreaming = false;
            new MutationObserver(() => {
              const busy = document.getElementById("status").textContent === "generating...";
              const coloured = [...document.querySelectorAll("#answer span.s")].some(
                (s) => s.style.backgroundColor && s.style.backgroundColor !== "transparent");
              if (busy && coloured) window.colouredWhileStreaming = true;
            }).observe(document.getElementById("answer"), {childList: true});""")
        browser.find_element(By.ID, "go").click()
        wait.until(
            lambda b: (
                b.find_element(By.ID, "status").text in ("done",) or "error" in b.find_element(By.ID, "status").text
            )
        )
        assert browser.find_element(By.ID, "status").text == "done"
        spans = browser.find_elements(By.CSS_SELECTOR, "#answer span.s")
        assert spans and browser.find_element(By.ID, "answer").text.strip()
        palette = {_rgb(c) for c in PALETTE}
        assert all(sp.value_of_css_property("background-color") in palette for sp in spans), [
            (sp.text, sp.get_attribute("title"), sp.value_of_css_property("background-color")) for sp in spans
        ]
        assert browser.execute_script("return window.colouredWhileStreaming") is True
        shot = tmp_path / "playground.png"
        assert browser.save_screenshot(str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 5000
    finally:
        browser.quit()
        s.stop()


def _rgb(hex_colour: str) -> str:
    r, g, b = (int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r}, {g}, {b}, 1)"


@pytest.mark.integration
@requires_bundled("smollm2-135m")
def test_smollm2_on_llamacpp_answers_through_the_server(tmp_path):
    from fuselm.models import llamacpp

    if not llamacpp.available():
        pytest.skip("needs llama-cpp-python")
    s = Server({"setups": [{"id": "smol", "models": [{"name": "smollm2-135m", "backend": "llamacpp"}]}]}, tmp_path)
    try:
        c = s.client(key=None)
        r = c.chat.completions.create(model="smol", messages=[{"role": "user", "content": "What is the capital of France?"}],
                                      max_tokens=30)  # fmt: skip
        assert "Paris" in r.choices[0].message.content
        streamed = "".join(
            ch.choices[0].delta.content or ""
            for ch in c.chat.completions.create(model="smol", stream=True, max_tokens=30,
                                                messages=[{"role": "user", "content": "What is the capital of France?"}])
            if ch.choices
        )  # fmt: skip
        assert streamed == r.choices[0].message.content
    finally:
        s.stop()
