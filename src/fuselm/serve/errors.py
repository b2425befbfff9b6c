"""Errors as data: every refusal of the server is an OpenAI error body, ``{"error": {"message",
"type", "param", "code"}}``, with a 4xx status for anything the request got wrong (400 bad input,
401 key, 404 unknown model, 408 deadline, 413 body too large, 415 not JSON, 429 over capacity
with Retry-After, 499 the client went away); 502 when an engine behind a setup failed; 503
while the models load; 500 only for a fault of fuselm's own, without a traceback. The same body ends a stream as its last event.

`answer_for` is the one mapping of what a request's work raises to its answer, for a whole
response (the exception handlers) and for a stream's last event alike."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..cancel import GenerationCancelled
from ..errors import EngineError, FuselmError
from .config import Limits
from .engine import Overloaded
from .protocol import ErrorDetail, ErrorResponse

log = logging.getLogger("fuselm.serve")


class ServerStopping(Exception):
    """The server is shutting down under a stream."""


class APIError(Exception):
    """A refusal, answered as an OpenAI error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        detail = ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorResponse(error=detail).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    def event(self) -> dict[str, str]:
        """As the last server-sent event of a stream."""
        return {"data": json.dumps(self.body())}


def overloaded(retry_after_s: int) -> APIError:
    return APIError(429, "the server is at capacity; retry later", type="rate_limit_error", code="overloaded",
                    headers={"Retry-After": str(retry_after_s)})  # fmt: skip


def deadline_exceeded(timeout_s: float) -> APIError:
    return APIError(408, f"the request took longer than its deadline of {timeout_s:g} s", type="timeout",
                    code="deadline_exceeded")  # fmt: skip


def cancelled() -> APIError:
    return APIError(499, "the request was cancelled", type="cancelled")


def internal() -> APIError:
    return APIError(500, "internal error in fuselm (see the server log)", type="internal_error")


def shutting_down() -> APIError:
    return APIError(503, "the server is shutting down", type="unavailable", code="shutting_down")


def refusal(e: FuselmError, param: str | None = None) -> APIError:
    """A FuselmError as an answer: an engine behind the setup that failed is the server's fault
    (502), anything else the request's (400)."""
    if isinstance(e, EngineError):  # the engine's address and answer stay in the server's log
        log.warning("engine failure: %s", e)
        expert = str(e).split(": ", 1)[0] if str(e).startswith("expert ") else "an expert"
        return APIError(502, f"{expert}: its engine failed (the server's log says why)", type="engine_error",
                        code="engine_failed")  # fmt: skip
    return APIError(400, str(e), param=param)


def answer_for(e: Exception, limits: Limits) -> APIError:
    """What a request's work raised, as its answer: a refusal as it is; a full queue (429), the
    request's deadline (408: every timeout around a request's work is its deadline), a
    cancelled generation (499), a stopping server (503), a FuselmError (`refusal`); anything
    else is a fault of fuselm's own (500, logged with its traceback, none to the client)."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, Overloaded):
        return overloaded(limits.retry_after_s)
    if isinstance(e, TimeoutError):
        return deadline_exceeded(limits.request_timeout_s)
    if isinstance(e, GenerationCancelled):  # the client went away (or the server is stopping)
        return cancelled()
    if isinstance(e, ServerStopping):
        return shutting_down()
    if isinstance(e, FuselmError):
        return refusal(e)
    log.exception("internal error", exc_info=e)
    return internal()


def install_handlers(app: FastAPI, limits: Limits) -> None:
    """Every exception a route raises becomes an error body."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            return APIError(400, "the request body is not valid JSON", code="invalid_json").response()
        parts = []
        for err in errors[:5]:
            where = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
            parts.append(f"{where}: {err.get('msg')}")
        return APIError(400, "; ".join(parts), param=".".join(loc) or None).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(e.status_code, "invalid_request_error")
        return APIError(e.status_code, str(e.detail), type=kind).response()

    @app.exception_handler(Exception)
    async def _other(request: Request, e: Exception):
        return answer_for(e, limits).response()
