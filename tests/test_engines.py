"""Experts on real serving engines: a vLLM server (CPU build, its own virtual environment made
by scripts/setup_vllm.sh) and an SGLang server (its CPU path, scripts/setup_sglang.sh), started
on 127.0.0.1 with SmolLM2-135M's float32 weights, against the same weights in-process
(transformers). The tests every engine must pass run on each (`served`); the cases of an
engine skip when its environment is absent; the fault cases that need no engine (a port nobody
listens on, a server that never answers) always run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from .conftest import requires_bundled, run_cli_here
from .engine_support import EngineProcess, LocalTCPServer, engine_process, free_port, remote_model

VENV = Path(os.environ.get("FUSELM_VLLM_VENV", Path.home() / ".cache/fuselm/vllm-venv"))
SGLANG_VENV = Path(os.environ.get("FUSELM_SGLANG_VENV", Path.home() / ".cache/fuselm/sglang-venv"))
ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
TOL = 2e-3  # vLLM's float32 CPU kernels against transformers' on the same weights


@pytest.fixture(scope="module")
def smollm_hf_dir():
    from fuselm.models import assets
    from fuselm.models.catalog import BUNDLED

    return assets.ensure_converted(BUNDLED["smollm2-135m"])


def _vllm_command(model_dir: Path, port: int) -> list[str]:
    python = VENV / "bin" / "python"
    if not python.is_file():
        pytest.skip(f"vLLM not set up in {VENV} (scripts/setup_vllm.sh)")
    # --enforce-eager: no torch.compile at start (ready in 54 s instead of 125 s here); the tests'
    # short requests took as long either way (measured on this file's vLLM tests, 2026-12-06)
    return [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-logprobs", "20",
            "--gpu-memory-utilization", "0.25", "--block-size", "32", "--enforce-eager"]  # fmt: skip


def _sglang_command(model_dir: Path, port: int) -> list[str]:
    launcher = SGLANG_VENV / "bin" / "fuselm-sglang-server"
    if not launcher.is_file():
        pytest.skip(f"SGLang not set up in {SGLANG_VENV} (scripts/setup_sglang.sh)")
    # --sleep-on-idle: its scheduler otherwise spins a whole core between requests
    return [str(launcher), "--model-path", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
            "--dtype", "float32", "--max-total-tokens", "16384", "--sleep-on-idle"]  # fmt: skip


# kind: (how to start it, the path that answers 200 once it is ready, a server of one's own to use instead)
ENGINES = {
    "vllm": (_vllm_command, "/v1/models", "FUSELM_TEST_VLLM_URL"),
    "sglang": (_sglang_command, "/health", "FUSELM_TEST_SGLANG_URL"),
}


def pytest_generate_tests(metafunc):
    """A test that takes `served` runs on every engine, or on those its `engines` mark names;
    module-scoped, so pytest runs each engine's tests together and stops it before the next starts."""
    if "served" in metafunc.fixturenames:
        mark = metafunc.definition.get_closest_marker("engines")
        metafunc.parametrize("served", mark.args if mark else list(ENGINES), indirect=True, scope="module")


@pytest.fixture(scope="module")
def served(request, smollm_hf_dir, tmp_path_factory):
    """One engine at a time (each holds GBs of memory and, idle, part of a core), started on
    127.0.0.1; or the server named by FUSELM_TEST_<KIND>_URL (DEVELOPERS.md), never killed."""
    command, ready, own = ENGINES[request.param]
    if os.environ.get(own):
        yield EngineProcess(request.param, None, os.environ[own])
        return
    port = free_port()
    cmd = command(smollm_hf_dir, port)
    yield from engine_process(request.param, cmd, port, ready, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def local(smollm_hf_dir):
    from fuselm.config import ModelConfig
    from fuselm.models.hf import TransformersBackend
    from fuselm.models.loading import Model

    backend = TransformersBackend.from_directory(smollm_hf_dir, name="smollm2-135m")
    return Model(backend, ModelConfig(name="smollm2-135m", backend="transformers"))


# --- the engine's calls ---------------------------------------------------------------------------
@pytest.mark.integration
@requires_bundled("smollm2-135m")
def test_the_engine_tokenizes_streams_and_scores_as_the_same_weights_in_process(served, local):
    from fuselm.engines import Sampling, engine_for

    engine = engine_for(served.kind, served.url, tokenizer="engine")  # the engine's /tokenize, not one here
    try:
        facts = engine.run(engine.facts())
        assert not engine.tokenizes_here
        assert facts.bos_token_id is None and local.info.bos_token_id is None  # SmolLM2: no BOS
        assert facts.eos_token_ids & local.info.eos_token_ids
        prompt = "The capital of France is"
        ids = engine.run(engine.tokenize(prompt))
        assert ids == local.tokenize(prompt)  # the engine's own tokens
        cache = local.backend.new_cache()
        lp = local.backend.extend(cache, ids)
        # token-id prompt, streamed: exactly max_tokens tokens (no end of sequence this early)
        stream = engine.run(engine.stream(ids, 3, 5, Sampling()))
        engine.run(stream.read(10))
        assert len(stream.tokens) == 3 and stream.done and not stream.finished
        first = stream.tokens[0]
        assert first.token_id == int(torch.argmax(lp)) and first.text == " Paris"
        assert len(first.top) >= 5
        # a chunk that carries several tokens (the engine ran ahead of the reader) is split into
        # the same per-token texts as one token per chunk
        from types import SimpleNamespace

        chunk = [t.token_id for t in stream.tokens]
        fresh = SimpleNamespace(tokens=[], anchor=ids[-1:])
        split = engine.run(engine._token_texts(fresh, chunk, "".join(t.text for t in stream.tokens)))
        assert split == [t.text for t in stream.tokens]
        for tok, value in first.top.items():
            assert value == pytest.approx(float(lp[tok]), abs=TOL)
        # two continuations of one prefix in one request, one of them an unlikely token
        full = engine.run(engine.tokenize(prompt + " Paris"))
        other = int(torch.argsort(lp)[len(lp) // 2])
        scores = engine.run(engine.score([full, ids + [other]], [len(ids), len(ids)]))
        assert scores[0][0] == pytest.approx(float(lp[full[-1]]), abs=TOL)
        assert scores[1][0] == pytest.approx(float(lp[other]), abs=TOL)
        if served.kind == "vllm":  # one completion restricted to its token per scored pair
            assert engine.forced_scores == 2
        with pytest.raises(ValueError):
            engine.run(engine.score([full], [0]))
    finally:
        engine.close()


@pytest.mark.integration
@requires_bundled("smollm2-135m")
@pytest.mark.parametrize("tokenizer", ["here", "engine"])
def test_a_session_on_the_engine_answers_as_an_in_process_session(served, local, tokenizer):
    from fuselm.errors import FuselmError
    from fuselm.text.words import first_word_end

    # "here": the engine serves a directory of this machine, so its tokenizer is used here
    # (checked against the engine first); "engine": every tokenization asked of the engine
    remote = remote_model(served.url, kind=served.kind, **({"tokenizer": "engine"} if tokenizer == "engine" else {}))
    prompt = "The quick brown fox jumps over the lazy dog. The quick brown"
    with remote.session(prompt) as r, local.session(prompt) as s:
        assert r.committed_ids() == s.committed_ids()
        assert remote.engine.tokenizes_here == (tokenizer == "here")
        # top-k, truncated to k, the same ranking and values
        top_r, top_s = r.next_top(5), s.next_top(5)
        assert len(top_r) == 5 and [t for t, _ in top_r[:2]] == [t for t, _ in top_s[:2]]
        for (_, a), (_, b) in zip(top_r, top_s):
            assert a == pytest.approx(b, abs=TOL)
        with pytest.raises(FuselmError, match="at most the top 20"):
            r.next_top(21)
        # rollouts to a word boundary, and branches on forced first tokens
        until = lambda roll: first_word_end(roll.text)  # noqa: E731
        a, b = r.rollout(8, until=until), s.rollout(8, until=until)
        assert a.text == b.text == " fox" and a.token_ids == b.token_ids
        firsts = [t for t, _ in top_s[:3]]
        rb, sb = r.rollout_branches(firsts, 8, until=until), s.rollout_branches(firsts, 8, until=until)
        assert [x.text for x in rb] == [x.text for x in sb]
        for x, y in zip(rb, sb):
            assert x.logprob == pytest.approx(y.logprob, abs=3 * TOL)

        # the branches' own texts are scored from what their streams brought: no scoring request
        def asked() -> dict[str, int]:  # requests other than (de)tokenizing
            return {p: n for p, n in r.engine.requests.items() if "tokenize" not in p}

        before, reused = asked(), r.stats.reused_tokens
        texts = [x.text for x in rb]
        scored = r.score(texts)
        for x, y in zip(scored, s.score(texts)):
            assert x.logprob == pytest.approx(y.logprob, abs=3 * TOL)
        assert asked() == before
        assert r.stats.reused_tokens - reused == sum(x.n_tokens for x in scored) >= len(texts)
        # scores: the model's own proposal (read from its stream), others, and a candidate that
        # merges with the last prefix token (" brown" + "ish" is one token: " brownish")
        cands = [" fox", " dog", "ish", " fox jumps over"]
        ids = r.committed_ids()
        assert r.model.tokenize(prompt + "ish")[: len(ids)] != ids  # the merge this pins
        for x, y in zip(r.score(cands), s.score(cands)):
            assert x.n_tokens == y.n_tokens
            assert x.logprob == pytest.approx(y.logprob, abs=3 * TOL)
        assert r.eos_score().logprob == pytest.approx(s.eos_score().logprob, abs=TOL)
        r.append(" fox")
        s.append(" fox")
        assert r.committed_ids() == s.committed_ids()
        nxt = r.rollout(8, until=until)
        assert nxt.text and nxt.text == s.rollout(8, until=until).text
    assert r.stats.forward_passes >= 1 and r.stats.prompt_tokens == s.stats.prompt_tokens


@pytest.mark.integration
@requires_bundled("smollm2-135m")
@requires_bundled("qwen2.5-coder-0.5b")
def test_a_tokenizer_here_is_used_only_where_it_gives_the_engines_tokens(served, local, caplog):
    from fuselm.errors import FuselmError
    from fuselm.models import assets
    from fuselm.models.catalog import BUNDLED

    text = " naïve café, 東京 🙂<|im_end|>"
    mine = remote_model(served.url, kind=served.kind, tokenizer=str(local.backend.info.source))
    assert mine.tokenize(text) == local.tokenize(text) and mine.engine.tokenizes_here
    n = mine.engine.requests["/tokenize"]
    mine.tokenize(text + " more")
    assert mine.engine.requests["/tokenize"] == n  # tokenized here, nothing asked
    # another model's tokenizer: it differs on the probes, so the engine is asked (said once)
    other = remote_model(
        served.url, kind=served.kind, tokenizer=str(assets.ensure_tokenizer(BUNDLED["qwen2.5-coder-0.5b"]))
    )
    caplog.clear()
    assert other.tokenize(text) == local.tokenize(text) and not other.engine.tokenizes_here
    assert "differs from the engine's" in caplog.text and "asking the engine" in caplog.text
    with pytest.raises(FuselmError, match="not a tokenizer directory"):
        remote_model(served.url, kind=served.kind, tokenizer="/nowhere", name="nowhere").tokenize("a")


@pytest.mark.integration
@requires_bundled("smollm2-135m")
def test_single_and_adafuse_on_engines_give_the_in_process_text(served, local):
    from fuselm.config import GenerationConfig
    from fuselm.fusion.loop import generate

    remote = remote_model(served.url, kind=served.kind)
    other = remote_model(served.url, name="smol-vllm-2", kind=served.kind)
    gen = GenerationConfig(max_new_tokens=12)
    question = "What is the capital of France?"
    assert generate([remote], question, "single", gen).text == generate([local], question, "single", gen).text
    on_engines = generate([remote, other], question, "adafuse", gen)
    mixed = generate([remote, local], question, "adafuse", gen)
    in_process = generate([local, local], question, "adafuse", gen)
    assert on_engines.text == mixed.text == in_process.text
    # the trace: the same rounds, candidates and decisions; each model's scores within tolerance
    assert [t.text for t in mixed.trace] == [t.text for t in in_process.trace]
    compared = 0
    for a, b in zip(mixed.trace, in_process.trace):
        assert [c.text for c in a.candidates] == [c.text for c in b.candidates] and a.winner == b.winner
        for ca, cb in zip(a.candidates, b.candidates):
            if ca.nll is not None:
                for x, y in zip(ca.nll.values(), cb.nll.values()):
                    assert x == pytest.approx(y, abs=5 * TOL)
                    compared += 1
    assert compared > 0
    # per-prompt weights score the prompt on the engine too (one model twice: equal weights)
    weighted = generate([remote, local], question, "adafuse", gen, {"prompt_weights": 0.5})
    assert weighted.text == in_process.text
    gen_raw = GenerationConfig(max_new_tokens=12, chat="raw")
    for opts in ({}, {"policy": "anchored", "theta": 0.5, "n_words": 2}):  # the anchor asked alone first
        fixed = generate([remote, local], "The capital of France is", "fixed-span", gen_raw, opts)
        assert fixed.text == generate([local, local], "The capital of France is", "fixed-span", gen_raw, opts).text


@pytest.mark.integration
@requires_bundled("smollm2-135m")
def test_token_average_and_unite_on_engines_follow_the_in_process_text(served, local, caplog):
    """Approximate on engines (top-20 instead of whole distributions): the same text as in
    process here, and each model's probability of the chosen token within tolerance."""
    from fuselm.config import GenerationConfig
    from fuselm.fusion.loop import generate
    from fuselm.fusion.methods import METHODS

    remote = remote_model(served.url, kind=served.kind)
    other = remote_model(served.url, name="smol-2", kind=served.kind)
    gen = GenerationConfig(max_new_tokens=10)
    question = "Name a large city in Japan."
    for method, opts in [
        ("token-average", {"weights": [2, 1]}),
        ("token-average", {"policy": "anchored", "theta": 0.5}),
        ("unite", {"top_k": 5}),
    ]:
        caplog.clear()
        in_process = generate([local, local], question, method, gen, opts)
        mixed = generate([remote, local], question, method, gen, opts)
        on_engines = generate([remote, other], question, method, gen, opts)
        assert on_engines.text == mixed.text == in_process.text, method
        assert "approximate on smol-vllm" in caplog.text
        detail = METHODS.get(method).Detail  # the method's own trace fields
        for a, b in zip(mixed.trace, in_process.trace):
            da, db = a.detail_of(detail), b.detail_of(detail)
            if getattr(da, "token_probs", None):  # token-average: each model's probability of the token
                for x, y in zip(da.token_probs.values(), db.token_probs.values()):
                    assert x == pytest.approx(y, abs=0.01)
            for ca, cb in zip(a.candidates, b.candidates):  # unite: the union's texts, best first
                assert ca.text == cb.text and ca.p == pytest.approx(cb.p, abs=0.01)


@pytest.mark.integration
@requires_bundled("smollm2-135m")
def test_fusionroute_on_engines_follows_the_in_process_text(served, local, tmp_path, caplog):
    """FusionRoute with experts on an engine: the router (in process) adds its log-probs to the
    expert's top-20 and the mass it leaves: the same tokens as over whole distributions here."""
    from fuselm.config import GenerationConfig
    from fuselm.fusion.loop import generate

    from .support import make_router

    experts = ("smollm2-135m", "smollm2-135m#2")  # one model twice: the trace names the second '#2'
    router = make_router("smollm2-135m", tmp_path / "router", lora_std=0.05, experts=experts)
    remote = [remote_model(served.url, name="smollm2-135m", kind=served.kind) for _ in experts]
    gen = GenerationConfig(max_new_tokens=16)
    opts = {"router": str(router), "router_backend": "transformers"}
    question = "Name a large city in Japan."
    for method in ("fusionroute", "expert-route"):
        caplog.clear()
        in_process = generate([local, local], question, method, gen, opts)
        on_engines = generate(remote, question, method, gen, opts)
        assert on_engines.text == in_process.text, method
        assert f"{method} is approximate on smollm2-135m" in caplog.text
        for a, b in zip(on_engines.trace, in_process.trace):
            assert a.source == b.source and a.expert_token == b.expert_token and a.changed == b.changed
            assert a.route == pytest.approx(b.route, abs=1e-4)  # the same router, in process both times
        if method == "fusionroute":  # the router's logits did move some choices off the expert's own
            assert any(t.changed for t in in_process.trace)


def _logprob_token_ids_noise(url: str, stop: threading.Event) -> None:
    """Another client of the engine: one-token completions with `logprob_token_ids`, nonstop."""
    with httpx.Client(base_url=url, timeout=60) as c:
        mid = c.get("/v1/models").json()["data"][0]["id"]
        i = 0
        while not stop.is_set():
            i += 1
            c.post("/v1/completions", json={"model": mid, "prompt": [504 + i % 50, 3575, 282], "max_tokens": 1,
                                            "logprobs": 1, "logprob_token_ids": [13, 28]})  # fmt: skip


@pytest.mark.integration
@requires_bundled("smollm2-135m")
@pytest.mark.engines("vllm")
def test_another_clients_logprob_token_ids_do_not_change_the_answers(served, local):
    """vLLM 0.32 quirk, pinned: while one request in a batch asks `logprob_token_ids`, every other
    request in that batch gets the sampled token plus placeholders (id 0 at -9999) instead of its
    top-k. fuselm asks such a top-k again, and scores without `logprob_token_ids` (which would do
    the same to other clients of a shared engine)."""
    from fuselm.config import GenerationConfig
    from fuselm.fusion.loop import generate

    gen = GenerationConfig(max_new_tokens=8)
    question = "Name a colour."
    want = generate([local, local], question, "adafuse", gen).text  # before the noise: it takes the cores
    stop = threading.Event()
    noise = [threading.Thread(target=_logprob_token_ids_noise, args=(served.url, stop)) for _ in range(2)]
    for t in noise:
        t.start()
    try:
        with httpx.Client(base_url=served.url, timeout=60) as c:  # the quirk itself, on a plain stream
            mid = c.get("/v1/models").json()["data"][0]["id"]
            body = {"model": mid, "prompt": [504, 3575, 282, 4649, 314], "max_tokens": 16, "stream": True,
                    "logprobs": 4, "return_tokens_as_token_ids": True, "temperature": 0}  # fmt: skip
            tops = []
            with c.stream("POST", "/v1/completions", json=body) as r:
                for line in r.iter_lines():
                    if line.startswith("data:") and "[DONE]" not in line:
                        tops += json.loads(line[5:])["choices"][0]["logprobs"]["top_logprobs"]
            assert any(len(t) < 4 or min(t.values()) <= -9999 for t in tops)
        remote, other = remote_model(served.url), remote_model(served.url, name="smol-vllm-2")
        assert generate([remote, other], question, "adafuse", gen).text == want
        assert remote.engine.mangled_tops + other.engine.mangled_tops > 0  # the answer above was asked again
    finally:
        stop.set()
        for t in noise:
            t.join()


@pytest.mark.integration
@requires_bundled("smollm2-135m")
@pytest.mark.engines("vllm")
def test_cli_generate_and_eval_with_concurrency_over_an_engine(served, local, tmp_path):
    from fuselm.config import GenerationConfig
    from fuselm.fusion.loop import generate

    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-m", "fuselm.cli", "generate", "--models", f"smol=vllm:{served.url},smollm2-135m",
           "--backend", "transformers", "--method", "adafuse", "--max-new-tokens", "16", "--json",
           "What is the capital of France?"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["models"] == ["smol", "smollm2-135m"]
    question = "What is the capital of France?"
    assert result["text"] == generate([local, local], question, "adafuse", GenerationConfig(max_new_tokens=16)).text
    if not (DATA / "nq").is_dir():
        pytest.skip("../shared/data not found")
    runs = {}
    for n in (1, 4):
        cmd = [sys.executable, "-m", "fuselm.cli", "eval", "--task", "nq", "--models", f"vllm:{served.url}",
               "--limit", "6", "--concurrency", str(n), "--out", str(tmp_path / f"c{n}"), "--no-progress",
               "--data-dir", str(DATA)]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert out.returncode == 0, out.stderr
        rows = [json.loads(line) for line in (tmp_path / f"c{n}" / "rows.jsonl").read_text().splitlines()]
        runs[n] = {r["id"]: r["output"] for r in rows}
    assert len(runs[4]) == 6 and runs[4] == runs[1]  # greedy: the same answers, in flight at once or not
    # an in-process model cannot run rows at once: said before anything runs
    cmd[cmd.index("--models") + 1] = "smollm2-135m"
    out = run_cli_here(*cmd[3:])
    assert out.returncode != 0 and "needs every model on an engine" in out.stderr


@pytest.mark.integration
@requires_bundled("smollm2-135m")
def test_multiple_choice_and_the_lm_eval_model_score_on_an_engine_as_in_process(served, local, tmp_path):
    # The engine's prompt log-probs give each choice's string log-probability: a task file's
    # multiple-choice run and lm-eval's loglikelihood requests (several in flight) over the
    # engine score as the same weights in this process do.
    import yaml

    rows = [{"id": "a", "q": "The capital of France is", "options": ["Paris", "Rome"], "answer": 0},
            {"id": "b", "q": "Water is", "options": ["wet", "dry", "a planet"], "answer": 0}]  # fmt: skip
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = tmp_path / "mc.yaml"
    task.write_text(yaml.safe_dump({
        "task": "mc", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": "mc.jsonl"}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{q}}",
        "doc_to_choice": "options", "doc_to_target": "answer",
    }))  # fmt: skip
    done = run_cli_here("eval", "--task", str(task), "--models", f"{served.kind}:{served.url}", "--out",
                        str(tmp_path / "run"), "--no-progress")  # fmt: skip
    assert done.returncode == 0, done.stderr
    got = {
        json.loads(line)["id"]: json.loads(line) for line in (tmp_path / "run" / "rows.jsonl").read_text().splitlines()
    }
    for row in rows:
        with local.session(row["q"]) as session:
            own = [s.logprob for s in session.score([" " + c for c in row["options"]])]
        assert [c["logprob"] for c in got[row["id"]]["choices"]] == pytest.approx(own, abs=TOL * 8)
    instance = pytest.importorskip("lm_eval.api.instance")
    from fuselm.eval.harness import FuselmLM

    requests = [instance.Instance("loglikelihood", {}, (r["q"], " " + c), i)
                for i, (r, c) in enumerate((r, c) for r in rows for c in r["options"])]  # fmt: skip
    lm = FuselmLM(models=f"{served.kind}:{served.url}", method="single", concurrency=3, progress=False)
    try:
        scored = [v for v, _ in lm.loglikelihood(requests)]
    finally:
        lm.close()
    assert scored == pytest.approx([c["logprob"] for r in rows for c in got[r["id"]]["choices"]], abs=1e-4)


@pytest.mark.integration
@requires_bundled("smollm2-135m")
def test_serve_a_fused_setup_of_engine_experts_to_concurrent_clients(served, local, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from fuselm.config import GenerationConfig
    from fuselm.fusion.loop import generate

    from .serve_support import Server

    config = {"limits": {"max_concurrent": 4},
              "setups": [{"id": "fused", "method": "adafuse", "generation": {"max_new_tokens": 8},
                          "models": [{"name": "a", "engine": served.kind, "url": served.url},
                                     {"name": "b", "engine": served.kind, "url": served.url}]}]}  # fmt: skip
    server = Server(config, tmp_path)
    try:
        client = server.client(key=None)
        questions = ["What is the capital of France?", "What is 2 + 2?", "Name a colour.", "Who wrote Hamlet?"]

        def ask(q: str) -> str:
            r = client.chat.completions.create(model="fused", messages=[{"role": "user", "content": q}])
            return r.choices[0].message.content

        with ThreadPoolExecutor(4) as pool:  # four requests in flight on one replica of engine experts
            answers = list(pool.map(ask, questions))
        gen = GenerationConfig(max_new_tokens=8)
        for q, answer in zip(questions, answers):
            assert answer == generate([local, local], q, "adafuse", gen).text
    finally:
        server.stop()


# --- faults that need no engine -------------------------------------------------------------------
class SilentServer(LocalTCPServer):
    """Accepts connections and never answers (a stalled engine); counts what it accepted."""

    def __init__(self) -> None:
        self.accepted = 0
        self.conns: list[socket.socket] = []
        super().__init__()

    def _accepted(self, conn: socket.socket) -> None:
        self.accepted += 1
        self.conns.append(conn)

    def close(self) -> None:
        super().close()
        for c in self.conns:
            c.close()


def test_methods_that_need_full_distributions_refuse_an_engine_before_any_request():
    from fuselm.errors import FuselmError
    from fuselm.fusion.methods import build_method

    server = SilentServer()
    try:
        model = remote_model(f"http://127.0.0.1:{server.port}")
        for method in ("oracle-route",):
            with pytest.raises(FuselmError, match="needs full next-token distributions") as e:
                build_method(method, [model, model], {"reference": "x"})
            assert "methods that run on it: adafuse" in str(e.value) and "token-average" in str(e.value)
        time.sleep(0.2)
        assert server.accepted == 0  # nothing was sent
    finally:
        server.close()


def test_a_stalled_engine_fails_within_its_timeout_naming_the_expert():
    from fuselm.config import GenerationConfig
    from fuselm.errors import EngineError
    from fuselm.fusion.loop import generate

    server = SilentServer()
    try:
        model = remote_model(f"http://127.0.0.1:{server.port}", name="stuck", model="m", timeout_s=1)
        t0 = time.perf_counter()
        with pytest.raises(EngineError, match=r"expert 'stuck'.*no answer within 1s"):
            generate([model], "Hello", "single", GenerationConfig(max_new_tokens=4, chat="raw"))
        assert time.perf_counter() - t0 < 10  # the deadline fired (one timeout, not retried)
        assert server.accepted >= 1
    finally:
        server.close()


def test_an_engine_that_is_not_there_is_a_one_line_error():
    from fuselm.engines import VLLMEngine
    from fuselm.errors import EngineError

    port = free_port()
    engine = VLLMEngine(f"http://127.0.0.1:{port}", model="m", timeout_s=2)
    with pytest.raises(EngineError, match=f"vllm at http://127.0.0.1:{port}: cannot connect"):
        engine.run(engine.tokenize("x"))


def test_engine_entries_are_checked_in_the_config():
    from pydantic import ValidationError

    from fuselm.config import ModelConfig, parse_model_ref

    with pytest.raises(ValidationError, match="needs url"):
        ModelConfig(name="a", engine="vllm")
    with pytest.raises(ValidationError, match="threads: only for in-process models"):
        ModelConfig(name="a", engine="vllm", url="http://h:8000", threads=2)
    with pytest.raises(ValidationError, match="url: only for a model on an engine"):
        ModelConfig(name="a", url="http://h:8000")
    assert parse_model_ref("llama=vllm:http://10.0.0.5:8000#meta/Llama-3") == {
        "name": "llama", "engine": "vllm", "url": "http://10.0.0.5:8000", "model": "meta/Llama-3"}  # fmt: skip
    assert parse_model_ref("vllm:http://h:8000")["name"] == "vllm@h:8000"
    assert parse_model_ref("smollm2-135m") == {"name": "smollm2-135m"}


def test_an_unknown_engine_is_named_with_the_known_ones():
    from fuselm.engines import engine_for
    from fuselm.errors import FuselmError

    with pytest.raises(FuselmError, match="unknown engine 'tgi'; supported: llamacpp-server, sglang, vllm"):
        engine_for("tgi", "http://127.0.0.1:9")


# --- an engine that dies (last: it kills the module's vLLM) ---------------------------------------
@pytest.mark.integration
@requires_bundled("smollm2-135m")
@pytest.mark.engines("vllm")
def test_an_engine_killed_mid_request_ends_with_its_error_or_is_dropped(served, local):
    from fuselm.config import GenerationConfig
    from fuselm.errors import EngineError
    from fuselm.fusion.loop import generate

    if served.proc is None:
        pytest.skip("FUSELM_TEST_VLLM_URL: that server is not ours to kill")
    remote = remote_model(served.url, name="doomed", timeout_s=10)
    gen = GenerationConfig(max_new_tokens=400, chat="raw")
    pieces: list[str] = []

    def kill_after_first_text(text: str) -> None:
        pieces.append(text)
        if len(pieces) == 3:
            served.stop(signal.SIGKILL)  # the single model's stream is open: its next read finds it gone

    t0 = time.perf_counter()
    with pytest.raises(EngineError, match="expert 'doomed'"):
        generate([remote], "Once upon a time", "single", gen, on_text=kill_after_first_text)
    assert time.perf_counter() - t0 < 60 and len(pieces) >= 3
    # dropped: the answer comes from the remaining expert, and the trace says who left and why
    question = "The capital of France is"
    gen = GenerationConfig(max_new_tokens=12, chat="raw", on_expert_failure="drop")
    result = generate([remote, local], question, "adafuse", gen)
    assert result.text == generate([local], question, "adafuse", gen).text
    assert "doomed" in result.trace[0].dropped and "cannot connect" in result.trace[0].dropped["doomed"]
    assert all(t.dropped is None for t in result.trace[1:])
    with pytest.raises(EngineError, match="expert 'doomed'.*cannot connect"):
        generate([remote, local], question, "adafuse", gen.model_copy(update={"on_expert_failure": "fail"}))
