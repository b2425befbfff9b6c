"""What every engine client sends its requests through: one HTTP client (keep-alive, answers
uncompressed), retries inside a deadline, answers read within a size, errors of one line that
name the engine, and the event loop thread the client's coroutines run on, owned by the
transport (started at its first call, stopped by `close`)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
import time
import weakref
from collections import Counter
from collections.abc import Awaitable, Coroutine
from typing import Any, TypeVar

import httpx
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, stop_after_delay, wait_exponential

from ..errors import EngineError

T = TypeVar("T")

# What an engine's answer may be (see the package docstring): a JSON answer's body, and more per
# token for the answers that grow with the tokens asked (prompt log-probs, scores); what is read
# of an error's text.
MAX_REPLY_BYTES = 8 << 20
REPLY_BYTES_PER_TOKEN = 4 << 10
ERROR_BODY_BYTES = 64 << 10


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


class EventLoopThread:
    """An event loop on a daemon thread of its own, started at the first `submit` and stopped
    by `close` (or when its owner is collected); a later `submit` starts a fresh one."""

    def __init__(self, name: str):
        self.name = name
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._finalizer: weakref.finalize | None = None

    def _started(self) -> tuple[asyncio.AbstractEventLoop, threading.Thread]:
        with self._lock:
            if self._loop is None or self._thread is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name=self.name, daemon=True)
                thread.start()
                # an owner dropped without `close` leaves no thread behind
                self._finalizer = weakref.finalize(self, loop.call_soon_threadsafe, loop.stop)
                self._loop, self._thread = loop, thread
            return self._loop, self._thread

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Start `coro` on the loop (from any thread but the loop's own); cancelling the future
        cancels it there."""
        loop, thread = self._started()
        if threading.current_thread() is thread:
            coro.close()
            raise RuntimeError(f"{self.name}: a call waited for from its own event loop")
        return asyncio.run_coroutine_threadsafe(coro, loop)

    def run(self, coro: Awaitable[T]) -> T:
        """Run `coro` on the loop and wait for it (from any thread but the loop's own)."""
        return self.submit(coro).result()  # type: ignore[arg-type]

    @property
    def running(self) -> bool:
        return self._loop is not None

    def close(self) -> None:
        """Cancel what still runs on the loop, stop it and wait for its thread."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return
        if self._finalizer is not None:
            self._finalizer.detach()
        if thread is threading.current_thread():  # closed by a call on the loop: it stops after it
            loop.call_soon(loop.stop)
            return
        asyncio.run_coroutine_threadsafe(_cancel_the_rest(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


async def _cancel_the_rest() -> None:
    rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for t in rest:
        t.cancel()
    await asyncio.gather(*rest, return_exceptions=True)


class Transport:
    """Requests to one engine at `url`; `where` names the engine in every error. Each call as a
    whole (connect, retries with their backoff, headers, body) is bounded by `timeout_s`."""

    def __init__(self, url: str, where: str, timeout_s: float = 60.0, retries: int = 3, api_key: str | None = None):
        self.url = url
        self.where = where
        self.timeout_s = timeout_s
        self.retries = retries
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http: httpx.AsyncClient | None = None
        self.loop = EventLoopThread(f"fuselm-engine {where}")
        # requests sent, and seconds until their answer (a stream: until its headers), by path:
        # what a benchmark reads to see where a round's time goes
        self.requests: Counter[str] = Counter()
        self.request_seconds: Counter[str] = Counter()

    def _client(self) -> httpx.AsyncClient:
        # Made on the transport's loop, lazily: an AsyncClient belongs to the loop it first runs on.
        if self._http is None:
            timeout = httpx.Timeout(self.timeout_s, connect=min(self.timeout_s, 10.0))
            # Idle connections expire before the engines' own keep-alive (uvicorn's 5 s), so fuselm
            # does not reuse one the server is closing at that moment.
            limits = httpx.Limits(max_connections=64, max_keepalive_connections=32, keepalive_expiry=3.0)
            # Uncompressed answers: their size is what is bounded (a compressed one is refused).
            headers = {**self._headers, "Accept-Encoding": "identity"}
            self._http = httpx.AsyncClient(base_url=self.url, timeout=timeout, headers=headers, limits=limits)
        return self._http

    # --- errors of one line ----------------------------------------------------------------------
    def error(self, e: BaseException, path: str = "") -> EngineError:
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

    def bad(self, path: str, what: str) -> EngineError:
        """An answer fuselm cannot use."""
        return EngineError(f"{self.where} answered {path} with {what}")

    def json(self, data: bytes | str, path: str) -> Any:
        try:
            return json.loads(data)
        except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise self.bad(path, "something that is not JSON") from None

    # --- requests --------------------------------------------------------------------------------
    def _retrying(self) -> AsyncRetrying:
        return AsyncRetrying(
            stop=stop_after_attempt(self.retries) | stop_after_delay(self.timeout_s),
            wait=wait_exponential(multiplier=0.1, max=2.0),
            retry=retry_if_exception(_retryable),
            reraise=True,
        )

    def _check_encoding(self, r: httpx.Response, path: str, what: str) -> None:
        encoding = r.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise self.bad(path, f"a {encoding} {what} (asked for an uncompressed one)")

    async def _body(self, r: httpx.Response, path: str, limit: int) -> bytes:
        """The whole body of `r`, read incrementally; an EngineError past `limit` bytes."""
        self._check_encoding(r, path, "body")
        declared = r.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise self.bad(path, f"a reply over {limit} bytes ({declared})")
        body = bytearray()
        async for chunk in r.aiter_raw():
            body += chunk
            if len(body) > limit:
                raise self.bad(path, f"a reply over {limit} bytes")
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

    async def request(
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
            raise self.error(e, path) from None
        finally:
            self.requests[path] += 1
            self.request_seconds[path] += time.perf_counter() - t0
        return self.json(data, path)

    async def open_stream(self, path: str, body: dict[str, Any]) -> httpx.Response:
        """A streamed answer up to its headers, within `timeout_s` (its body unread)."""
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
            raise self.error(e, path) from None
        finally:
            self.requests[path + " (stream)"] += 1
            self.request_seconds[path + " (stream)"] += time.perf_counter() - t0
        try:
            self._check_encoding(r, path, "stream")
        except EngineError:
            await r.aclose()
            raise
        return r

    # --- the loop, and closing ---------------------------------------------------------------------
    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return self.loop.submit(coro)

    def run(self, coro: Awaitable[T]) -> T:
        return self.loop.run(coro)

    async def aclose(self) -> None:
        if self._http is not None:
            http, self._http = self._http, None
            await http.aclose()

    def close(self) -> None:
        """Close the connections and stop the loop (a later call starts both again)."""
        if self.loop.running:
            self.loop.run(self.aclose())
        self.loop.close()
