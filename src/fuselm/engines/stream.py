"""A streamed completion, read lazily and bounded: each token within the engine's deadline, each
line in size, and no more tokens than asked plus a few."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx

from ..errors import EngineError
from .transport import Transport

# One streamed line, and more per token the stream may bring (an SGLang chunk repeats everything
# so far; a vLLM chunk holds every token made while the reader was away).
MAX_LINE_BYTES = 1 << 20
LINE_BYTES_PER_TOKEN = 4 << 10
# Tokens a stream may bring beyond the max_tokens it asked for (an end-of-sequence token, an
# engine's empty chunk) before it is cut off as one that never ends.
STREAM_SLACK = 8


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


class EngineStream:
    """A streamed completion, read lazily: tokens arrive as the engine makes them, and closing
    the stream (when fuselm has seen enough) makes the engine abort the request. Bounded (see
    the package docstring): each token within the transport's `timeout_s`, each line in size,
    and at most `max_tokens` + STREAM_SLACK tokens. Each chunk (decoded JSON, not yet checked)
    goes to `on_chunk`, the engine's reader of its protocol, which adds its tokens."""

    def __init__(
        self,
        transport: Transport,
        response: httpx.Response,
        max_tokens: int,
        k: int,
        prompt: list[int],
        path: str,
        on_chunk: Callable[[EngineStream, Any], Awaitable[None]],
    ):
        self.transport = transport
        self.path = path
        self.prompt = prompt  # the token ids it continues
        self.anchor = prompt[-1:]  # the context its first token's text is decoded in
        self.max_tokens = max_tokens
        self.k = k  # the top-k each token comes with
        self.max_line = MAX_LINE_BYTES + LINE_BYTES_PER_TOKEN * max(max_tokens, 1)
        self.limit = max_tokens + STREAM_SLACK  # the most tokens it may bring
        self._on_chunk = on_chunk
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
                    raise self.transport.bad(self.path, f"a streamed line over {self.max_line} bytes")
                if i < 0 and not self._buf:
                    return None
                line = bytes(self._buf[:end])
                del self._buf[: end + 1]
                self._scanned = 0
                try:
                    return line.rstrip(b"\r").decode("utf-8")
                except UnicodeDecodeError:
                    raise self.transport.bad(self.path, "a streamed line that is not UTF-8") from None
            self._scanned = len(self._buf)
            if self._scanned > self.max_line:
                raise self.transport.bad(self.path, f"a streamed line over {self.max_line} bytes")
            try:
                self._buf += await self._raw.__anext__()
            except StopAsyncIteration:
                self._eof = True

    async def read(self, n: int) -> None:
        """Read until at least `n` tokens are in `tokens` or the stream is done."""
        loop = asyncio.get_running_loop()
        timeout = self.transport.timeout_s
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
                await self._on_chunk(self, self.transport.json(data, self.path))
                self.room(0)
                if len(self.tokens) > before:
                    deadline = loop.time() + timeout
        except TimeoutError:
            await self._abort()
            raise EngineError(f"{self.transport.where}: no answer within {timeout:g}s ({self.path})") from None
        except httpx.HTTPError as e:
            await self._abort()
            raise self.transport.error(e, self.path) from None
        except BaseException:
            await self._abort()
            raise

    def room(self, n: int) -> None:
        """An EngineError unless `n` more tokens fit in what the stream may bring."""
        if len(self.tokens) + n > self.limit:
            raise self.transport.bad(self.path, f"a stream of more than {self.limit} tokens ({self.max_tokens} asked)")

    async def _abort(self) -> None:
        try:
            await self.aclose()
        except Exception:  # noqa: BLE001 - closing a broken connection: nothing to give back
            pass

    async def aclose(self) -> None:
        self.done = True
        await self._response.aclose()
