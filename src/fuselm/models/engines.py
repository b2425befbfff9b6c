"""Clients of serving engines that hold an expert model in another process.

An engine offers top-k log-probs, not full distributions, and keeps its own KV cache (and
prefix cache): fuselm sends token ids, tokenized by the engine itself so that client and server
never disagree about BOS, special tokens or merges, and keeps no model state of its own. What a
method can run on is stated by each engine's `offers` (see `fusion.base.FusionMethod.needs`).

Every call is a coroutine on one event loop thread shared by all engine clients of the process
(:func:`engine_loop`): the calls of one round, of several experts and several branches, go out at
once over keep-alive connections, and the synchronous session code waits on their futures.

Faults: connect and read timeouts (`timeout_s`, each read of a stream included, so a stalled
engine fails within it); retries with backoff for a refused connection, a connection dropped
or reset before an answer, or a 429/502/503/504 (all calls here are reads, safe to repeat), never for a
timeout; everything else is an :class:`EngineError` that names the engine.

Checked against vLLM 0.32.0 (CPU build: `/v1/completions`, `/tokenize`, `/detokenize`,
`/v1/models`), SGLang 0.5.23 (its CPU path: `/generate`, `/tokenize`, `/detokenize`,
`/v1/models`) and llama-cpp-python's server 0.3.36 (`/v1/completions` on text,
`/extras/tokenize`, `/v1/models`; generation only, see LlamaCppServerEngine).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import httpx
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, stop_after_delay, wait_exponential

from ..errors import EngineError, FuselmError
from .backend import OFFERS_ROLLOUT, OFFERS_SCORE, OFFERS_TOPK

log = logging.getLogger("fuselm")

T = TypeVar("T")


class _Transient(Exception):
    """An answer worth asking again for (429, 502, 503, 504)."""

    def __init__(self, response: httpx.Response):
        super().__init__(f"{response.status_code}")
        self.response = response


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

    def run(self, coro: Awaitable[T]) -> T:
        """Run `coro` on the loop and wait for it (from any thread but the loop's own)."""
        if threading.current_thread() is self.thread:
            raise RuntimeError("engine_loop().run called from the engine loop itself")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()  # type: ignore[arg-type]


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
    the stream (when fuselm has seen enough) makes the engine abort the request."""

    def __init__(self, engine: Engine, response: httpx.Response, max_tokens: int, k: int, prompt: list[int]):
        self.engine = engine
        self.prompt = prompt  # the token ids it continues
        self.anchor = prompt[-1:]  # the context its first token's text is decoded in
        self.max_tokens = max_tokens
        self.k = k  # the top-k each token comes with
        self._response = response
        self._lines = response.aiter_lines()
        self.tokens: list[StreamToken] = []
        self.text = ""  # the text of `tokens` (for engines whose chunks carry the text so far)
        self.done = False  # the engine ended it (end of sequence or max_tokens); or closed
        self.finished = False  # ended on end of sequence

    async def read(self, n: int) -> None:
        """Read until at least `n` tokens are in `tokens` or the stream is done."""
        try:
            while not self.done and len(self.tokens) < n:
                line = await self._lines.__anext__()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    await self.aclose()
                    break
                await self.engine._stream_chunk(self, json.loads(data))
        except StopAsyncIteration:
            await self.aclose()
        except httpx.HTTPError as e:
            await self.aclose()
            raise self.engine._error(e) from None

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
            self._http = httpx.AsyncClient(base_url=self.url, timeout=timeout, headers=self._headers, limits=limits)
        return self._http

    def _error(self, e: BaseException, path: str = "") -> EngineError:
        at = f" ({path})" if path else ""
        if isinstance(e, httpx.TimeoutException):
            return EngineError(f"{self.where}: no answer within {self.timeout_s:g}s{at}")
        if isinstance(e, httpx.ConnectError):
            return EngineError(f"{self.where}: cannot connect{at}: {e}")
        if isinstance(e, _Transient):
            r = e.response
            return EngineError(f"{self.where} answered {r.status_code}{at}: {r.text[:200]}")
        if isinstance(e, httpx.HTTPError):
            return EngineError(f"{self.where}: {type(e).__name__}{at}: {str(e) or 'connection lost'}")
        return EngineError(f"{self.where}: {e}")

    def _retrying(self) -> AsyncRetrying:
        return AsyncRetrying(
            stop=stop_after_attempt(self.retries) | stop_after_delay(self.timeout_s),
            wait=wait_exponential(multiplier=0.1, max=2.0),
            retry=retry_if_exception(_retryable),
            reraise=True,
        )

    async def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        t0 = time.perf_counter()
        try:
            async for attempt in self._retrying():
                with attempt:
                    r = await self._client().request(method, path, json=body)
                    if r.status_code in (429, 502, 503, 504):
                        raise _Transient(r)
        except (httpx.HTTPError, _Transient) as e:
            raise self._error(e, path) from None
        finally:
            self.requests[path] += 1
            self.request_seconds[path] += time.perf_counter() - t0
        if r.status_code != 200:
            raise EngineError(f"{self.where} answered {r.status_code} to {path}: {r.text[:300]}")
        try:
            return r.json()
        except ValueError:
            raise EngineError(f"{self.where} answered {path} with something that is not JSON") from None

    async def _open_stream(
        self, path: str, body: dict[str, Any], max_tokens: int, k: int, prompt: list[int]
    ) -> EngineStream:
        client = self._client()
        t0 = time.perf_counter()
        try:
            async for attempt in self._retrying():
                with attempt:
                    r = await client.send(client.build_request("POST", path, json=body), stream=True)
                    if r.status_code in (429, 502, 503, 504):
                        await r.aread()
                        await r.aclose()
                        raise _Transient(r)
        except (httpx.HTTPError, _Transient) as e:
            raise self._error(e, path) from None
        finally:
            self.requests[path + " (stream)"] += 1
            self.request_seconds[path + " (stream)"] += time.perf_counter() - t0
        if r.status_code != 200:
            text = (await r.aread()).decode(errors="replace")
            await r.aclose()
            raise EngineError(f"{self.where} answered {r.status_code} to {path}: {text[:300]}")
        return EngineStream(self, r, max_tokens, k, prompt)

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

    async def _served_model(self) -> dict[str, Any]:
        """The `/v1/models` entry of the model (the entry's `model:`, or the only one served);
        sets `model_id`."""
        listed = await self._request("GET", "/v1/models")
        try:
            served = {m["id"]: m for m in listed["data"]}
        except (KeyError, TypeError):
            raise EngineError(f"{self.where}: /v1/models answered without a model list") from None
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
        return EngineFacts(model, int(entry.get("max_model_len") or 4096), bos, eos, chat)

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
        from .backend import END_OF_TURN_TOKENS

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
        return list((await self._request("POST", "/tokenize", body))["tokens"])

    async def _detokenize(self, ids: Sequence[int]) -> str:
        body = {"model": self.model_id, "tokens": list(ids), **self._detokenize_options}
        return str((await self._request("POST", "/detokenize", body))[self._detokenized_key])

    async def _chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        body = {"model": self.model_id, "messages": messages, "add_generation_prompt": True,
                "add_special_tokens": False}  # fmt: skip
        return list((await self._request("POST", "/tokenize", body))["tokens"])

    async def _push_tokens(
        self, stream: EngineStream, ids: list[int], logprobs: list[float], tops: list[dict[int, float]], text: str
    ) -> None:
        """Add a chunk's tokens to a stream (`text`: the chunk's text, split between them)."""
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

    async def _stream_chunk(self, stream: EngineStream, chunk: dict[str, Any]) -> None:
        raise NotImplementedError

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
        tok = info.get("eos_token")
        tok = tok.get("content") if isinstance(tok, dict) else tok
        return frozenset(await self._single_token(tok)) if isinstance(tok, str) else frozenset()

    async def _single_token(self, text: str) -> list[int]:
        body = {"model": self.model_id, "prompt": text, "add_special_tokens": False, "return_token_strs": True}
        out = await self._request("POST", "/tokenize", body)
        strs = out.get("token_strs") or []
        return list(out["tokens"]) if len(out["tokens"]) == 1 and strs and strs[0] == text else []

    async def stream(self, ids: Sequence[int], max_tokens: int, k: int, sampling: Sampling) -> EngineStream:
        await self.facts()
        k = min(max(k, 1), self.max_top_k)
        body = {"model": self.model_id, "prompt": list(ids), "max_tokens": max_tokens, "stream": True,
                "logprobs": k, "return_tokens_as_token_ids": True, "skip_special_tokens": True,
                **sampling.body()}  # fmt: skip
        return await self._open_stream("/v1/completions", body, max_tokens, k, list(ids))

    async def _stream_chunk(self, stream: EngineStream, chunk: dict[str, Any]) -> None:
        if "error" in chunk:
            raise EngineError(f"{self.where}: {chunk['error'].get('message', chunk['error'])}")
        for choice in chunk.get("choices", []):
            lp = choice.get("logprobs") or {}
            ids = [_token_id(t) for t in lp.get("tokens") or []]
            tops = []
            for i, top in enumerate(lp.get("top_logprobs") or []):
                top = _top_of(top)
                if _mangled(top, stream.k):  # see _top: asked again on its own
                    self.mangled_tops += 1
                    top = await self._top(stream.prompt + [t.token_id for t in stream.tokens] + ids[:i], stream.k)
                tops.append(top)
            await self._push_tokens(stream, ids, lp.get("token_logprobs") or [], tops, choice.get("text") or "")
            if choice.get("finish_reason") is not None:
                await self._end_stream(stream, choice["finish_reason"] == "stop")

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
        choice = (await self._request("POST", "/v1/completions", body))["choices"][0]
        try:
            lp = choice["logprobs"]
            got = _token_id(lp["tokens"][0])
            value = float(lp["token_logprobs"][0])
        except (KeyError, IndexError, TypeError, ValueError):
            raise EngineError(f"{self.where} answered a completion without the log-prob of token {token}") from None
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
            choice = (await self._request("POST", "/v1/completions", body))["choices"][0]
            try:
                top = _top_of(choice["logprobs"]["top_logprobs"][0])
            except (KeyError, IndexError, TypeError):
                raise EngineError(f"{self.where} answered a completion without its top-{k} log-probs") from None
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
        choice = (await self._request("POST", "/v1/completions", body))["choices"][0]
        try:
            last = choice["prompt_logprobs"][-1]
            top = {int(t): float(e["logprob"]) for t, e in last.items() if e["rank"] <= k}
            return float(last[str(seq[-1])]["logprob"]), top
        except (KeyError, IndexError, TypeError, ValueError):
            raise EngineError(f"{self.where} answered prompt_logprobs without the log-probs of {seq[-1]}") from None


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

    async def _stream_chunk(self, stream: EngineStream, chunk: dict[str, Any]) -> None:
        if "error" in chunk:
            error = chunk["error"]
            raise EngineError(f"{self.where}: {error.get('message', error) if isinstance(error, dict) else error}")
        meta = chunk.get("meta_info") or {}
        seen = len(stream.tokens)
        try:  # each chunk carries everything so far: take what is new
            lps = [float(x[0]) for x in meta["output_token_logprobs"][seen:]]
            ids = [int(x[1]) for x in meta["output_token_logprobs"][seen:]]
            tops = [{int(t): float(v) for v, t, *_ in top} for top in meta["output_top_logprobs"][seen:]]
        except (KeyError, TypeError, ValueError, IndexError):
            raise EngineError(f"{self.where} streamed a chunk without its tokens' log-probs") from None
        text = str(chunk.get("text") or "")
        new_text = text[len(stream.text) :] if text.startswith(stream.text) else ""
        stream.text = text
        await self._push_tokens(stream, ids, lps, tops, new_text)
        finish = meta.get("finish_reason")
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
        answers = await self._request("POST", "/generate", body)
        answers = answers if isinstance(answers, list) else [answers]
        for i, answer in zip(todo, answers):
            try:
                got = [float(x[0]) for x in answer["meta_info"]["input_token_logprobs"][1:]]
            except (KeyError, TypeError, ValueError):
                raise EngineError(f"{self.where} answered a score without input log-probs") from None
            if len(got) != len(sequences[i]) - starts[i]:
                raise EngineError(f"{self.where} scored {len(got)} tokens, not {len(sequences[i]) - starts[i]}")
            out[i] = got
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
        out = await self._request("POST", "/extras/tokenize", {"model": self.model_id, "input": text})
        ids = list(out["tokens"])
        if not add_special_tokens and self._facts is not None and self._facts.bos_token_id is not None:
            ids = ids[1:] if ids[:1] == [self._facts.bos_token_id] else ids
        return ids

    async def _detokenize(self, ids: Sequence[int]) -> str:
        out = await self._request("POST", "/extras/detokenize", {"model": self.model_id, "tokens": list(ids)})
        return str(out["text"])

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

    async def _stream_chunk(self, stream: EngineStream, chunk: dict[str, Any]) -> None:
        if "error" in chunk:
            raise EngineError(f"{self.where}: {chunk['error'].get('message', chunk['error'])}")
        for choice in chunk.get("choices", []):
            text = choice.get("text") or ""
            finish = choice.get("finish_reason")
            if text or finish is None:
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


def _top_of(entries: dict[str, float] | None) -> dict[int, float]:
    return {_token_id(key): float(v) for key, v in (entries or {}).items()}


def _mangled(top: dict[int, float], k: int) -> bool:
    """A top-k that is not one: fewer entries than asked, or placeholders among them."""
    return len(top) < k or any(v <= _PLACEHOLDER for v in top.values())


def _token_id(key: str) -> int:
    """A log-prob key of `return_tokens_as_token_ids` ("token_id:7042")."""
    if not key.startswith("token_id:"):
        raise EngineError(f"expected a token id key, got {key!r}")
    return int(key[len("token_id:") :])
