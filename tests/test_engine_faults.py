"""Engines that misbehave, as real HTTP servers on 127.0.0.1 (no engine, no model needed): what
bounds an engine client (docs/scale-out.md, "Faults"). A fake engine speaks enough of vLLM's
protocol (and of llama-cpp-python's server) for `single`: its model list, `/tokenize` (a text's
UTF-8 bytes are its token ids), `/detokenize`, and streamed completions; each test replaces one
answer by a faulty one: one that trickles, one too large, malformed ones, one that never comes."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from .engine_support import LocalTCPServer, remote_model

pytestmark = pytest.mark.timeout(120)

VOCAB = 256  # the fake tokenizer's ids are bytes


@dataclass
class Request:
    conn: socket.socket
    method: str
    path: str
    body: Any
    headers: dict[str, str] = field(default_factory=dict)


class FakeEngine(LocalTCPServer):
    """A real HTTP/1.1 server on 127.0.0.1: one request per connection (answered with
    `Connection: close`), each answered by `answers[path]` (a function of the server and the
    request that writes the whole answer), else by the default of a well-behaved engine. It
    notes the connections whose client went away while it held them (`hung_up`)."""

    def __init__(self, **answers: Callable[[FakeEngine, Request], None]) -> None:
        self.answers = {"/v1/models": models, "/tokenize": tokenize, "/extras/tokenize": tokenize,
                        "/detokenize": detokenize, "/v1/completions": completions}  # fmt: skip
        self.answers.update({k.replace("_", "/"): v for k, v in answers.items()})
        self.requests: list[str] = []
        self.hung_up = threading.Event()
        self.stop = threading.Event()
        super().__init__()

    def _accepted(self, conn: socket.socket) -> None:
        threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        try:
            reader = conn.makefile("rb")
            method, target, _ = reader.readline().decode().split(" ", 2)
            headers = {}
            while (line := reader.readline().decode().strip()) != "":
                key, _, value = line.partition(":")
                headers[key.strip().lower()] = value.strip()
            raw = reader.read(int(headers.get("content-length", "0")))
            path = target.split("?")[0]
            self.requests.append(path)
            answer = self.answers.get(path, not_found)
            answer(self, Request(conn, method, path, json.loads(raw) if raw else None, headers))
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.stop.set()
        super().close()

    def hold(self, req: Request, seconds: float) -> None:
        """Keep the connection open without a word for `seconds`; note when the client hangs up."""
        req.conn.settimeout(0.05)
        end = time.monotonic() + seconds
        while time.monotonic() < end and not self.stop.is_set():
            try:
                if req.conn.recv(1) == b"":
                    self.hung_up.set()
                    return
            except TimeoutError:
                pass


def head(req: Request, status: int = 200, headers: dict[str, str] | None = None) -> None:
    lines = [f"HTTP/1.1 {status} X", "Connection: close", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    req.conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())


def send_json(req: Request, answer: Any, status: int = 200) -> None:
    body = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
    head(req, status, {"Content-Type": "application/json", "Content-Length": str(len(body))})
    req.conn.sendall(body)


def event(chunk: Any) -> bytes:
    return b"data: " + (chunk if isinstance(chunk, bytes) else json.dumps(chunk).encode()) + b"\n\n"


# --- the well-behaved engine ------------------------------------------------------------------------
def models(server: FakeEngine, req: Request) -> None:
    send_json(req, {"object": "list", "data": [{"id": "m", "max_model_len": 2048}]})


def tokenize(server: FakeEngine, req: Request) -> None:
    if "messages" in req.body:
        send_json(req, {"error": {"message": "no chat template"}}, 400)
        return
    text = req.body.get("prompt", req.body.get("input", ""))
    ids = list(text.encode())
    send_json(req, {"tokens": ids, "count": len(ids), "token_strs": [chr(i) for i in ids]})


def detokenize(server: FakeEngine, req: Request) -> None:
    send_json(req, {"prompt": bytes(req.body["tokens"]).decode(errors="replace")})


def not_found(server: FakeEngine, req: Request) -> None:
    send_json(req, {"detail": "Not Found"}, 404)


def vllm_chunk(token: int, k: int, finish: str | None = None) -> dict[str, Any]:
    """One streamed token of vLLM's completions (`return_tokens_as_token_ids`, top-`k`)."""
    top = {f"token_id:{(token + i) % VOCAB}": -0.1 - i for i in range(k)}
    logprobs = {"tokens": [f"token_id:{token}"], "token_logprobs": [-0.1], "top_logprobs": [top]}
    return {"choices": [{"index": 0, "text": chr(token), "logprobs": logprobs, "finish_reason": finish}]}


def text_chunk(text: str, finish: str | None = None) -> dict[str, Any]:
    """One streamed token of llama-cpp-python's server (text only)."""
    return {"choices": [{"index": 0, "text": text, "finish_reason": finish}]}


def completions(server: FakeEngine, req: Request, chunks: list[bytes] | None = None) -> None:
    """A stream of "x" tokens up to the request's max_tokens (vLLM's on token ids, llama.cpp's on text)."""
    head(req, 200, {"Content-Type": "text/event-stream"})
    n = req.body["max_tokens"]
    if chunks is None:
        if isinstance(req.body["prompt"], str):
            chunks = [event(text_chunk("x", "length" if i == n - 1 else None)) for i in range(n)]
        else:
            k = req.body["logprobs"]
            chunks = [event(vllm_chunk(ord("x"), k, "length" if i == n - 1 else None)) for i in range(n)]
    for c in chunks + [b"data: [DONE]\n\n"]:
        req.conn.sendall(c)


def streaming(*chunks: Any) -> Callable[[FakeEngine, Request], None]:
    """A completions answer that streams `chunks` (decoded JSON, or bytes as they are) as events."""
    return lambda server, req: completions(server, req, [event(c) for c in chunks])


# --- helpers -----------------------------------------------------------------------------------------
GEN = {"max_new_tokens": 4, "chat": "raw"}


def generate_on(server: FakeEngine, name: str = "bad", kind: str = "vllm", timeout_s: float = 5, **gen):
    from fuselm.config import GenerationConfig
    from fuselm.fusion.loop import generate

    model = remote_model(server.url, name=name, kind=kind, timeout_s=timeout_s)
    try:
        return generate([model], "Hello", "single", GenerationConfig(**{**GEN, **gen}))
    finally:
        model.close()


def engine_error(server: FakeEngine, name: str = "bad", kind: str = "vllm", timeout_s: float = 5) -> str:
    """The message of the EngineError that `single` on the fake engine ends with."""
    from fuselm.errors import EngineError

    with pytest.raises(EngineError) as e:
        generate_on(server, name, kind, timeout_s)
    return str(e.value)


def one_line_naming(message: str, server: FakeEngine, match: str, name: str = "bad", kind: str = "vllm") -> bool:
    """Whether `message` is one short line that names the expert and its engine and says `match`."""
    return (
        message.startswith(f"expert '{name}': {kind} at {server.url}")
        and "\n" not in message
        and len(message) < 600
        and re.search(match, message) is not None
    )


def test_the_fake_engine_is_a_working_engine():
    server = FakeEngine()
    try:
        got = generate_on(server, "fine")
        assert (got.text, got.stats.new_tokens) == ("xxxx", 4)
        got = generate_on(server, "fine", kind="llamacpp-server")
        assert (got.text, got.stats.new_tokens) == ("xxxx", 4)
    finally:
        server.close()


def test_the_engine_kinds_are_the_registry_s_and_a_text_engine_has_no_token_calls():
    """config's `engine:` choices are the registry's kinds; an engine on text has neither
    `stream` (token ids) nor `score`, and offers rollouts only."""
    import typing

    from fuselm.config import ENGINE_KINDS, ModelConfig
    from fuselm.conventions import OFFERS_ROLLOUT, OFFERS_SCORE, OFFERS_TOPK
    from fuselm.engines import ENGINES, LlamaCppServerEngine, TextEngine, TokenEngine

    assert ENGINE_KINDS == tuple(ENGINES) == ("vllm", "sglang", "llamacpp-server")
    assert typing.get_args(typing.get_args(ModelConfig.model_fields["engine"].annotation)[0]) == ENGINE_KINDS
    for kind, cls in ENGINES.items():
        assert cls.kind == kind and issubclass(cls, (TokenEngine, TextEngine))
        assert cls.offers == (
            {OFFERS_ROLLOUT} if issubclass(cls, TextEngine) else {OFFERS_TOPK, OFFERS_ROLLOUT, OFFERS_SCORE}
        )
    assert not hasattr(LlamaCppServerEngine, "score") and not hasattr(LlamaCppServerEngine, "stream")


def test_models_and_sessions_on_engines_are_the_declared_types_and_say_what_they_offer(tiny_backends):
    """`load_model` gives an Expert in process and on an engine alike, whose sessions are
    Sessions; where they run is answered as capabilities (`offers`, `works_in_process`,
    `vocab_size`, `calls_wait_on_io`), and a session refuses what its model does not offer,
    before any request (nothing listens at these URLs)."""
    from fuselm.config import ModelConfig
    from fuselm.conventions import OFFERS_FOLLOW, OFFERS_FULL
    from fuselm.errors import FuselmError
    from fuselm.models.expert import Expert
    from fuselm.models.loading import Model, load_model
    from fuselm.models.remote import RemoteSession, TextSession
    from fuselm.models.session import DecodingSession, Session

    here = Model(next(iter(tiny_backends.values())))
    token = load_model(ModelConfig(name="far", engine="vllm", url="http://127.0.0.1:9", model="m"))
    text = load_model(ModelConfig(name="text", engine="llamacpp-server", url="http://127.0.0.1:9"))
    assert all(isinstance(m, Expert) for m in (here, token, text))
    assert here.works_in_process and not token.works_in_process and not text.works_in_process
    assert here.vocab_size == here.info.vocab_size and token.vocab_size is None
    assert {OFFERS_FULL, OFFERS_FOLLOW} <= here.offers and not {OFFERS_FULL, OFFERS_FOLLOW} & token.offers
    sessions = [here.session("a"), token.session("a"), text.session("a")]
    assert [type(s) for s in sessions] == [DecodingSession, RemoteSession, TextSession]
    assert all(isinstance(s, Session) for s in sessions)
    assert [s.calls_wait_on_io for s in sessions] == [False, True, True]
    with pytest.raises(FuselmError, match="'text' gives no scores of given continuations"):
        sessions[2].score([" b"])
    with pytest.raises(FuselmError, match="'text' gives no top-k log-probs"):
        sessions[2].next_top(2)
    with pytest.raises(FuselmError, match="'far' gives no full next-token distributions"):
        sessions[1].tail_logprobs(1)
    for s in sessions:
        s.close()


def test_each_engine_client_and_each_method_own_their_threads_and_close_them():
    """An engine client's calls run on an event loop thread of its own, which `close` ends (a
    later call starts another); a built method runs its experts' calls on a pool of its own,
    whose threads end when the method is closed."""
    from fuselm.config import GenerationConfig
    from fuselm.fusion.loop import decode
    from fuselm.fusion.methods import build_method

    async def running_on() -> threading.Thread:
        return threading.current_thread()

    servers = [FakeEngine(), FakeEngine()]
    models = [remote_model(s.url, name=f"fine{i}") for i, s in enumerate(servers)]
    try:
        loops = [m.run(running_on()) for m in models]
        assert loops[0] is not loops[1] and all(t.is_alive() for t in loops)
        built = build_method("sequence-select", models)
        before = set(threading.enumerate())
        assert decode(built, "Hello", GenerationConfig(**GEN)).text == "xxxx"
        pool = [t for t in set(threading.enumerate()) - before if t.name.startswith("fuselm-expert")]
        assert 0 < len(pool) <= built.pool.size
        built.close()
        assert not any(t.is_alive() for t in pool)
        models[0].close()
        assert not loops[0].is_alive() and loops[1].is_alive()
        again = models[0].run(running_on())
        assert again is not loops[0] and again.is_alive()
    finally:
        for m in models:
            m.close()
        for s in servers:
            s.close()


# --- deadlines -------------------------------------------------------------------------------------
def trickle(data: bytes, every: float = 0.3, headers: dict[str, str] | None = None):
    """An answer whose headers come at once and whose body comes a byte every `every` seconds."""

    def answer(server: FakeEngine, req: Request) -> None:
        head(req, 200, headers)
        for i in range(len(data)):
            if server.stop.wait(every):
                return
            req.conn.sendall(data[i : i + 1])

    return answer


def _held_for(seconds: float):
    return lambda server, req: server.hold(req, seconds)


BIG_MODELS = json.dumps({"data": [{"id": "m"}], "pad": " " * 200}).encode()


@pytest.mark.parametrize(
    "where, answers, path",
    [
        ("a JSON answer", {"_v1_models": trickle(BIG_MODELS, headers={"Content-Length": str(len(BIG_MODELS))})},
         "/v1/models"),
        ("a stream's line", {"_v1_completions": trickle(event(vllm_chunk(120, 20)) * 50,
                                                        headers={"Content-Type": "text/event-stream"})},
         "/v1/completions"),
        ("a stream of keep-alive comments only", {"_v1_completions": trickle(b": ping\n\n" * 200)},
         "/v1/completions"),
    ],
)  # fmt: skip
def test_an_engine_that_trickles_bytes_fails_within_its_timeout(where, answers, path):
    """httpx's read timeout restarts with every byte: a byte every 0.3 s never trips a 1 s one.
    The call's own deadline (a stream: each token's) does."""
    server = FakeEngine(**answers)
    try:
        t0 = time.monotonic()
        message = engine_error(server, name="slow", timeout_s=1)
        assert one_line_naming(message, server, rf"no answer within 1s \({path}\)$", name="slow"), message
        assert time.monotonic() - t0 < 20  # it came back (a hang would run to the 30 s of trickling)
    finally:
        server.close()


def test_retries_stay_within_the_calls_deadline():
    """Answers of 503 that take 0.6 s each: three attempts would take 1.8 s and more; the call
    ends at its deadline of 1 s, with the timeout."""

    def slow_503(server: FakeEngine, req: Request) -> None:
        if not server.stop.wait(0.6):
            send_json(req, {"error": "busy"}, 503)

    server = FakeEngine(_v1_models=slow_503)
    try:
        t0 = time.monotonic()
        message = engine_error(server, name="busy", timeout_s=1)
        assert one_line_naming(message, server, r"no answer within 1s \(/v1/models\)$", name="busy"), message
        assert time.monotonic() - t0 < 20
        assert server.requests.count("/v1/models") <= 2  # the third attempt never started
    finally:
        server.close()


# --- sizes -----------------------------------------------------------------------------------------
def huge(declared: bool):
    def answer(server: FakeEngine, req: Request) -> None:
        from fuselm.engines.transport import MAX_REPLY_BYTES

        size = MAX_REPLY_BYTES + (1 << 20)
        head(req, 200, {"Content-Type": "application/json", **({"Content-Length": str(size)} if declared else {})})
        req.conn.sendall(b'{"data": [{"id": "m"}], "pad": "')
        piece = b"x" * (1 << 16)
        sent = 0
        while sent < size and not server.stop.is_set():
            req.conn.sendall(piece)
            sent += len(piece)

    return answer


@pytest.mark.parametrize("declared", [True, False], ids=["with-content-length", "until-close"])
def test_an_answer_over_its_bound_is_refused_unread(declared):
    from fuselm.engines.transport import MAX_REPLY_BYTES

    server = FakeEngine(_v1_models=huge(declared))
    try:
        message = engine_error(server)
        assert one_line_naming(message, server, rf"answered /v1/models with a reply over {MAX_REPLY_BYTES} bytes"), (
            message
        )
    finally:
        server.close()


def test_a_streamed_line_over_its_bound_is_refused():
    from fuselm.engines.stream import LINE_BYTES_PER_TOKEN, MAX_LINE_BYTES

    endless_line = [b'{"choices": [{"text": "' + b"y" * (3 << 20)]
    server = FakeEngine(_v1_completions=lambda server, req: completions(server, req, endless_line))
    try:
        message = engine_error(server)
        assert one_line_naming(message, server, r"answered /v1/completions with a streamed line over \d+ bytes$"), (
            message
        )
        limit = int(message.split("line over ")[1].split()[0])
        assert MAX_LINE_BYTES < limit <= MAX_LINE_BYTES + 4 * LINE_BYTES_PER_TOKEN  # 4 tokens asked
    finally:
        server.close()


@pytest.mark.parametrize("kind", ["vllm", "llamacpp-server"])
def test_a_stream_that_never_ends_is_cut_off_after_its_tokens(kind):
    """Tokens past what was asked (on llama.cpp's server: empty chunks, each counted as a
    token, which a reader looking for more text would read forever) end the stream."""
    from fuselm.engines import Sampling, engine_for
    from fuselm.engines.stream import STREAM_SLACK
    from fuselm.errors import EngineError

    def endless(server: FakeEngine, req: Request) -> None:
        head(req, 200, {"Content-Type": "text/event-stream"})
        text = isinstance(req.body["prompt"], str)
        while not server.stop.is_set():
            req.conn.sendall(event(text_chunk("") if text else vllm_chunk(120, req.body["logprobs"])))

    server = FakeEngine(_v1_completions=endless)
    engine = engine_for(kind, server.url, model="m", timeout_s=5)
    try:
        if kind == "vllm":
            stream = engine.run(engine.stream([72, 105], 4, 2, Sampling()))
        else:
            stream = engine.run(engine.text_stream("Hi", 4, Sampling()))
        with pytest.raises(EngineError, match=rf"a stream of more than {4 + STREAM_SLACK} tokens \(4 asked\)"):
            engine.run(stream.read(10**9))
        assert stream.done and len(stream.tokens) == 4 + STREAM_SLACK  # and not one more
    finally:
        engine.close()
        server.close()


# --- shapes ----------------------------------------------------------------------------------------
def answering(path: str, answer: Any, status: int = 200):
    return {path.replace("/", "_"): lambda server, req: send_json(req, answer, status)}


def chunk_with(**logprobs) -> dict[str, Any]:
    chunk = vllm_chunk(120, 20)
    chunk["choices"][0]["logprobs"].update(logprobs)
    return chunk


MALFORMED = {
    "models-not-json": (answering("/v1/models", b"<html>hello</html>"), r"/v1/models with something that is not JSON"),
    "models-not-a-list": (answering("/v1/models", {"data": {"id": "m"}}), r"/v1/models with an unexpected answer \(data:"),
    "models-id-a-number": (answering("/v1/models", {"data": [{"id": 5}]}), r"/v1/models with an unexpected answer \(data\.0\.id:"),
    "models-a-list": (answering("/v1/models", [1, 2]), r"/v1/models with an unexpected answer"),
    "models-context-negative": (answering("/v1/models", {"data": [{"id": "m", "max_model_len": -1}]}), r"/v1/models .*not a length"),
    "tokenize-negative-id": (answering("/tokenize", {"tokens": [-3]}), r"/tokenize .*token id -3 is outside the vocabulary"),
    "tokenize-huge-id": (answering("/tokenize", {"tokens": [2**40]}), r"/tokenize .*token id 1099511627776 is outside"),
    "tokenize-ids-as-text": (answering("/tokenize", {"tokens": "72 105"}), r"/tokenize with an unexpected answer \(tokens:"),
    "tokenize-float-ids": (answering("/tokenize", {"tokens": [72.5]}), r"/tokenize with an unexpected answer \(tokens\.0:"),
    "tokenize-no-tokens": (answering("/tokenize", {}), r"/tokenize with an unexpected answer \(tokens: Field required"),
    "stream-id-out-of-range": (
        {"_v1_completions": streaming(chunk_with(tokens=["token_id:99999999999"]))},
        r"/v1/completions .*token id 99999999999 is outside the vocabulary"),
    "stream-negative-id-in-top-k": (
        {"_v1_completions": streaming(chunk_with(top_logprobs=[{"token_id:-7": -0.5}]))},
        r"/v1/completions .*token id -7 is outside the vocabulary"),
    "stream-bad-id-key": (
        {"_v1_completions": streaming(chunk_with(tokens=["x"]))}, r"/v1/completions .*expected a token id key"),
    "stream-nan-log-prob": (
        {"_v1_completions": streaming(chunk_with(token_logprobs=[float("nan")]))}, r"nan is not a log-prob"),
    "stream-positive-log-prob": (
        {"_v1_completions": streaming(chunk_with(token_logprobs=[3.5]))}, r"3\.5 is not a log-prob"),
    "stream-lengths-disagree": (
        {"_v1_completions": streaming(chunk_with(tokens=["token_id:120", "token_id:121"]))},
        r"/v1/completions with 2 tokens, 1 log-probs and 1 top-k in a chunk"),
    "stream-top-k-too-long": (
        {"_v1_completions": streaming(chunk_with(top_logprobs=[{f"token_id:{i}": -1.0 for i in range(200)}]))},
        r"/v1/completions with a top-k of more than 21 entries"),
    "stream-chunk-a-list": ({"_v1_completions": streaming([1, 2, 3])}, r"/v1/completions with an unexpected answer"),
    "stream-chunk-not-json": ({"_v1_completions": streaming(b"{oops")}, r"/v1/completions with something that is not JSON"),
    "stream-chunk-deeply-nested": ({"_v1_completions": streaming(b"[" * 100_000)}, r"/v1/completions with something that is not JSON"),
    "stream-error-as-text": ({"_v1_completions": streaming({"error": "boom"})}, r": boom \(/v1/completions\)$"),
    "stream-two-choices": (
        {"_v1_completions": streaming({"choices": vllm_chunk(120, 20)["choices"] * 2})}, r"a chunk of 2 choices"),
    "stream-choices-not-a-list": ({"_v1_completions": streaming({"choices": {"text": "x"}})}, r"unexpected answer \(choices:"),
    "stream-not-utf8": ({"_v1_completions": lambda s, r: completions(s, r, [b"data: \xff\xfe\n\n"])}, r"not UTF-8"),
    "stream-compressed": (
        {"_v1_completions": lambda s, r: head(r, 200, {"Content-Encoding": "gzip"})}, r"a gzip stream"),
}  # fmt: skip


@pytest.mark.parametrize("answers, match", list(MALFORMED.values()), ids=list(MALFORMED))
def test_a_malformed_answer_is_one_engine_error_naming_the_expert_and_the_endpoint(answers, match):
    server = FakeEngine(**answers)
    try:
        message = engine_error(server)
        assert one_line_naming(message, server, match), message
    finally:
        server.close()


def test_a_detokenizing_answer_without_its_text_is_an_engine_error():
    """(`single` detokenizes only where a chunk brings several tokens: asked directly here.)"""
    from fuselm.engines import VLLMEngine
    from fuselm.errors import EngineError

    server = FakeEngine(**answering("/detokenize", {"text": 5}))  # vLLM's key is "prompt"
    engine = VLLMEngine(server.url, model="m", timeout_s=5)
    try:
        with pytest.raises(EngineError, match=r"^vllm at .* answered /detokenize with an unexpected answer"):
            engine.run(engine.detokenize([72]))
    finally:
        engine.close()
        server.close()


LLAMACPP_MALFORMED = {
    "error-as-text": ({"_v1_completions": streaming({"error": "model crashed"})}, r": model crashed \(/v1/completions\)$"),
    "text-a-number": ({"_v1_completions": streaming(text_chunk(5))}, r"unexpected answer \(choices\.0\.text:"),
    "tokenize-out-of-range": (answering("/extras/tokenize", {"tokens": [1 << 30]}), r"/extras/tokenize .*outside the vocabulary"),
}  # fmt: skip


@pytest.mark.parametrize("answers, match", list(LLAMACPP_MALFORMED.values()), ids=list(LLAMACPP_MALFORMED))
def test_a_malformed_answer_of_a_text_engine_is_one_engine_error(answers, match):
    server = FakeEngine(**answers)
    try:
        message = engine_error(server, kind="llamacpp-server")
        assert one_line_naming(message, server, match, kind="llamacpp-server"), message
    finally:
        server.close()


def test_token_ids_are_checked_against_the_models_vocabulary_where_it_is_known(tmp_path):
    """A model directory here (its config.json) sets the bound: an id the engine could not have."""
    from fuselm.engines.answers import Tokens
    from fuselm.engines.token_engine import vocab_size
    from fuselm.engines.vllm import VLLMEngine
    from fuselm.errors import EngineError

    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 100}))
    assert vocab_size(tmp_path) == 100 and vocab_size(tmp_path / "nowhere") is None
    engine = VLLMEngine("http://127.0.0.1:1", model="m")
    engine._vocab = vocab_size(tmp_path)
    assert engine._parse(Tokens, {"tokens": [99]}, "/tokenize").tokens == [99]
    with pytest.raises(EngineError, match=r"/tokenize .*token id 100 is outside the vocabulary \(0 to 99\)"):
        engine._parse(Tokens, {"tokens": [100]}, "/tokenize")


# --- cancellation ----------------------------------------------------------------------------------
def mid_stream(server: FakeEngine, req: Request) -> None:
    """One token, then nothing for 30 s."""
    head(req, 200, {"Content-Type": "text/event-stream"})
    req.conn.sendall(event(vllm_chunk(120, req.body["logprobs"])))
    server.hold(req, 30)


@pytest.mark.parametrize("answer", [_held_for(30), mid_stream], ids=["before-its-headers", "mid-stream"])
@pytest.mark.parametrize("method", ["single", "adafuse"])
def test_a_cancelled_generation_stops_its_engine_calls_at_once(method, answer):
    """An engine that holds its answer 30 s (the timeout is 60 s); the caller cancels after 0.5 s:
    the generation ends with GenerationCancelled well before the engine would answer, and the
    engine sees its connection closed (the request is dropped, not left running). With AdaFuse
    the calls wait on the expert pool's threads, which see the cancel check too."""
    from fuselm.cancel import GenerationCancelled
    from fuselm.config import GenerationConfig
    from fuselm.fusion.loop import decode
    from fuselm.fusion.methods import build_method

    servers = [FakeEngine(_v1_completions=answer) for _ in range(2 if method == "adafuse" else 1)]
    models = [remote_model(s.url, name=f"held{i}", timeout_s=60) for i, s in enumerate(servers)]
    try:
        built = build_method(method, models)
        t0 = time.monotonic()
        with pytest.raises(GenerationCancelled):
            decode(built, "Hello", GenerationConfig(max_new_tokens=8, chat="raw"),
                   cancel=lambda: time.monotonic() - t0 > 0.5)  # fmt: skip
        # well before the engine's 30 s; the margin is for a loaded two-core CI machine
        assert time.monotonic() - t0 < 20
        for s in servers:
            assert s.hung_up.wait(20), "the engine's connection was left open"
    finally:
        for m in models:
            m.close()
        for s in servers:
            s.close()


def test_a_call_after_the_generation_was_cancelled_is_not_sent():
    from fuselm.cancel import GenerationCancelled, cancel_scope

    server = FakeEngine()
    model = remote_model(server.url, name="fine")
    try:
        with cancel_scope(lambda: True):
            with pytest.raises(GenerationCancelled):
                model.tokenize("Hello")
        assert server.requests == []
        assert model.tokenize("Hi") == [72, 105]  # outside the scope: asked
    finally:
        model.close()
        server.close()


# --- through the server ------------------------------------------------------------------------------
def test_an_engine_that_fails_under_a_served_request_is_a_502_naming_the_expert(tmp_path):
    """`fuselm serve` with its one model on the fake engine: the engine answers while the server
    loads, then nonsense. The request gets a 502 (the server's fault, not the
    client's) whose message names the expert, and the server stays up."""
    import os
    import subprocess
    import sys

    import httpx
    import yaml

    from .conftest import wait_until_ready

    broken = threading.Event()  # set once the server is ready

    def first_then_nonsense(server: FakeEngine, req: Request) -> None:
        if not broken.is_set():
            completions(server, req)
        else:
            streaming({"choices": "not a list"})(server, req)

    engine = FakeEngine(_v1_completions=first_then_nonsense)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"port": port, "setups": [
        {"id": "e", "models": [{"name": "far", "engine": "vllm", "url": engine.url, "timeout_s": 5}]}]}))  # fmt: skip
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "fuselm.cli", "serve", "--config", str(config)], stdout=log,
                            stderr=subprocess.STDOUT, env={k: v for k, v in os.environ.items() if k != "FUSELM_API_KEY"})  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(proc, url, tmp_path / "serve.log")
        broken.set()
        r = httpx.post(url + "/v1/completions", json={"model": "e", "prompt": "Hello", "max_tokens": 3}, timeout=60)
        assert r.status_code == 502, r.text
        err = r.json()["error"]
        assert (
            err["type"] == "engine_error"
            and err["message"] == "expert 'far': its engine failed (the server's log says why)"
        ), err
        assert engine.url not in r.text  # the engine's address stays in the server's log
        assert httpx.get(url + "/health", timeout=5).json() == {"status": "ok"}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
        engine.close()
    assert "Traceback" not in (tmp_path / "serve.log").read_text()
