"""What every engine client has, whatever its protocol: a transport, the model's facts asked
once, tokenizing, validated answers, streams. `TokenEngine` (token ids in and out: vLLM,
SGLang) and `TextEngine` (text in and out: llama.cpp's server) build on it."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Awaitable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ValidationError

from ..errors import EngineError
from .answers import MAX_TOKEN_ID, ModelList, ServedModel, Tokens
from .stream import EngineStream
from .transport import Transport

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


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


class Engine:
    """One model on a serving engine: `url` is its base (http://host:port), `model` its model id
    there (default: the only one it serves). `kind` is its name in the registry (`ENGINES`) and
    in a model entry's `engine:`; `offers` what a model on it can do (fuselm.conventions)."""

    kind: ClassVar[str] = "?"
    offers: ClassVar[frozenset[str]] = frozenset()

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
        self.transport = Transport(self.url, self.where, timeout_s, retries, api_key)
        self.model_id = model
        self._tokenizer_spec = tokenizer  # a directory, "engine", or None: the model's directory if here
        self._eos_override = frozenset(eos_token_ids) if eos_token_ids else None
        self._facts: EngineFacts | None = None
        self._facts_lock: asyncio.Lock | None = None
        self._vocab: int | None = None  # the vocabulary's size, where the model's directory is here

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    @property
    def where(self) -> str:
        return f"{self.kind} at {self.url}"

    @property
    def timeout_s(self) -> float:
        return self.transport.timeout_s

    @property
    def requests(self):
        """Requests sent, by path (`Transport.requests`)."""
        return self.transport.requests

    @property
    def request_seconds(self):
        """Seconds until their answers, by path (`Transport.request_seconds`)."""
        return self.transport.request_seconds

    # --- the client's own event loop ---------------------------------------------------------------
    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Start one of this engine's coroutines on its loop; cancelling the future cancels it."""
        return self.transport.submit(coro)

    def run(self, coro: Awaitable[T]) -> T:
        """Run one of this engine's coroutines on its loop and wait for it."""
        return self.transport.run(coro)

    def close(self) -> None:
        """Close its connections and stop its loop (a later call starts them again)."""
        self.transport.close()
        self._facts_lock = None  # an asyncio.Lock belongs to the loop it was first used on

    # --- answers -------------------------------------------------------------------------------------
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
            where = ".".join(str(x) for x in err["loc"]) or "the whole"
            raise self.transport.bad(path, f"an unexpected answer ({where}: {err['msg']})"[:400]) from None

    async def _token_ids(self, path: str, body: dict[str, Any]) -> list[int]:
        """The `tokens` of a tokenizing answer (token ids, checked)."""
        return self._parse(Tokens, await self.transport.request("POST", path, body), path).tokens

    async def _text_of(self, path: str, body: dict[str, Any], key: str) -> str:
        """The text under `key` of an answer."""
        answer = await self.transport.request("POST", path, body)
        if not isinstance(answer, dict) or not isinstance(answer.get(key), str):
            raise self.transport.bad(path, f"an unexpected answer (no text under {key!r})")
        return answer[key]

    # --- what every engine answers -------------------------------------------------------------------
    async def facts(self) -> EngineFacts:
        if self._facts is None:
            self._facts_lock = self._facts_lock or asyncio.Lock()
            async with self._facts_lock:
                if self._facts is None:
                    self._facts = await self._ask_facts()
        return self._facts

    async def _ask_facts(self) -> EngineFacts:
        raise NotImplementedError

    async def _served_model(self) -> ServedModel:
        """The `/v1/models` entry of the model (the entry's `model:`, or the only one served);
        sets `model_id`."""
        listed = self._parse(ModelList, await self.transport.request("GET", "/v1/models"), "/v1/models")
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

    async def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        await self.facts()  # the model id (and, on a token engine, whether a tokenizer here gives its ids)
        return await self._tokenize(text, add_special_tokens)

    async def detokenize(self, ids: Sequence[int]) -> str:
        await self.facts()
        return await self._detokenize(ids)

    async def _tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        raise NotImplementedError

    async def _detokenize(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    # --- streams -------------------------------------------------------------------------------------
    async def _open_stream(
        self, path: str, body: dict[str, Any], max_tokens: int, k: int, prompt: list[int]
    ) -> EngineStream:
        """A stream's answer up to its headers, within `timeout_s` (its tokens: EngineStream)."""
        response = await self.transport.open_stream(path, body)
        return EngineStream(self.transport, response, max_tokens, k, prompt, path, self._stream_chunk)

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
        choices = self._parse(reply, chunk, path).choices  # type: ignore[attr-defined]
        if len(choices) > 1:
            raise self.transport.bad(path, f"a chunk of {len(choices)} choices (1 asked)")
        return choices
