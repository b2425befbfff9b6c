"""`fuselm serve`: the real server as a subprocess on 127.0.0.1, driven by the real `openai`
client and by plain HTTP (httpx), with tiny local models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from .conftest import requires_bundled

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("sse_starlette")

from .engine_support import free_port  # noqa: E402
from .serve_support import KEY, Server  # noqa: E402  (after the importorskips)


def write_controller(path: Path, n_models: int) -> Path:
    """A controller file for `n_models` models (untrained: it only has to load)."""
    from fuselm.fusion.controller import Controller, feature_names

    names = [f"m{i}" for i in range(n_models)]
    k = len(feature_names(names))
    Controller(names, feature_names(names), [0.0] * k, [1.0] * k, [0.0] * k, 0.0, {}).save(path)
    return path


@pytest.fixture(scope="module")
def server(tiny_dirs, tmp_path_factory):
    if not {"llama", "qwen2"} <= tiny_dirs.keys():
        pytest.skip("needs the smollm2 and qwen tokenizers")
    llama, qwen = str(tiny_dirs["llama"]), str(tiny_dirs["qwen2"])
    tmp = tmp_path_factory.mktemp("serve")
    controller = write_controller(tmp / "controller.json", 2)
    config = {
        "api_key": KEY,
        "limits": {
            "max_concurrent": 1,
            "max_queue": 1,
            "max_tokens": 600,
            "max_n": 2,
            "max_prompt_tokens": 200,
            "max_body_bytes": 65536,
            "option_max": {"top_k": 5},  # below unite's own default (10): a request must ask for less
        },  # fmt: skip
        "setups": [
            {"id": "tiny", "models": [{"name": llama}], "generation": {"max_new_tokens": 12}},
            {
                "id": "fused",
                "models": [{"name": llama}, {"name": qwen}],
                "method": "adafuse",
                "generation": {"max_new_tokens": 12},
            },  # fmt: skip
            {
                "id": "steered",
                "models": [{"name": llama}, {"name": qwen}],
                "method": "adafuse",
                "method_options": {"controller": str(controller), "branches": 2},
                "generation": {"max_new_tokens": 6},
            },
            {"id": "one-step", "models": [{"name": llama}, {"name": qwen}], "method": "sequence-select"},
        ],
    }
    s = Server(config, tmp)
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
    assert ready["status"] == "ready" and set(ready["models"]) == SETUPS
    models = server.client().models.list()
    assert {m.id for m in models.data} == SETUPS


SETUPS = {"tiny", "fused", "steered", "one-step"}


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
    # a stream answers its headers once it holds a slot: the second waits for them in a thread
    second: list = []
    waiting = threading.Thread(target=lambda: second.append(_stream_lines(server, long)), daemon=True)
    waiting.start()
    deadline = time.time() + 30
    while time.time() < deadline and server.metric("fuselm_queue_depth") < 1:
        time.sleep(0.1)
    # with the queue full, another method is refused before anything is built for it
    for body in ({"model": "tiny", "prompt": "x", "max_tokens": 2},
                 {"model": "fused", "prompt": "x", "max_tokens": 2, "fuselm": {"method": "unite", "options": {"top_k": 5}}}):  # fmt: skip
        third = server.post("/v1/completions", body)
        assert third.status_code == 429, third.text
        assert third.headers["retry-after"] == "1" and third.json()["error"]["type"] == "rate_limit_error"
    # Both clients go away mid-stream: their generations stop and free the slot.
    r1.close(), c1.close()
    waiting.join(timeout=60)
    c2, r2, lines2 = second[0]
    assert r2.status_code == 200 and next(line for line in lines2 if line.startswith("data:"))
    r2.close(), c2.close()
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
    setups = [{"id": "fused", "models": models, "method": "adafuse"},
              {"id": "one-step", "models": models, "method": "sequence-select"}]  # fmt: skip
    s = Server({"limits": {"request_timeout_s": 1.0}, "setups": setups}, tmp_path)
    long = {"model": "fused", "prompt": "Once upon a time", "max_tokens": 480}
    r = s.post("/v1/completions", long, key=None)
    assert r.status_code == 408 and r.json()["error"]["code"] == "deadline_exceeded", r.text
    # sequence-select decodes the whole answer in one step: the deadline stops it between model
    # calls inside the step (the 408 comes once the generation's thread has stopped)
    r = s.post("/v1/completions", {**long, "model": "one-step"}, key=None)
    assert r.status_code == 408 and r.json()["error"]["code"] == "deadline_exceeded", r.text
    assert s.metric("fuselm_requests_running") == 0
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


def write_router(directory: Path, backbone: Path, expert_names: list[str]) -> Path:
    """An untrained FusionRoute router over `backbone` for experts named `expert_names` (it only
    has to load and route)."""
    from fuselm.models.backend import vocab_fingerprint
    from fuselm.models.hf import TransformersBackend
    from fuselm.router.model import RouterMeta, RouterModel, save_router

    base = TransformersBackend.from_directory(backbone)
    router = RouterModel(base.model, len(expert_names))
    meta = RouterMeta(backbone=str(backbone), experts=expert_names, vocab_size=router.vocab_size,
                      vocab_fingerprint=vocab_fingerprint(base))  # fmt: skip
    save_router(router, directory, meta)
    return directory


@pytest.fixture(scope="module")
def fuzz_server(tiny_dirs, tmp_path_factory):
    """Every kind of setup a request's `fuselm` extension can reach: one model, a fused pair
    steered by a controller file, and FusionRoute with a router directory."""
    from fuselm.models.loading import load_model

    if not {"llama", "qwen2"} <= tiny_dirs.keys():
        pytest.skip("needs the smollm2 and qwen tokenizers")
    tmp = tmp_path_factory.mktemp("fuzz")
    llama, qwen = str(tiny_dirs["llama"]), str(tiny_dirs["qwen2"])
    qwen_name = load_model(qwen).name
    router = write_router(tmp / "router", tiny_dirs["qwen2"], [qwen_name, qwen_name + "#2"])
    gen = {"max_new_tokens": 4}
    config = {
        "api_key": KEY,
        "limits": {"max_tokens": 4, "max_n": 2, "max_concurrent": 2, "max_queue": 64},
        "setups": [
            {"id": "tiny", "models": [{"name": llama}], "generation": gen},
            {
                "id": "steered",
                "models": [{"name": llama}, {"name": qwen}],
                "method": "adafuse",
                "method_options": {"controller": str(write_controller(tmp / "ctl.json", 2))},
                "generation": gen,
            },
            {
                "id": "routed",
                "models": [{"name": qwen}, {"name": qwen}],
                "method": "fusionroute",
                "method_options": {"router": str(router)},
                "generation": gen,
            },
        ],  # fmt: skip
    }
    s = Server(config, tmp)
    yield s
    s.stop()


def test_fuzzed_requests_never_get_a_5xx(fuzz_server):
    """Requests generated from the server's own OpenAPI document (schemathesis), valid and
    invalid, over 1,000 of them, the `fuselm` extension's methods and options among their
    fields: every answer is below 500."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    seen: dict[int, int] = {}
    extended: dict[int, int] = {}  # answers to requests that chose a method or options
    failures = []

    def fuzz(path: str, strategy):
        @settings(max_examples=260, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(case=strategy)
        def call(case):
            r = case.call(base_url=fuzz_server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
            seen[r.status_code] = seen.get(r.status_code, 0) + 1
            ext = case.body.get("fuselm") if isinstance(case.body, dict) else None
            if isinstance(ext, dict) and (ext.get("method") or ext.get("options")):
                extended[r.status_code] = extended.get(r.status_code, 0) + 1
            if r.status_code >= 500:
                failures.append((path, case.body, r.status_code, r.text[:300]))

        call()

    for path in ("/v1/completions", "/v1/chat/completions"):
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            fuzz(path, schema[path]["POST"].as_strategy(generation_mode=mode))
    assert sum(seen.values()) >= 1000, seen
    assert failures == [], failures[:3]
    assert seen.get(200, 0) > 0 and seen.get(400, 0) > 0, seen  # both kinds were really generated
    assert extended.get(200, 0) > 0 and extended.get(400, 0) > 0, extended


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


# --- the server's edge, probed as an attacker would (issue: close the server's holes) ----------


@pytest.mark.parametrize("path", ["/etc/shadow", "/nonexistent/controller.json"])
@pytest.mark.parametrize("option", ["controller", "router"])
def test_a_request_never_names_a_file(server, path, option):
    """Whether the file exists or not, the answer is the same 400, naming the option: the server
    neither reads it nor tells whether it is there."""
    for model, method in (("steered", None), ("fused", "adafuse"), ("fused", "fusionroute")):
        ext = {"options": {option: path}, **({"method": method} if method else {})}
        r = server.post("/v1/completions", {"model": model, "prompt": "x", "max_tokens": 2, "fuselm": ext})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == f"fuselm.options.{option}", err
        assert (
            err["message"] == f"{option} names a file: a request cannot choose it (the server's operator configures it)"
        )


def test_a_setups_own_controller_stays_when_a_request_changes_its_options(server):
    """The setup's controller is kept under a request's options (they replace the rest); the
    answer is the setup's own when the options are the setup's."""
    body = {"model": "steered", "prompt": "The weather is", "max_tokens": 5}
    own = server.post("/v1/completions", body)
    same = server.post("/v1/completions", {**body, "fuselm": {"options": {"branches": 2}}})
    assert own.status_code == same.status_code == 200, (own.text, same.text)
    assert same.json()["choices"][0]["text"] == own.json()["choices"][0]["text"]


def test_work_options_are_bounded_and_the_bounds_are_published(server):
    cards = {m["id"]: m for m in httpx.get(server.url + "/v1/models", headers=_auth()).json()["data"]}
    steered, tiny = cards["steered"], cards["tiny"]
    assert steered["option_max"]["branches"] == 4  # twice the setup's own 2
    assert cards["fused"]["option_max"]["branches"] == 6  # twice adafuse's default 3
    assert cards["fused"]["option_max"]["top_k"] == 5  # the operator's bound
    assert "fusionroute" in cards["fused"]["request_methods"] and "fusionroute" not in tiny["request_methods"]
    schema = httpx.get(server.url + "/openapi.json").json()
    ext = schema["components"]["schemas"]["FuselmExtension"]
    assert ext["x-fuselm-bounds"]["steered"]["option_max"] == steered["option_max"]
    variants = {v["properties"]["method"]["enum"][0]: v for v in ext["anyOf"] if "method" in v["properties"]}
    adafuse = variants["adafuse"]["properties"]["options"]["properties"]
    assert (
        "controller" not in adafuse and "router" not in variants["fusionroute"]["properties"]["options"]["properties"]
    )
    assert adafuse["branches"]["maximum"] == 6
    for model, ext_body, param in [
        ("fused", {"method": "adafuse", "options": {"branches": 1000000}}, "fuselm.options.branches"),
        ("steered", {"options": {"branches": 5}}, "fuselm.options.branches"),
        ("fused", {"method": "unite", "options": {"top_k": 5000}}, "fuselm.options.top_k"),
        ("fused", {"method": "adafuse", "options": {"branches": "5000"}}, "fuselm.options.branches"),  # a string
        ("fused", {"method": "unite"}, "fuselm.options.top_k"),  # its default, 10, is over the operator's 5
        ("fused", {"method": "oracle-route", "options": {"reference": "x" * 1000}}, "fuselm.method"),  # analysis only
        ("fused", {"method": "adafuse", "options": {"policy": "anchored", "anchor": "/etc/passwd"}},
         "fuselm.options.anchor"),  # a model's name as the traces show it, never a path to guess
        ("fused", {"method": "token-average", "options": {"weights": [5e-324, 5e-324]}}, "fuselm.method"),
        ("fused", {"method": "fixed-span", "options": {"n_words": 2, "max_word_tokens": 10**9}},
         "fuselm.options.max_word_tokens"),
    ]:  # fmt: skip
        r = server.post("/v1/completions", {"model": model, "prompt": "x", "max_tokens": 2, "fuselm": ext_body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    ok = server.post("/v1/completions", {"model": "fused", "prompt": "x", "max_tokens": 2,
                                         "fuselm": {"method": "adafuse", "options": {"branches": 6}}})  # fmt: skip
    assert ok.status_code == 200, ok.text
    ok = server.post("/v1/completions", {"model": "fused", "prompt": "x", "max_tokens": 2,
                                         "fuselm": {"method": "unite", "options": {"top_k": 5}}})  # fmt: skip
    assert ok.status_code == 200, ok.text
    # naming the setup's own method keeps its options (its controller among them)
    body = {"model": "steered", "prompt": "The weather is", "max_tokens": 4}
    own = server.post("/v1/completions", {**body, "fuselm": {"method": "adafuse"}})
    assert own.status_code == 200 and own.json()["choices"][0]["text"] == server.post("/v1/completions", body).json()[
        "choices"][0]["text"], own.text  # fmt: skip


def test_a_one_model_setup_refuses_fused_methods(server):
    r = server.post("/v1/completions", {"model": "tiny", "prompt": "x", "fuselm": {"method": "unite",
                                                                                  "options": {"top_k": 5000}}})  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("fuselm"), r.text


@pytest.mark.parametrize(
    "raw, param",
    [
        ('{"model": "tiny", "prompt": "x\\ud800y", "max_tokens": 2}', "prompt"),
        ('{"model": "tiny", "messages": [{"role": "user", "content": "a\\udfffb"}]}', "messages.0.content"),
        ('{"model": "fused", "prompt": "x", "fuselm": {"options": {"weights": [NaN, 1]}}}', None),
        ('{"model": "fused", "prompt": "x", "fuselm": {"options": {"weights": [Infinity, 1]}}}', None),
        ('{"model": "tiny", "prompt": "x", "temperature": -Infinity}', None),
        ('{"model": "tiny", "prompt": "\\u00e9", "max_tokens": 1e999}', "max_tokens"),
    ],
)
def test_text_that_is_not_text_and_numbers_that_are_not_numbers_are_400s(server, raw, param):
    path = "/v1/chat/completions" if "messages" in raw else "/v1/completions"
    r = server.post(path, raw)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_json" and err["param"] == param, err
    assert server.post("/v1/completions", b'{"model": "tiny", "prompt": "\xff"}').status_code == 400  # not UTF-8


def test_the_key_is_checked_before_the_body_is_read(server):
    for body in (b"{not json", b'{"model": 7}', b"x" * 60000):
        r = server.post("/v1/completions", body, key=None)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
    # default deny: a path that is not public needs the key too; a POST where no route takes a
    # body is refused before the body is read
    assert httpx.get(server.url + "/nowhere").status_code == 401
    assert (
        httpx.post(server.url + "/health", content=b"{", headers={"content-type": "application/json"}).status_code
        == 405
    )
    # a body sent without saying it is JSON is not parsed as JSON
    r = httpx.post(server.url + "/v1/completions", content=b'{"model": "tiny", "prompt": "x"}',
                   headers={**_auth(), "content-type": "text/plain"})  # fmt: skip
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"


def test_nothing_an_unauthenticated_client_sends_reaches_the_metrics(server):
    before = httpx.get(server.url + "/metrics").text
    huge = "m" * 60_000  # the body limit here is 64 KiB
    for model in (huge, huge + "2", huge + "3"):
        assert server.post("/v1/completions", {"model": model, "prompt": "x"}, key=None).status_code == 401
    assert server.post("/v1/completions", '{"model": "\\ud800", "prompt": "x"}', key=None).status_code == 401
    after = httpx.get(server.url + "/metrics")
    assert after.status_code == 200 and "mmmm" not in after.text
    assert len(after.text) < len(before) + 2000, len(after.text) - len(before)
    # with the key, an unknown model id is counted under one fixed label, not the client's string
    unknown = server.post("/v1/completions", {"model": huge, "prompt": "x"})
    assert unknown.status_code == 404 and len(unknown.text) < 500  # not echoed back
    assert server.post("/v1/completions", '{"model": "\\ud800", "prompt": "x"}').status_code == 400
    text = httpx.get(server.url + "/metrics").text
    assert "mmmm" not in text and server.metric("fuselm_requests_total", model="unknown", status="404") >= 1


def test_a_trace_tells_nothing_of_another_clients_prompt(server):
    """The prefix cache is shared by every client: a trace's stats leave out what it did."""
    prompt = "The secret of the other client is that"
    server.post("/v1/completions", {"model": "fused", "prompt": prompt, "max_tokens": 2})
    r = server.post("/v1/completions", {"model": "fused", "prompt": prompt + " it", "max_tokens": 2,
                                        "fuselm": {"trace": True}})  # fmt: skip
    stats = r.json()["choices"][0]["fuselm"]["stats"]
    assert "cached_prompt_tokens" not in stats and "tokens_forwarded" not in stats
    assert stats["prompt_tokens"] and stats["forward_passes"]


def test_chat_template_refusals_are_400s(tiny_dirs, tmp_path):
    """A chat template that refuses roles that do not alternate (as Gemma's does, in the same
    words): a 400 naming the messages."""
    import shutil

    model = tmp_path / "strict-chat"
    shutil.copytree(tiny_dirs["llama"], model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg["chat_template"] = (
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
        "{% endif %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    )
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    (model / "chat_template.jinja").unlink(missing_ok=True)
    s = Server({"setups": [{"id": "g", "models": [{"name": str(model)}], "generation": {"system": None}}]}, tmp_path)
    try:
        msgs = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
        r = s.post("/v1/chat/completions", {"model": "g", "messages": msgs, "max_tokens": 2}, key=None)
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
        ok = s.post("/v1/chat/completions", {"model": "g", "messages": msgs[:1], "max_tokens": 2}, key=None)
        assert ok.status_code == 200, ok.text
        # a keyless server on 127.0.0.1 serves its own names only (no DNS rebinding)
        for host in ("localhost", "127.0.0.1", f"127.0.0.1:{s.port}", f"localhost:{s.port}"):
            assert httpx.get(s.url + "/v1/models", headers={"Host": host}).status_code == 200
        for host in ("evil.example", f"evil.example:{s.port}", "127.0.0.1.evil.example"):
            r = httpx.get(s.url + "/v1/models", headers={"Host": host})
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host", (host, r.text)
    finally:
        s.stop()


def test_an_empty_key_is_refused_and_an_open_address_without_one_warns(tiny_dirs, tmp_path):
    from .conftest import run_cli_here

    r = run_cli_here("serve", "--models", str(tiny_dirs["llama"]), "--api-key", "")
    assert r.returncode == 1 and "api_key is empty" in r.stderr, r.stderr
    proc = subprocess.Popen(
        [sys.executable, "-m", "fuselm.cli", "serve", "--models", str(tiny_dirs["llama"]), "--host", "0.0.0.0",
         "--port", str(free_port())],
        stderr=subprocess.PIPE, text=True, env={k: v for k, v in os.environ.items() if k != "FUSELM_API_KEY"},
    )  # fmt: skip
    try:
        first = proc.stderr.readline()
        assert "warning" in first and "without an API key" in first, first
    finally:
        proc.kill()
        proc.wait()


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}
