"""Clients of serving engines that hold an expert model in another process.

An engine offers top-k log-probs, not full distributions, and keeps its own KV cache (and
prefix cache): fuselm sends token ids, tokenized by the engine itself so that client and server
never disagree about BOS, special tokens or merges, and keeps no model state of its own. What a
method can run on is stated by each engine's `offers` (see `fusion.base.FusionMethod.needs`).

Every call is a coroutine on one event loop thread shared by all engine clients of the process
(:func:`engine_loop`): the calls of one round, of several experts and several branches, go out at
once over keep-alive connections, and the synchronous session code waits on their futures.

Faults, and what bounds every call (what a request to fuselm can make an engine client do):

- **Deadlines**: `timeout_s` bounds each call as a whole (`asyncio.timeout` around it): a
  request's connect, every retry with its backoff, the answer's headers and its whole body; a
  stream's opening likewise. A stream is read lazily, over a generation, so it has no deadline
  as a whole: instead each of its tokens must arrive within `timeout_s` of the read that asks
  for it or of the token before (lines without a token, keep-alive comments, do not restart the
  clock), and a stream brings at most its `max_tokens` plus `STREAM_SLACK` tokens, so a stream
  lasts at most (`max_tokens` + `STREAM_SLACK` + 1) x `timeout_s`. An engine that trickles bytes
  fails like one that is silent: `no answer within N s`.
- **Sizes**: bodies are read incrementally and never held beyond their bound: a JSON answer up
  to `MAX_REPLY_BYTES` (8 MiB; more for the requests whose answer grows with the tokens asked,
  `REPLY_BYTES_PER_TOKEN` each), a streamed line up to `MAX_LINE_BYTES` (1 MiB) plus
  `LINE_BYTES_PER_TOKEN` per token the stream may bring (an SGLang chunk repeats everything so
  far; a vLLM chunk holds every token made while the reader was away), an error's text up to
  `ERROR_BODY_BYTES`. Answers are asked for uncompressed; a compressed one is refused.
- **Shapes**: every answer is validated (small pydantic models, :func:`Engine._parse`) before
  use: types, lengths that must agree, finite log-probs that are at most 0 (or -inf), token ids
  from 0 to below the vocabulary size (where the engine's model directory is here: its
  `config.json`) or `MAX_TOKEN_ID`, at most k+1 entries in a top-k.
- **Retries** with backoff for a refused connection, a connection dropped or reset before an
  answer, or a 429/502/503/504 (all calls here are reads, safe to repeat), never for a timeout,
  and all within the call's deadline.
- **Cancellation**: an engine call is a task on the engine loop; `RemoteModel.run` cancels it
  when the generation's caller cancels (`fuselm.cancel`), which closes its connection.

Every fault is an :class:`EngineError` of one line that names the engine and the endpoint;
nothing an engine answers becomes a KeyError, TypeError, IndexError or ValueError here.

Checked against vLLM 0.32.0 (CPU build: `/v1/completions`, `/tokenize`, `/detokenize`,
`/v1/models`), SGLang 0.5.23 (its CPU path: `/generate`, `/tokenize`, `/detokenize`,
`/v1/models`) and llama-cpp-python's server 0.3.36 (`/v1/completions` on text,
`/extras/tokenize`, `/v1/models`; generation only, see LlamaCppServerEngine).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import math
import re
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, TypeVar

import httpx
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, stop_after_delay, wait_exponential

from ..conventions import END_OF_TURN_TOKENS, OFFERS_ROLLOUT, OFFERS_SCORE, OFFERS_TOPK
from ..errors import EngineError, FuselmError

log = logging.getLogger("fuselm")

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

# What an engine's answer may be (see the module docstring): a JSON answer's body, and more per
# token for the answers that grow with the tokens asked (prompt log-probs, scores); one streamed
# line, and more per token the stream may bring; what is read of an error's text.
MAX_REPLY_BYTES = 8 << 20
REPLY_BYTES_PER_TOKEN = 4 << 10
MAX_LINE_BYTES = 1 << 20
LINE_BYTES_PER_TOKEN = 4 << 10
ERROR_BODY_BYTES = 64 << 10
# Tokens a stream may bring beyond the max_tokens it asked for (an end-of-sequence token, an
# engine's empty chunk) before it is cut off as one that never ends.
STREAM_SLACK = 8
# The bound of a token id where the vocabulary's size is not known here (above any vocabulary).
MAX_TOKEN_ID = 1 << 24
# A log-prob above 0 by more than float rounding is not one.
LOGPROB_SLACK = 1e-3


class _Transient(Exception):
    """An answer worth asking again for (429, 502, 503, 504)."""

    def __init__(self, status: int, text: str):
        super().__init__(f"{status}")
        self.status, self.text = status, text


def _retryable(e: BaseException) -> bool:
    # Not timeouts: a stalled engine must fail within its timeout, not a multiple of it. A connection
    # reset while sending or reading (a keep-alive connection the server closed under us) is asked
    # again: every engine call fuselm makes only reads (tokenize, score, decode), so a repeat is safe.
    return isinstance(e, (_Transient, httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError))


class _EngineLoop:
    """One daemon thread running the event loop of every engine client in the process."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuselm-engines", daemon=True)
        self.thread.start()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Start `coro` on the loop (from any thread but the loop's own); cancelling the future
        cancels it there."""
        if threading.current_thread() is self.thread:
            coro.close()
            raise RuntimeError("engine_loop() called from the engine loop itself")
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Awaitable[T]) -> T:
        """Run `coro` on the loop and wait for it (from any thread but the loop's own)."""
        return self.submit(coro).result()  # type: ignore[arg-type]


_LOOP: _EngineLoop | None = None
_LOOP_LOCK = threading.Lock()


def engine_loop() -> _EngineLoop:
    global _LOOP
    with _LOOP_LOCK:
        if _LOOP is None:
            _LOOP = _EngineLoop()
        return _LOOP


# The token id of a streamed token from an engine that does not say it (LlamaCppServerEngine), and
# the context length of an engine that does not say it (its own error then tells).
TEXT_ONLY = -1
UNKNOWN_CONTEXT = 1 << 30


@dataclass
class StreamToken:
    """One generated token of a stream: its id, log-prob, the top-k before it, and its text (the
    engine's own incremental detokenization, so leading spaces and multi-byte characters are
    right). An end-of-sequence token has `eos` set and empty text."""

    token_id: int
    logprob: float
    top: dict[int, float]
    text: str
    eos: bool = False


@dataclass
class EngineFacts:
    """What fuselm needs to know about the engine's model, asked once."""

    model: str
    context_length: int
    bos_token_id: int | None
    eos_token_ids: frozenset[int]
    has_chat_template: bool


@dataclass
class Sampling:
    """How a stream chooses tokens: greedy (temperature 0) or sampled on the engine."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"temperature": self.temperature}
        if self.temperature > 0:
            out.update(top_p=self.top_p, top_k=self.top_k or -1)
            if self.seed is not None:
                out["seed"] = self.seed
        return out


class EngineStream:
    """A streamed completion, read lazily: tokens arrive as the engine makes them, and closing
    the stream (when fuselm has seen enough) makes the engine abort the request. Bounded (see
    the module docstring): each token within the engine's `timeout_s`, each line in size, and
    at most `max_tokens` + STREAM_SLACK tokens."""

    def __init__(self, engine: Engine, response: httpx.Response, max_tokens: int, k: int, prompt: list[int], path: str):
        self.engine = engine
        self.path = path
        self.prompt = prompt  # the token ids it continues
        self.anchor = prompt[-1:]  # the context its first token's text is decoded in
        self.max_tokens = max_tokens
        self.k = k  # the top-k each token comes with
        self.max_line = MAX_LINE_BYTES + LINE_BYTES_PER_TOKEN * max(max_tokens, 1)
        self.limit = max_tokens + STREAM_SLACK  # the most tokens it may bring
        self._response = response
        self._raw = response.aiter_raw()
        self._buf = bytearray()
        self._scanned = 0  # bytes of `_buf` known to hold no newline
        self._eof = False
        self.tokens: list[StreamToken] = []
        self.text = ""  # the text of `tokens` (for engines whose chunks carry the text so far)
        self.done = False  # the engine ended it (end of sequence or max_tokens); or closed
        self.finished = False  # ended on end of sequence

    async def _line(self) -> str | None:
        """The next line (without its end), None at the end of the answer; read incrementally
        and never longer than `max_line`."""
        while True:
            i = self._buf.find(b"\n", self._scanned)
            if i >= 0 or self._eof:
                end = i if i >= 0 else len(self._buf)
                if end > self.max_line:
                    raise self.engine._bad(self.path, f"a streamed line over {self.max_line} bytes")
                if i < 0 and not self._buf:
                    return None
                line = bytes(self._buf[:end])
                del self._buf[: end + 1]
                self._scanned = 0
                try:
                    return line.rstrip(b"\r").decode("utf-8")
                except UnicodeDecodeError:
                    raise self.engine._bad(self.path, "a streamed line that is not UTF-8") from None
            self._scanned = len(self._buf)
            if self._scanned > self.max_line:
                raise self.engine._bad(self.path, f"a streamed line over {self.max_line} bytes")
            try:
                self._buf += await self._raw.__anext__()
            except StopAsyncIteration:
                self._eof = True

    async def read(self, n: int) -> None:
        """Read until at least `n` tokens are in `tokens` or the stream is done."""
        loop = asyncio.get_running_loop()
        timeout = self.engine.timeout_s
        try:
            deadline = loop.time() + timeout  # restarts with each token, not with each line
            while not self.done and len(self.tokens) < n:
                async with asyncio.timeout_at(deadline):
                    line = await self._line()
                if line is None:
                    await self.aclose()
                    break
                if not line.startswith("data:"):
                    continue  # blank lines between events, comments (keep-alive pings), other fields
                data = line[5:].strip()
                if data == "[DONE]":
                    await self.aclose()
                    break
                before = len(self.tokens)
                await self.engine._stream_chunk(self, self.engine._json(data, self.path))
                self.room(0)
                if len(self.tokens) > before:
                    deadline = loop.time() + timeout
        except TimeoutError:
            await self._abort()
            raise EngineError(f"{self.engine.where}: no answer within {timeout:g}s ({self.path})") from None
        except httpx.HTTPError as e:
            await self._abort()
            raise self.engine._error(e, self.path) from None
        except BaseException:
            await self._abort()
            raise

    def room(self, n: int) -> None:
        """An EngineError unless `n` more tokens fit in what the stream may bring."""
        if len(self.tokens) + n > self.limit:
            raise self.engine._bad(self.path, f"a stream of more than {self.limit} tokens ({self.max_tokens} asked)")

    async def _abort(self) -> None:
        try:
            await self.aclose()
        except Exception:  # noqa: BLE001 - closing a broken connection: nothing to give back
            pass

    async def aclose(self) -> None:
        self.done = True
        await self._response.aclose()


class Engine:
    """One model on a serving engine: `url` is its base (http://host:port), `model` its model id
    there (default: the only one it serves). Subclasses speak one engine's protocol."""

    kind: ClassVar[str] = "?"
    offers: ClassVar[frozenset[str]] = frozenset()
    max_top_k: ClassVar[int] = 20
    takes_text: ClassVar[bool] = False  # prompts as text, streams without token ids (generation only)

    def __init__(
        self,
        url: str,
        model: str | None = None,
        timeout_s: float = 60.0,
        api_key: str | None = None,
        retries: int = 3,
        eos_token_ids: Sequence[int] | None = None,
        tokenizer: str | None = None,
    ):
        self.url = url.rstrip("/")
        self._tokenizer_spec = tokenizer  # a directory, "engine", or None: the model's directory if here
        self._local: Any = None  # a tokenizer here that gives the engine's ids and texts (checked)
        self.model_id = model
        self.timeout_s = timeout_s
        self.retries = retries
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._eos_override = frozenset(eos_token_ids) if eos_token_ids else None
        self._http: httpx.AsyncClient | None = None
        self._facts: EngineFacts | None = None
        self._facts_lock: asyncio.Lock | None = None
        self._vocab: int | None = None  # the vocabulary's size, where the model's directory is here
        self.forced_scores = 0  # scored (prefix, token) pairs asked one by one (VLLMEngine.score)
        self.mangled_tops = 0  # top-k answers that came back mangled and were asked again (VLLMEngine._top)
        # requests sent, and seconds until their answer (a stream: until its headers), by path:
        # what a benchmark reads to see where a round's time goes
        self.requests: Counter[str] = Counter()
        self.request_seconds: Counter[str] = Counter()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    @property
    def where(self) -> str:
        return f"{self.kind} at {self.url}"

    # --- transport ------------------------------------------------------------------------------
    def _client(self) -> httpx.AsyncClient:
        # Made on the engine loop, lazily: an AsyncClient belongs to the loop it first runs on.
        if self._http is None:
            timeout = httpx.Timeout(self.timeout_s, connect=min(self.timeout_s, 10.0))
            # Idle connections expire before the engines' own keep-alive (uvicorn's 5 s), so fuselm
            # does not reuse one the server is closing at that moment.
            limits = httpx.Limits(max_connections=64, max_keepalive_connections=32, keepalive_expiry=3.0)
            # Uncompressed answers: their size is what is bounded (a compressed one is refused).
            headers = {**self._headers, "Accept-Encoding": "identity"}
            self._http = httpx.AsyncClient(base_url=self.url, timeout=timeout, headers=headers, limits=limits)
        return self._http

    def _error(self, e: BaseException, path: str = "") -> EngineError:
        at = f" ({path})" if path else ""
        if isinstance(e, (httpx.TimeoutException, TimeoutError)):
            return EngineError(f"{self.where}: no answer within {self.timeout_s:g}s{at}")
        if isinstance(e, httpx.ConnectError):
            return EngineError(f"{self.where}: cannot connect{at}: {e}")
        if isinstance(e, _Transient):
            return EngineError(f"{self.where} answered {e.status}{at}: {e.text[:200]}")
        if isinstance(e, httpx.HTTPError):
            return EngineError(f"{self.where}: {type(e).__name__}{at}: {str(e) or 'connection lost'}")
        return EngineError(f"{self.where}: {e}")

    def _bad(self, path: str, what: str) -> EngineError:
        """An answer fuselm cannot use."""
        return EngineError(f"{self.where} answered {path} with {what}")

    @property
    def _max_id(self) -> int:
        """Token ids from the engine are below this: the vocabulary's size where it is known."""
        return self._vocab or MAX_TOKEN_ID

    def _parse(self, cls: type[M], data: Any, path: str) -> M:
        """`data` (a decoded JSON answer) as `cls`, or the EngineError that says what is wrong."""
        try:
            return cls.model_validate(data, context={"max_id": self._max_id})
        except ValidationError as e:
            err = e.errors(include_url=False, include_input=False)[0]
            where = ".".join(str(x) for x in err["loc"])
            raise self._bad(path, f"an unexpected answer ({where or 'the whole'}: {err['msg']})"[:400]) from None

    def _json(self, data: bytes | str, path: str) -> Any:
        try:
            return json.loads(data)
        except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise self._bad(path, "something that is not JSON") from None

    def _retrying(self) -> AsyncRetrying:
        return AsyncRetrying(
            stop=stop_after_attempt(self.retries) | stop_after_delay(self.timeout_s),
            wait=wait_exponential(multiplier=0.1, max=2.0),
            retry=retry_if_exception(_retryable),
            reraise=True,
        )

    async def _body(self, r: httpx.Response, path: str, limit: int) -> bytes:
        """The whole body of `r`, read incrementally; an EngineError past `limit` bytes."""
        encoding = r.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise self._bad(path, f"a {encoding} body (asked for an uncompressed one)")
        declared = r.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise self._bad(path, f"a reply over {limit} bytes ({declared})")
        body = bytearray()
        async for chunk in r.aiter_raw():
            body += chunk
            if len(body) > limit:
                raise self._bad(path, f"a reply over {limit} bytes")
        return bytes(body)

    async def _error_text(self, r: httpx.Response) -> str:
        """The start of an error answer's text (at most ERROR_BODY_BYTES read)."""
        body = bytearray()
        try:
            async for chunk in r.aiter_raw():
                body += chunk
                if len(body) >= ERROR_BODY_BYTES:
                    break
        except httpx.HTTPError:
            pass
        return bytes(body[:ERROR_BODY_BYTES]).decode(errors="replace")

    async def _send(self, method: str, path: str, body: dict[str, Any] | None) -> httpx.Response:
        """One attempt: the answer's headers (its body unread); a 429/502/503/504 is a `_Transient`."""
        client = self._client()
        r = await client.send(client.build_request(method, path, json=body), stream=True)
        if r.status_code in (429, 502, 503, 504):
            text = await self._error_text(r)
            await r.aclose()
            raise _Transient(r.status_code, text)
        return r

    async def _exchange(self, method: str, path: str, body: dict[str, Any] | None, limit: int) -> bytes:
        """One attempt of a request: its answer's body, at most `limit` bytes."""
        r = await self._send(method, path, body)
        try:
            if r.status_code != 200:
                text = await self._error_text(r)
                raise EngineError(f"{self.where} answered {r.status_code} to {path}: {text[:300]}")
            return await self._body(r, path, limit)
        finally:
            await r.aclose()

    async def _request(
        self, method: str, path: str, body: dict[str, Any] | None = None, limit: int = MAX_REPLY_BYTES
    ) -> Any:
        """The decoded JSON answer of one call, all of it (retries, headers, body) within
        `timeout_s`, its body within `limit` bytes."""
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout_s):
                async for attempt in self._retrying():
                    with attempt:
                        data = await self._exchange(method, path, body, limit)
        except (httpx.HTTPError, _Transient, TimeoutError) as e:
            raise self._error(e, path) from None
        finally:
            self.requests[path] += 1
            self.request_seconds[path] += time.perf_counter() - t0
        return self._json(data, path)

    async def _open_stream(
        self, path: str, body: dict[str, Any], max_tokens: int, k: int, prompt: list[int]
    ) -> EngineStream:
        """A stream's answer up to its headers, within `timeout_s` (its tokens: EngineStream)."""
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout_s):
                async for attempt in self._retrying():
                    with attempt:
                        r = await self._send("POST", path, body)
                if r.status_code != 200:
                    try:
                        text = await self._error_text(r)
                    finally:
                        await r.aclose()
                    raise EngineError(f"{self.where} answered {r.status_code} to {path}: {text[:300]}")
        except (httpx.HTTPError, _Transient, TimeoutError) as e:
            raise self._error(e, path) from None
        finally:
            self.requests[path + " (stream)"] += 1
            self.request_seconds[path + " (stream)"] += time.perf_counter() - t0
        encoding = r.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            await r.aclose()
            raise self._bad(path, f"a {encoding} stream (asked for an uncompressed one)")
        return EngineStream(self, r, max_tokens, k, prompt, path)

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    def close(self) -> None:
        engine_loop().run(self.aclose())

    # --- what every engine answers ------------------------------------------------------------
    async def facts(self) -> EngineFacts:
        if self._facts is None:
            self._facts_lock = self._facts_lock or asyncio.Lock()
            async with self._facts_lock:
                if self._facts is None:
                    self._facts = await self._ask_facts()
        return self._facts

    # vLLM and SGLang answer the same /v1/models, /tokenize (a prompt, or chat messages) and
    # /detokenize; an engine that does not overrides these.
    _detokenized_key: ClassVar[str] = "text"
    _detokenize_options: ClassVar[dict[str, Any]] = {}

    async def _served_model(self) -> _ServedModel:
        """The `/v1/models` entry of the model (the entry's `model:`, or the only one served);
        sets `model_id`."""
        listed = self._parse(_ModelList, await self._request("GET", "/v1/models"), "/v1/models")
        served = {m.id: m for m in listed.data}
        model = self.model_id
        if model is None:
            if len(served) != 1:
                raise EngineError(f"{self.where} serves {sorted(served)}; say which with `model:`")
            model = next(iter(served))
        elif model not in served:
            raise EngineError(f"{self.where} does not serve {model!r}; it serves {sorted(served)}")
        self.model_id = model
        return served[model]

    async def _ask_facts(self) -> EngineFacts:
        entry = await self._served_model()
        model = self.model_id
        assert model is not None
        with_bos, without, chat = await asyncio.gather(
            self._tokenize("a", True), self._tokenize("a", False), self._chat_probe(), return_exceptions=False
        )
        bos = with_bos[0] if len(with_bos) > len(without) else None
        eos = self._eos_override or await self._eos_ids()
        self._local = await self._local_tokenizer(model)
        if self._local is not None:
            self._vocab = _vocab_size(Path(self._tokenizer_spec or model).expanduser())
        return EngineFacts(model, entry.max_model_len or 4096, bos, eos, chat)

    async def _local_tokenizer(self, model: str) -> Any:
        """The tokenizer to use here instead of `/tokenize` and `/detokenize`: the entry's
        `tokenizer:` directory or, by default, the engine's model directory where this machine
        has it (vLLM serving a local path names the model by it), once it gave the engine's own
        ids and texts on every probe text; None to ask the engine (said once, when it differed)."""
        spec = self._tokenizer_spec
        if spec == "engine":
            return None
        path = Path(spec or model).expanduser()
        if not (path / "tokenizer_config.json").is_file():
            if spec:
                raise FuselmError(f"tokenizer: {spec} is not a tokenizer directory (no tokenizer_config.json)")
            return None
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        except Exception as e:  # noqa: BLE001 - any failure means: ask the engine
            log.warning("%s: cannot load the tokenizer in %s (%s); asking the engine", self.where, path, e)
            return None
        probes = [(t, special) for t in _TOKENIZER_PROBES for special in (True, False)]
        remote = await asyncio.gather(*(self._tokenize(t, special) for t, special in probes))
        texts = await asyncio.gather(*(self._detokenize(ids) for ids in remote))
        for (text, special), ids, back in zip(probes, remote, texts):
            mine = list(tok(text, add_special_tokens=special)["input_ids"])
            if mine != ids or self._local_decode(tok, ids) != back:
                log.warning("%s: the tokenizer in %s differs from the engine's on %r; asking the engine",
                            self.where, path, text)  # fmt: skip
                return None
        log.info("%s: tokenizing here with %s (the same ids and texts as the engine on every probe)", self.where, path)
        return tok

    def _local_decode(self, tok: Any, ids: Sequence[int]) -> str:
        """What this engine's `/detokenize` answers, from a tokenizer here."""
        return tok.decode(list(ids))

    async def _chat_probe(self) -> bool:
        try:
            await self._chat_ids([{"role": "user", "content": "a"}])
        except EngineError:
            return False
        return True

    async def _eos_ids(self) -> frozenset[int]:
        """The end-of-sequence ids: the common end-of-turn tokens that the vocabulary has as
        single special tokens (the same set the in-process backends stop on), plus what the
        engine says where it says it; `eos_token_ids:` in the model entry overrides both."""
        found = await asyncio.gather(*(self._single_token(t) for t in END_OF_TURN_TOKENS))
        return frozenset(i for one in found for i in one) | await self._told_eos_ids()

    async def _told_eos_ids(self) -> frozenset[int]:
        return frozenset()

    async def _single_token(self, text: str) -> list[int]:
        """[id] when `text` is one (special) token of the vocabulary, else []."""
        ids = await self._tokenize(text, False)
        return ids if len(ids) == 1 and await self._detokenize(ids) in ("", text) else []

    async def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        await self.facts()  # the model id, and whether a tokenizer here gives the same ids
        if self._local is not None:
            return list(self._local(text, add_special_tokens=add_special_tokens)["input_ids"])
        return await self._tokenize(text, add_special_tokens)

    async def detokenize(self, ids: Sequence[int]) -> str:
        await self.facts()
        if self._local is not None:
            return self._local_decode(self._local, ids)
        return await self._detokenize(ids)

    @property
    def tokenizes_here(self) -> bool:
        """Whether `tokenize` and `detokenize` run here (known after the first call)."""
        return self._local is not None

    async def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation rendered with the model's chat template, ending where the
        assistant's answer starts."""
        await self.facts()
        return await self._chat_ids(messages)

    async def _tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        body = {"model": self.model_id, "prompt": text, "add_special_tokens": add_special_tokens}
        return await self._token_ids("/tokenize", body)

    async def _token_ids(self, path: str, body: dict[str, Any]) -> list[int]:
        """The `tokens` of a tokenizing answer (token ids, checked)."""
        return self._parse(_Tokens, await self._request("POST", path, body), path).tokens

    async def _detokenize(self, ids: Sequence[int]) -> str:
        body = {"model": self.model_id, "tokens": list(ids), **self._detokenize_options}
        return await self._text_of("/detokenize", body, self._detokenized_key)

    async def _text_of(self, path: str, body: dict[str, Any], key: str) -> str:
        """The text under `key` of an answer."""
        answer = await self._request("POST", path, body)
        if not isinstance(answer, dict) or not isinstance(answer.get(key), str):
            raise self._bad(path, f"an unexpected answer (no text under {key!r})")
        return answer[key]

    async def _chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        body = {"model": self.model_id, "messages": messages, "add_generation_prompt": True,
                "add_special_tokens": False}  # fmt: skip
        return await self._token_ids("/tokenize", body)

    async def _push_tokens(
        self, stream: EngineStream, ids: list[int], logprobs: list[float], tops: list[dict[int, float]], text: str
    ) -> None:
        """Add a chunk's tokens to a stream (`text`: the chunk's text, split between them)."""
        stream.room(len(ids))
        if not len(ids) == len(logprobs) == len(tops):
            raise self._bad(
                stream.path, f"{len(ids)} tokens, {len(logprobs)} log-probs and {len(tops)} top-k in a chunk"
            )
        if any(len(top) > stream.k + 1 for top in tops):
            raise self._bad(stream.path, f"a top-k of more than {stream.k + 1} entries ({stream.k} asked)")
        facts = await self.facts()
        texts = await self._token_texts(stream, ids, text)
        for tok, lp, top, piece in zip(ids, logprobs, tops, texts):
            eos = tok in facts.eos_token_ids
            stream.tokens.append(StreamToken(tok, float(lp), top, "" if eos else piece, eos))

    async def _end_stream(self, stream: EngineStream, stopped: bool) -> None:
        """The engine ended the stream: on end of sequence when `stopped`, else at max_tokens."""
        stream.finished = stopped
        if stopped and stream.tokens and not stream.tokens[-1].eos:
            # an end-of-sequence id the probe did not know: learn it
            facts = await self.facts()
            last = stream.tokens[-1]
            facts.eos_token_ids = facts.eos_token_ids | {last.token_id}
            last.eos, last.text = True, ""
        await stream.aclose()

    async def _token_texts(self, stream: EngineStream, ids: list[int], text: str) -> list[str]:
        """Each token's share of a chunk's text: exact for one token per chunk (the usual case);
        a chunk of several (the engine ran ahead of the reader) is split by detokenizing."""
        if len(ids) <= 1:
            return [text] * len(ids)
        # decoded after the token before them (a lone SentencePiece token would lose its space)
        before = [t.token_id for t in stream.tokens[-1:]] or stream.anchor
        anchor = len(await self.detokenize(before)) if before else 0
        out, prev = [], 0
        for i in range(1, len(ids) + 1):
            upto = len(await self.detokenize(before + ids[:i])) - anchor if i < len(ids) else len(text)
            out.append(text[prev:upto])
            prev = upto
        return out

    async def stream(self, ids: Sequence[int], max_tokens: int, k: int, sampling: Sampling) -> EngineStream:
        """A completion of the token-id prompt `ids`, streamed token by token with the top-`k`."""
        raise NotImplementedError

    async def _stream_chunk(self, stream: EngineStream, chunk: Any) -> None:
        """Add what a streamed chunk (decoded JSON, not yet checked) brings to `stream`."""
        raise NotImplementedError

    def _chunk_error(self, chunk: Any, path: str) -> None:
        """A streamed chunk that reports an error (`{"error": {"message": ...}}` or a text)."""
        if isinstance(chunk, dict) and "error" in chunk:
            error = chunk["error"]
            message = error.get("message", error) if isinstance(error, dict) else error
            raise EngineError(f"{self.where}: {str(message)[:300]} ({path})")

    def _completion_choices(self, chunk: Any, path: str, reply: type[BaseModel]) -> list[Any]:
        """A streamed completion chunk's choices, typed as `reply`: an error chunk raises, and so
        does more than the one choice asked for."""
        self._chunk_error(chunk, path)
        choices = self._parse(reply, chunk, path).choices
        if len(choices) > 1:
            raise self._bad(path, f"a chunk of {len(choices)} choices (1 asked)")
        return choices

    async def score(self, sequences: Sequence[Sequence[int]], starts: Sequence[int]) -> list[list[float]]:
        """For each token-id sequence, log p(token i | tokens before it) for every i >= its start
        (start >= 1), all in as few requests as the engine allows."""
        raise NotImplementedError


class VLLMEngine(Engine):
    """vLLM's OpenAI-compatible server (`vllm serve MODEL`)."""

    kind = "vllm"
    offers = frozenset({OFFERS_TOPK, OFFERS_ROLLOUT, OFFERS_SCORE})
    max_top_k = 20  # vLLM's default --max-logprobs

    _detokenized_key = "prompt"

    async def _told_eos_ids(self) -> frozenset[int]:
        try:  # only where the server enables it (--enable-tokenizer-info-endpoint)
            info = await self._request("GET", "/tokenizer_info")
        except EngineError:
            return frozenset()
        if not isinstance(info, dict):
            raise self._bad("/tokenizer_info", "an unexpected answer (not an object)")
        tok = info.get("eos_token")
        tok = tok.get("content") if isinstance(tok, dict) else tok
        return frozenset(await self._single_token(tok)) if isinstance(tok, str) else frozenset()

    async def _single_token(self, text: str) -> list[int]:
        body = {"model": self.model_id, "prompt": text, "add_special_tokens": False, "return_token_strs": True}
        out = self._parse(_Tokens, await self._request("POST", "/tokenize", body), "/tokenize")
        strs = out.token_strs or []
        return out.tokens if len(out.tokens) == 1 and strs and strs[0] == text else []

    async def stream(self, ids: Sequence[int], max_tokens: int, k: int, sampling: Sampling) -> EngineStream:
        await self.facts()
        k = min(max(k, 1), self.max_top_k)
        body = {"model": self.model_id, "prompt": list(ids), "max_tokens": max_tokens, "stream": True,
                "logprobs": k, "return_tokens_as_token_ids": True, "skip_special_tokens": True,
                **sampling.body()}  # fmt: skip
        return await self._open_stream("/v1/completions", body, max_tokens, k, list(ids))

    async def _stream_chunk(self, stream: EngineStream, chunk: Any) -> None:
        for choice in self._completion_choices(chunk, stream.path, _VLLMCompletion):
            lp = choice.logprobs or _VLLMLogprobs()
            ids = lp.tokens
            stream.room(len(ids))  # before any top-k is asked again for them
            tops = []
            for i, top in enumerate(lp.top_logprobs):
                top = top or {}
                if _mangled(top, stream.k) and i < len(ids):  # see _top: asked again on its own
                    self.mangled_tops += 1
                    top = await self._top(stream.prompt + [t.token_id for t in stream.tokens] + ids[:i], stream.k)
                tops.append(top)
            await self._push_tokens(stream, ids, lp.token_logprobs, tops, choice.text or "")
            if choice.finish_reason is not None:
                await self._end_stream(stream, choice.finish_reason == "stop")

    async def _choice(self, body: dict[str, Any], limit: int = MAX_REPLY_BYTES) -> _VLLMChoice:
        """The one choice of a completion that is not streamed."""
        path = "/v1/completions"
        choices = self._parse(_VLLMCompletion, await self._request("POST", path, body, limit), path).choices
        if len(choices) != 1:
            raise self._bad(path, f"{len(choices)} choices (1 asked)")
        return choices[0]

    async def score(self, sequences: Sequence[Sequence[int]], starts: Sequence[int]) -> list[list[float]]:
        """Each scored (prefix, token) is a one-token completion of its prefix restricted to that
        token (`allowed_token_ids`), all at once: vLLM reports the raw log-prob, before the
        restriction (exact, checked against `prompt_logprobs` for a token of rank 12,636), batches
        them and reads every prefix from its prefix cache. Not `prompt_logprobs`, which is exact
        too but recomputes the whole prefix (vLLM skips the prefix cache for such requests:
        measured 31 s per NQ row with AdaFuse when every score went that way), nor a top-20 with
        a second request for a token outside it (two waves per round). Not `logprob_token_ids`:
        in vLLM 0.32 one such request replaces the top-k of every other request in its batch by
        placeholders (see _top); `allowed_token_ids` leaves them alone (pinned by a test)."""
        if any(s < 1 for s in starts):
            raise ValueError("start must be >= 1: the first token has no context to be scored in")
        pairs = list(dict.fromkeys((tuple(seq[:i]), seq[i]) for seq, start in zip(sequences, starts)
                                   for i in range(start, len(seq))))  # fmt: skip
        if not pairs:
            return [[] for _ in sequences]
        await self.facts()
        found = await asyncio.gather(*(self._forced_logprob(list(p), t) for p, t in pairs))
        known = dict(zip(pairs, found))
        return [
            [known[tuple(seq[:i]), seq[i]] for i in range(start, len(seq))] for seq, start in zip(sequences, starts)
        ]

    async def _forced_logprob(self, prefix: list[int], token: int) -> float:
        """log p(token | prefix): a one-token completion that may only choose `token`."""
        body = {"model": self.model_id, "prompt": prefix, "max_tokens": 1, "temperature": 0, "logprobs": 1,
                "allowed_token_ids": [token], "return_tokens_as_token_ids": True}  # fmt: skip
        lp = (await self._choice(body)).logprobs
        if lp is None or not lp.tokens or not lp.token_logprobs:
            raise self._bad("/v1/completions", f"a completion without the log-prob of token {token}")
        got, value = lp.tokens[0], lp.token_logprobs[0]
        if got != token:
            raise EngineError(f"{self.where} was asked for token {token} only and answered token {got}")
        self.forced_scores += 1
        return value

    async def _top(self, prefix: list[int], k: int) -> dict[int, float]:
        """The top-`k` next tokens after `prefix` (one-token completion), checked: vLLM 0.32 gives
        every request in a batch the `logprob_token_ids` shape as soon as one request in it asks
        for them (sampler.py prefers them for the whole batch), so a top-k can come back as the
        sampled token plus placeholder entries (id 0 at -9999). Another client of the same engine
        can cause it. Such an answer is asked again, and then through `prompt_logprobs`, which
        that bug does not reach (exact, but it recomputes the prefix)."""
        body = {"model": self.model_id, "prompt": prefix, "max_tokens": 1, "temperature": 0, "logprobs": k,
                "return_tokens_as_token_ids": True}  # fmt: skip
        for _ in range(2):
            lp = (await self._choice(body)).logprobs
            top = lp.top_logprobs[0] if lp is not None and lp.top_logprobs else None
            if top is None:
                raise self._bad("/v1/completions", f"a completion without its top-{k} log-probs")
            if len(top) > k + 1:
                raise self._bad("/v1/completions", f"a top-k of more than {k + 1} entries ({k} asked)")
            if not _mangled(top, k):
                return top
            self.mangled_tops += 1
        _, top = await self._prompt_logprobs(prefix + [0], k)  # any token after the prefix
        if _mangled(top, k):
            raise EngineError(f"{self.where} answered the top-{k} after {len(prefix)} tokens with placeholders")
        return top

    async def _prompt_logprobs(self, seq: list[int], k: int = 0) -> tuple[float, dict[int, float]]:
        """Through `prompt_logprobs` (exact, uncached): log p(last token | the tokens before it),
        and the top-`k` there."""
        body = {"model": self.model_id, "prompt": seq, "max_tokens": 1, "temperature": 0, "prompt_logprobs": k}
        choice = await self._choice(body, MAX_REPLY_BYTES + REPLY_BYTES_PER_TOKEN * len(seq))
        last = choice.prompt_logprobs[-1] if choice.prompt_logprobs else None
        if last is None or seq[-1] not in last:
            raise self._bad("/v1/completions", f"prompt_logprobs without the log-probs of {seq[-1]}")
        top = {t: e.logprob for t, e in last.items() if e.rank <= k}
        return last[seq[-1]].logprob, top


class SGLangEngine(Engine):
    """SGLang's server (`python -m sglang.launch_server --model-path MODEL`): its native
    `/generate` on `input_ids`, which streams the answer so far (ids, text, log-probs and top-k)
    and scores several sequences in one request (`logprob_start_len`), from its radix cache."""

    kind = "sglang"
    offers = frozenset({OFFERS_TOPK, OFFERS_ROLLOUT, OFFERS_SCORE})
    _detokenize_options = {"skip_special_tokens": False}  # a rendered chat prompt keeps its markers

    async def stream(self, ids: Sequence[int], max_tokens: int, k: int, sampling: Sampling) -> EngineStream:
        await self.facts()
        k = min(max(k, 1), self.max_top_k)
        params: dict[str, Any] = {"max_new_tokens": max_tokens, "temperature": sampling.temperature,
                                  "skip_special_tokens": True}  # fmt: skip
        if sampling.temperature > 0:
            params.update(top_p=sampling.top_p, top_k=sampling.top_k or -1)
            if sampling.seed is not None:
                params["sampling_seed"] = sampling.seed
        body = {"input_ids": list(ids), "sampling_params": params, "stream": True, "return_logprob": True,
                "top_logprobs_num": k, "logprob_start_len": -1}  # fmt: skip
        return await self._open_stream("/generate", body, max_tokens, k, list(ids))

    async def _stream_chunk(self, stream: EngineStream, chunk: Any) -> None:
        self._chunk_error(chunk, stream.path)
        answer = self._parse(_SGLangChunk, chunk, stream.path)
        meta = answer.meta_info
        seen = len(stream.tokens)
        # each chunk carries everything so far: take what is new
        lps = [lp for lp, _ in meta.output_token_logprobs[seen:]]
        ids = [t for _, t in meta.output_token_logprobs[seen:]]
        tops = [{t: v for v, t in top} for top in meta.output_top_logprobs[seen:]]
        text = answer.text or ""
        new_text = text[len(stream.text) :] if text.startswith(stream.text) else ""
        stream.text = text
        await self._push_tokens(stream, ids, lps, tops, new_text)
        finish = meta.finish_reason
        if finish is not None:
            await self._end_stream(stream, isinstance(finish, dict) and finish.get("type") == "stop")

    async def score(self, sequences: Sequence[Sequence[int]], starts: Sequence[int]) -> list[list[float]]:
        """All sequences in one `/generate` request that generates nothing: the log-probs of the
        input tokens from `start` on (SGLang gives the first asked position none, hence
        `start - 1`), the shared prefix read from the radix cache."""
        if any(s < 1 for s in starts):
            raise ValueError("start must be >= 1: the first token has no context to be scored in")
        todo = [i for i, (seq, start) in enumerate(zip(sequences, starts)) if start < len(seq)]
        out: list[list[float]] = [[] for _ in sequences]
        if not todo:
            return out
        await self.facts()
        body = {"input_ids": [list(sequences[i]) for i in todo], "logprob_start_len": [starts[i] - 1 for i in todo],
                "return_logprob": True, "sampling_params": {"max_new_tokens": 0, "temperature": 0}}  # fmt: skip
        limit = MAX_REPLY_BYTES + REPLY_BYTES_PER_TOKEN * sum(len(sequences[i]) for i in todo)
        answers = await self._request("POST", "/generate", body, limit)
        answers = answers if isinstance(answers, list) else [answers]
        if len(answers) != len(todo):
            raise self._bad("/generate", f"{len(answers)} answers to {len(todo)} sequences")
        for i, answer in zip(todo, answers):
            entries = self._parse(_SGLangScore, answer, "/generate").meta_info.input_token_logprobs[1:]
            got = [lp for lp, _ in entries]
            if len(got) != len(sequences[i]) - starts[i]:
                raise self._bad("/generate", f"{len(got)} scored tokens, not {len(sequences[i]) - starts[i]}")
            if any(lp is None for lp in got):
                raise self._bad("/generate", "a score without input log-probs")
            out[i] = got  # type: ignore[assignment]
        return out


class LlamaCppServerEngine(Engine):
    """llama-cpp-python's server (`python -m llama_cpp.server --model FILE.gguf`), for
    generation only. It takes text prompts (no token ids), keys its top-k by token text, and its
    `echo` log-probs are shifted by one position on models without BOS (measured with 0.3.36:
    -8.45 for " Paris" after "The capital of France is", the log-prob of " Paris" after " Paris";
    the right value, -0.26, sits in the previous position's top-k; pinned by a test), so fuselm
    neither scores candidates nor reads a top-k through it: `single` runs on it, every other
    method is refused before any request. Its streamed chunks carry text, one chunk per token
    (a character that spans tokens comes as one chunk): a rollout on it has its text and a token
    count, no token ids. It serves one request at a time (a new one interrupts a running stream,
    which is then asked again from where it stopped), keeps its own prefix cache, renders no chat
    template for a client (prompts go raw) and does not say its context length (a prompt too
    long for it is its error)."""

    kind = "llamacpp-server"
    offers = frozenset({OFFERS_ROLLOUT})
    takes_text = True

    async def _ask_facts(self) -> EngineFacts:
        await self._served_model()
        empty = await self._tokenize("")  # [BOS] where the model adds one, else []
        return EngineFacts(str(self.model_id), UNKNOWN_CONTEXT, empty[0] if empty else None, frozenset(), False)

    async def _tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = await self._token_ids("/extras/tokenize", {"model": self.model_id, "input": text})
        if not add_special_tokens and self._facts is not None and self._facts.bos_token_id is not None:
            ids = ids[1:] if ids[:1] == [self._facts.bos_token_id] else ids
        return ids

    async def _detokenize(self, ids: Sequence[int]) -> str:
        return await self._text_of("/extras/detokenize", {"model": self.model_id, "tokens": list(ids)}, "text")

    async def _local_tokenizer(self, model: str) -> Any:
        return None  # it tokenizes what it is sent itself; fuselm only counts with it

    async def text_stream(self, prompt: str, max_tokens: int, sampling: Sampling) -> EngineStream:
        """A completion of the text `prompt`, streamed: each token is a `StreamToken` with its
        text only (`token_id` TEXT_ONLY, no log-probs)."""
        await self.facts()
        body = {"model": self.model_id, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
                # its request defaults differ from greedy/plain sampling: no penalty, no min-p cut
                "repeat_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0, "min_p": 0.0,
                "typical_p": 1.0, "top_k": sampling.top_k, "top_p": sampling.top_p,
                "temperature": sampling.temperature}  # fmt: skip
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        return await self._open_stream("/v1/completions", body, max_tokens, 0, [])

    async def _stream_chunk(self, stream: EngineStream, chunk: Any) -> None:
        for choice in self._completion_choices(chunk, stream.path, _TextChunk):
            text = choice.text or ""
            finish = choice.finish_reason
            if text or finish is None:
                stream.room(1)
                stream.tokens.append(StreamToken(TEXT_ONLY, 0.0, {}, text))
            if finish is not None:
                # "stop" is the end of sequence (fuselm sends no stop strings), "length" max_tokens
                stream.finished = finish == "stop"
                await stream.aclose()

    async def stream(self, ids: Sequence[int], max_tokens: int, k: int, sampling: Sampling) -> EngineStream:
        raise FuselmError(f"{self.where} takes text prompts, not token ids")

    async def score(self, sequences: Sequence[Sequence[int]], starts: Sequence[int]) -> list[list[float]]:
        raise FuselmError(f"{self.where} does not score continuations (its echoed log-probs are shifted)")


ENGINES: dict[str, type[Engine]] = {
    "vllm": VLLMEngine,
    "sglang": SGLangEngine,
    "llamacpp-server": LlamaCppServerEngine,
}


# Texts on which a tokenizer here must give the engine's ids (with and without special tokens)
# and texts: spaces, newlines, code, digits, accents, CJK, emoji, special tokens written out.
_TOKENIZER_PROBES = [
    "",
    "a",
    " The capital of France is Paris.",
    "Hello,  world!\n\n\tdef f(x):\n        return x ** 2  # 12345 67.8",
    "naïve café, Übermaß, 東京タワー, 🙂🚀, ‘quotes’ — dash",
    "<|im_start|>user\nhi<|im_end|><|endoftext|></s><s><eos><end_of_turn>",
    "Question: Who wrote Hamlet?\nAnswer: William Shakespeare\n\nQuestion:",
]


def engine_for(kind: str, url: str, **kwargs) -> Engine:
    try:
        cls = ENGINES[kind]
    except KeyError:
        raise FuselmError(f"unknown engine {kind!r}; supported: {', '.join(sorted(ENGINES))}") from None
    return cls(url, **kwargs)


# How vLLM writes -inf in JSON, and the value of the placeholders in a mangled top-k (see _top).
_PLACEHOLDER = -9999.0


def _mangled(top: dict[int, float], k: int) -> bool:
    """A top-k that is not one: fewer entries than asked, or placeholders among them."""
    return len(top) < k or any(v <= _PLACEHOLDER for v in top.values())


def _vocab_size(path: Path) -> int | None:
    """The vocabulary's size in a model directory's `config.json` (or its text model's), if said."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError, RecursionError):
        return None
    for part in (config, config.get("text_config") if isinstance(config, dict) else None):
        size = part.get("vocab_size") if isinstance(part, dict) else None
        if isinstance(size, int) and not isinstance(size, bool) and size > 0:
            return size
    return None


# --- what engines answer, validated (Engine._parse) ------------------------------------------------
# Token ids are checked against the engine's vocabulary bound (`max_id` in the validation context).
_ID_KEY = re.compile(r"token_id:(-?[0-9]{1,18})", re.ASCII)
_PLAIN_ID = re.compile(r"-?[0-9]{1,18}", re.ASCII)


def _check_id(v: int, info: ValidationInfo) -> int:
    limit = (info.context or {}).get("max_id", MAX_TOKEN_ID)
    if not 0 <= v < limit:
        raise ValueError(f"token id {v} is outside the vocabulary (0 to {limit - 1})")
    return v


def _id_key(v: Any) -> Any:
    """A log-prob key of `return_tokens_as_token_ids` ("token_id:7042")."""
    m = _ID_KEY.fullmatch(v) if isinstance(v, str) else None
    if m is None:
        raise ValueError("expected a token id key (token_id:N)")
    return int(m.group(1))


def _plain_id(v: Any) -> Any:
    """A token id written as a JSON object's key ("7042")."""
    m = _PLAIN_ID.fullmatch(v) if isinstance(v, str) else None
    if m is None:
        raise ValueError("expected a token id key")
    return int(m.group(0))


def _check_logprob(v: float) -> float:
    if math.isnan(v) or v > LOGPROB_SLACK:
        raise ValueError(f"{v} is not a log-prob")
    return v


def _first_two(v: Any) -> Any:
    """SGLang's [log-prob, token id, text] as (log-prob, token id)."""
    return tuple(v[:2]) if isinstance(v, list) else v


TokenId = Annotated[StrictInt, AfterValidator(_check_id)]
IdKey = Annotated[int, BeforeValidator(_id_key), AfterValidator(_check_id)]
PlainIdKey = Annotated[int, BeforeValidator(_plain_id), AfterValidator(_check_id)]
LogProb = Annotated[float, AfterValidator(_check_logprob)]


class _Answer(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class _ServedModel(_Answer):
    id: StrictStr
    max_model_len: StrictInt | None = None

    @model_validator(mode="after")
    def _positive(self) -> _ServedModel:
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len {self.max_model_len} is not a length")
        return self


class _ModelList(_Answer):
    data: list[_ServedModel]


class _Tokens(_Answer):
    tokens: list[TokenId]
    token_strs: list[StrictStr | None] | None = None


class _VLLMLogprobs(_Answer):
    tokens: list[IdKey] = []
    token_logprobs: list[LogProb] = []
    top_logprobs: list[dict[IdKey, LogProb] | None] = []


class _PromptLogprob(_Answer):
    logprob: LogProb
    rank: StrictInt


class _VLLMChoice(_Answer):
    text: StrictStr | None = None
    logprobs: _VLLMLogprobs | None = None
    finish_reason: StrictStr | None = None
    prompt_logprobs: list[dict[PlainIdKey, _PromptLogprob] | None] | None = None


class _VLLMCompletion(_Answer):
    choices: list[_VLLMChoice]


class _SGLangMeta(_Answer):
    output_token_logprobs: list[Annotated[tuple[LogProb, TokenId], BeforeValidator(_first_two)]]
    output_top_logprobs: list[list[Annotated[tuple[LogProb, TokenId], BeforeValidator(_first_two)]]]
    finish_reason: dict[str, Any] | StrictStr | None = None


class _SGLangChunk(_Answer):
    text: StrictStr | None = None
    meta_info: _SGLangMeta


class _SGLangScoreMeta(_Answer):
    input_token_logprobs: list[Annotated[tuple[LogProb | None, TokenId], BeforeValidator(_first_two)]]


class _SGLangScore(_Answer):
    meta_info: _SGLangScoreMeta


class _TextChoice(_Answer):
    text: StrictStr | None = None
    finish_reason: StrictStr | None = None


class _TextChunk(_Answer):
    choices: list[_TextChoice] = []
