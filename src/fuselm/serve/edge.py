"""The edge of the server: what every HTTP request meets before any route (one ASGI middleware).

In this order, each refusal an error body (`serve.errors`):
1. the Host header must name this server (400 otherwise): a keyless server on 127.0.0.1 is not
   reachable from a web page through DNS rebinding (`ServeConfig.hosts`);
2. the API key, for the routes under /v1, from the headers alone (401), before a byte of the
   body is read; a refused request is counted without anything it sent (no model label);
3. a POST body must say `Content-Type: application/json` (415) and be at most
   `limits.max_body_bytes` (413), read up to that and no further;
4. and be strict JSON a route can take whole (400 `invalid_json` otherwise): UTF-8, no NaN or
   Infinity (Python's JSON reader takes them) nor a number that overflows to it (`1e999`), no
   lone UTF-16 surrogate in a string (no text codec takes those); the error names the field.

Public routes (no key): /health, /ready, /metrics (counts by served model ids only), the
playground page at / and the OpenAPI document (`PUBLIC`); every other path needs the key when
one is set (default deny), also under a root path. A POST to a route that takes no body is a
405 before its body is read, and a body's JSON is checked off the event loop.
"""

from __future__ import annotations

import hmac
import json
import math
import re
from typing import Any

import anyio

from .config import ServeConfig
from .errors import APIError
from .metrics import Metrics

# Every path needs the key (when one is set) but these: default deny, whatever routes are added.
PUBLIC = frozenset({"/", "/health", "/ready", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
ENDPOINTS = {"/v1/completions": "completions", "/v1/chat/completions": "chat", "/v1/models": "models"}


def endpoint_label(path: str) -> str:
    """The metrics label of a path: a known endpoint's name, or one fixed label."""
    return ENDPOINTS.get(path.rstrip("/") or "/", "other")


class BadJSON(ValueError):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def _no_constants(name: str) -> Any:
    raise BadJSON(f"{name} is not JSON (numbers must be finite)")


def _check_values(value: Any) -> None:
    """Refuse a lone surrogate in any string (keys included) and a number too large to be finite
    (`1e999`), naming where (iteratively: a deep body costs no recursion)."""
    todo: list[tuple[Any, tuple[str, ...]]] = [(value, ())]
    while todo:
        item, path = todo.pop()
        if isinstance(item, float) and not math.isfinite(item):
            raise BadJSON("a number is too large (numbers must be finite)", ".".join(path) or None)
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    raise BadJSON("a string holds a lone UTF-16 surrogate (not text)", ".".join(path) or None) from None
        elif isinstance(item, dict):
            for k, v in item.items():
                todo.append((k, path))
                todo.append((v, (*path, str(k))))
        elif isinstance(item, list):
            todo.extend((v, (*path, str(i))) for i, v in enumerate(item))


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # the only way JSON spells a surrogate


def strict_json(body: bytes) -> Any:
    """The body's JSON value, or BadJSON. Its values are walked (to name the field) only when
    the text can hold what is refused there: a surrogate escape, a number that overflowed."""
    overflow = False

    def number(text: str) -> float:
        nonlocal overflow
        value = float(text)
        overflow = overflow or not math.isfinite(value)
        return value

    try:
        value = json.loads(body.decode("utf-8"), parse_constant=_no_constants, parse_float=number)
    except BadJSON:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise BadJSON("the request body is not valid JSON") from None
    if overflow or _SURROGATE_ESCAPE.search(body):
        _check_values(value)
    return value


def _route_path(scope) -> str:
    """The path the app routes on: under a root path (a proxy's prefix), the part after it."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root) :] or "/" if root and path.startswith(root) else path


def _host_name(host: str) -> str:
    """The name part of a Host header ("127.0.0.1:8000" -> "127.0.0.1", "[::1]:80" -> "[::1]")."""
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class Edge:
    def __init__(self, app, config: ServeConfig, metrics: Metrics, posts: frozenset[str]):
        """`posts`: the paths of the routes that take a body (a POST anywhere else is refused
        before its body is read)."""
        self.app, self.config, self.metrics, self.posts = app, config, metrics, posts
        self.hosts = {h.lower() for h in config.hosts()} if config.hosts() is not None else None
        self.key = config.api_key.encode() if config.api_key else None
        self.limit = config.limits.max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            body = await self._admit(scope, receive)
        except APIError as e:
            return await e.response()(scope, receive, send)
        if body is None:  # the client went away while sending
            return
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _admit(self, scope, receive) -> bytes | None:
        headers: dict[bytes, bytes] = {}
        for k, v in scope.get("headers") or []:
            headers.setdefault(k.lower(), v)  # the first of a repeated header
        path = _route_path(scope)
        if self.hosts is not None:
            host = headers.get(b"host", b"").decode("latin-1").strip().lower()
            if _host_name(host) not in self.hosts:
                raise APIError(400, "this server does not serve that Host", code="invalid_host")
        if self.key is not None and path not in PUBLIC:
            scheme, _, given = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode("latin-1"), self.key):
                self.metrics.requests.labels(endpoint_label(path), "-", "401").inc()
                raise APIError(401, "a valid API key is required: Authorization: Bearer KEY", code="invalid_api_key")
        post = scope.get("method") == "POST"
        if post and path.rstrip("/") not in self.posts:  # refused before its body is read
            raise APIError(405, "Method Not Allowed", code="method_not_allowed")
        if post:
            media = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
            if media != "application/json":
                raise APIError(415, "the body must be JSON, sent with Content-Type: application/json",
                               code="unsupported_media_type")  # fmt: skip
        too_large = APIError(413, f"request body over {self.limit} bytes", code="body_too_large")
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            raise too_large
        chunks, size, more = [], 0, True
        while more:  # bodies are small (capped): read them whole, then hand them on
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                raise too_large
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        if post and body:
            try:
                await anyio.to_thread.run_sync(strict_json, body)  # not on the event loop: streams go on
            except BadJSON as e:
                raise APIError(400, str(e), param=e.param, code="invalid_json") from None
        return body
