"""The HTTP server: an OpenAI-compatible API over fuselm setups (FastAPI, uvicorn, sse-starlette).

Errors are data: every refusal is an OpenAI error body, ``{"error": {"message", "type", "param",
"code"}}``, with a 4xx status for anything the request got wrong (400 bad input, 401 key, 404
unknown model, 408 deadline, 413 body too large, 429 over capacity with Retry-After); 503 while
the models load; 500 only for a fault of fuselm's own, without a traceback.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import ValidationError
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import SEED_MIN, GenerationConfig, validation_message
from ..errors import FuselmError, UnknownNameError
from ..fusion.loop import GenerationCancelled
from ..result import GenerationResult, TextSpan, unique_names
from .config import ServeConfig
from .engine import Engine, Overloaded, ServedSetup, wait_quietly
from .metrics import Metrics
from .playground import PLAYGROUND_HTML
from .protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    Delta,
    ErrorDetail,
    ErrorResponse,
    FuselmInfo,
    FuselmSpans,
    ModelCard,
    ModelList,
    Usage,
    new_id,
    now,
)

log = logging.getLogger("fuselm.serve")

FINISH = {"eos": "stop", "stop": "stop", "stalled": "stop", "length": "length"}


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


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def overloaded(retry_after_s: int) -> APIError:
    return APIError(429, "the server is at capacity; retry later", type="rate_limit_error", code="overloaded",
                    headers={"Retry-After": str(retry_after_s)})  # fmt: skip


class BodyLimit:
    """Refuses request bodies over `limit` bytes (413) before the app reads them."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_large = APIError(413, f"request body over {self.limit} bytes", code="body_too_large")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await error_response(too_large)(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:  # bodies are small (capped): read them whole, then hand them on
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return await error_response(too_large)(scope, receive, send)
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


def create_app(config: ServeConfig, engine: Engine | None = None, load: bool = True) -> FastAPI:
    """The app for `config`. Models load in a thread after startup, so /health answers at once
    and /ready once every setup has answered a first token."""
    engine = engine or Engine(config)
    metrics = Metrics()
    limits = config.limits

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = None
        if load:

            def load_all() -> None:
                try:
                    engine.load()
                    log.info("ready: %s", ", ".join(engine.setups.names()))
                except Exception as e:  # noqa: BLE001 - reported by /ready, the server stays up
                    engine.load_error = str(e) if isinstance(e, FuselmError) else f"{type(e).__name__}: {e}"
                    log.error("loading failed: %s", engine.load_error)

            loader = threading.Thread(target=load_all, name="fuselm-load", daemon=True)
            loader.start()
        yield
        engine.cancel_all.set()  # in-flight generations stop at their next step
        if loader is not None:
            loader.join(timeout=1)
        await asyncio.to_thread(engine.close)

    app = FastAPI(title="fuselm", summary="Fused language models behind the OpenAI API", lifespan=lifespan)
    app.state.engine = engine
    app.state.metrics = metrics

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            return error_response(APIError(400, "the request body is not valid JSON", code="invalid_json"))
        parts = []
        for err in errors[:5]:
            where = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
            parts.append(f"{where}: {err.get('msg')}")
        return error_response(APIError(400, "; ".join(parts), param=".".join(loc) or None))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(e.status_code, "invalid_request_error")
        return error_response(APIError(e.status_code, str(e.detail), type=kind))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log.exception("internal error")
        return error_response(APIError(500, "internal error in fuselm (see the server log)", type="internal_error"))

    def authorize(request: Request) -> None:
        if not config.api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), config.api_key.encode()):
            raise APIError(401, "a valid API key is required: Authorization: Bearer KEY", code="invalid_api_key")

    def require_ready() -> None:
        if engine.load_error:
            raise APIError(503, f"the server failed to load its models: {engine.load_error}", type="unavailable")
        if not engine.ready:
            raise APIError(503, "the models are still loading; see /ready", type="unavailable",
                           headers={"Retry-After": "5"})  # fmt: skip

    # --- endpoints ----------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if engine.load_error:
            return JSONResponse({"status": "failed", "error": engine.load_error}, status_code=503)
        if not engine.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ready", "models": engine.setups.names()}

    @app.get("/metrics")
    async def prometheus() -> Response:
        metrics.models_loaded.set(len(engine.pool.models()))
        metrics.running.set(engine.scheduler.running)
        metrics.queued.set(engine.scheduler.waiting)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/", response_class=HTMLResponse)
    async def playground() -> str:
        return PLAYGROUND_HTML

    @app.get("/v1/models", response_model=ModelList)
    async def models(request: Request) -> ModelList:
        authorize(request)
        return ModelList(data=[card(s) for s in config.setups])

    def card(s) -> ModelCard:
        """A setup's card: its models as the traces name them once loaded (as configured before)."""
        served = engine.setups[s.id] if s.id in engine.setups else None
        names = unique_names([m.name for m in served.models]) if served else [m.name for m in s.models]
        return ModelCard(id=s.id, created=engine.started, method=s.method, models=names)

    @app.post("/v1/completions", response_model=CompletionResponse)
    async def completions(request: Request, body: CompletionRequest):
        return await serve_request(request, body, chat=False)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse)
    async def chat_completions(request: Request, body: ChatCompletionRequest):
        return await serve_request(request, body, chat=True)

    # --- one request ----------------------------------------------------------------------------

    async def serve_request(request: Request, body: CompletionRequest | ChatCompletionRequest, chat: bool):
        endpoint = "chat" if chat else "completions"
        t0 = time.perf_counter()
        try:
            authorize(request)
            require_ready()
            prepared = await prepare(body, chat)
            if body.stream:
                engine.scheduler.admit()  # 429 now, before the stream's 200
                shutdown = anyio.Event()  # set by sse-starlette when the server is stopping
                events = stream(request, body, chat, prepared, t0, shutdown)
                return EventSourceResponse(events, ping=15, shutdown_event=shutdown, shutdown_grace_period=5)
            response = await complete(request, body, chat, prepared)
            metrics.requests.labels(endpoint, body.model, "200").inc()
            metrics.latency.labels(endpoint, body.model).observe(time.perf_counter() - t0)
            return response
        except Overloaded:
            metrics.requests.labels(endpoint, body.model, "429").inc()
            raise overloaded(limits.retry_after_s) from None
        except APIError as e:
            metrics.requests.labels(endpoint, body.model if e.status != 404 else "?", str(e.status)).inc()
            raise

    async def prepare(body: CompletionRequest | ChatCompletionRequest, chat: bool) -> dict[str, Any]:
        try:
            setup = engine.setups.get(body.model)
        except UnknownNameError as e:
            raise APIError(404, str(e), param="model", code="model_not_found") from None
        bad = body.unsupported()
        if bad is not None:
            raise APIError(400, bad[1], param=bad[0], code="unsupported")
        if body.n > limits.max_n:
            raise APIError(400, f"n is {body.n}, at most {limits.max_n} here", param="n")
        gen = generation_for(setup, body)
        if gen.max_new_tokens > limits.max_tokens:
            raise APIError(400, f"max_tokens is {gen.max_new_tokens}, at most {limits.max_tokens} here",
                           param="max_tokens")  # fmt: skip
        prompt = body.conversation() if chat else body.prompt_text()
        where = "messages" if chat else "prompt"
        ext = body.fuselm
        try:
            n_prompt = await asyncio.to_thread(setup.prompt_tokens, prompt, gen)
        except FuselmError as e:
            raise APIError(400, str(e), param=where) from None
        if n_prompt > limits.max_prompt_tokens:
            raise APIError(400, f"the prompt is {n_prompt} tokens, at most {limits.max_prompt_tokens} here",
                           param=where, code="prompt_too_long")  # fmt: skip
        context = setup.context_length()
        if n_prompt + gen.max_new_tokens > context:
            raise APIError(400, f"prompt ({n_prompt} tokens) + max_tokens ({gen.max_new_tokens}) is over the "
                           f"context of {context} tokens", param="max_tokens", code="context_length_exceeded")  # fmt: skip
        method = None  # the setup's own
        if ext is not None and (ext.method is not None or ext.options is not None):
            try:
                method = await asyncio.to_thread(setup.build, ext.method, ext.options)
            except FuselmError as e:
                raise APIError(400, str(e), param="fuselm.method" if ext.method else "fuselm.options") from None
        return {"setup": setup, "gen": gen, "prompt": prompt, "n_prompt": n_prompt, "method": method,
                "trace": bool(ext and ext.trace)}  # fmt: skip

    def generation_for(setup: ServedSetup, body: CompletionRequest | ChatCompletionRequest) -> GenerationConfig:
        """The setup's generation defaults with what the request sets. A completion's prompt is
        raw text (as in the OpenAI API); a chat goes through each model's chat template."""
        update: dict[str, Any] = {"chat": "chat" if isinstance(body, ChatCompletionRequest) else "raw"}
        if body.max_tokens is not None:
            update["max_new_tokens"] = body.max_tokens
        for name in ("temperature", "top_p", "seed"):
            if getattr(body, name) is not None:
                update[name] = getattr(body, name)
        stops = body.stop_list()
        if stops is not None:
            update["stop"] = list(dict.fromkeys([*setup.config.generation.stop, *stops]))
        try:
            return GenerationConfig(**{**setup.config.generation.model_dump(), **update})
        except ValidationError as e:
            raise APIError(400, validation_message(e)) from None

    def seeded(gen: GenerationConfig, i: int) -> GenerationConfig:
        if gen.seed is None or i == 0:
            return gen
        # choice i's own seed, wrapped into the 64-bit range
        return gen.model_copy(update={"seed": (gen.seed + i - SEED_MIN) % 2**64 + SEED_MIN})

    def account(setup: ServedSetup, result: GenerationResult) -> None:
        metrics.generated_tokens.labels(setup.id).inc(result.stats.new_tokens)
        for name, n in result.stats.forward_passes.items():
            metrics.forward_passes.labels(setup.id, name).inc(n)

    def info(result: GenerationResult, wanted: bool) -> FuselmInfo | None:
        if not wanted:
            return None
        return FuselmInfo(method=result.method, models=result.models, stats=result.stats, trace=result.trace)

    async def watch_disconnect(request: Request, cancel: threading.Event) -> None:
        while not cancel.is_set():
            if await request.is_disconnected():
                cancel.set()
                return
            await asyncio.sleep(0.1)

    async def complete(request: Request, body, chat: bool, p: dict[str, Any]):
        setup, gen, cancel = p["setup"], p["gen"], threading.Event()
        results: list[GenerationResult] = []
        watcher = asyncio.create_task(watch_disconnect(request, cancel))
        try:
            async with asyncio.timeout(limits.request_timeout_s):
                async with engine.scheduler.slot():
                    for i in range(body.n):
                        results.append(await run(setup, p, seeded(gen, i), None, cancel))
        except TimeoutError:
            raise APIError(408, f"the request took longer than its deadline of {limits.request_timeout_s:g} s",
                           type="timeout", code="deadline_exceeded") from None  # fmt: skip
        except GenerationCancelled:
            # the client went away (or the server is shutting down): nobody reads this answer
            raise APIError(499, "the request was cancelled", type="cancelled") from None
        except FuselmError as e:
            raise APIError(400, str(e)) from None
        finally:
            watcher.cancel()
            if p["method"] is not None:
                p["method"].close()
        metrics.prompt_tokens.labels(setup.id).inc(p["n_prompt"])
        for r in results:
            account(setup, r)
        completion_tokens = sum(r.stats.new_tokens for r in results)
        usage = Usage(prompt_tokens=p["n_prompt"], completion_tokens=completion_tokens,
                      total_tokens=p["n_prompt"] + completion_tokens)  # fmt: skip
        rid, created = new_id("chatcmpl" if chat else "cmpl"), now()
        if chat:
            choices = [
                ChatChoice(
                    index=i,
                    message=AssistantMessage(content=r.text),
                    finish_reason=FINISH[r.finish_reason],
                    fuselm=info(r, p["trace"]),
                )  # fmt: skip
                for i, r in enumerate(results)
            ]
            return ChatCompletionResponse(id=rid, created=created, model=setup.id, choices=choices, usage=usage)
        choices = [
            CompletionChoice(index=i, text=r.text, finish_reason=FINISH[r.finish_reason], fuselm=info(r, p["trace"]))
            for i, r in enumerate(results)
        ]
        return CompletionResponse(id=rid, created=created, model=setup.id, choices=choices, usage=usage)

    def run(setup: ServedSetup, p: dict[str, Any], gen: GenerationConfig, on_spans, cancel: threading.Event):
        return setup.run(p["method"], p["prompt"], gen, on_spans, cancel, engine.cancel_all)

    async def stream(request: Request, body, chat: bool, p: dict[str, Any], t0: float, shutdown: anyio.Event):
        """The server-sent events of one request: a chunk per committed span, then `[DONE]`. On
        server shutdown the generation stops and the stream ends with an error event."""
        setup, gen, cancel = p["setup"], p["gen"], threading.Event()
        rid, created = new_id("chatcmpl" if chat else "cmpl"), now()
        loop = asyncio.get_running_loop()
        endpoint = "chat" if chat else "completions"
        first_text: float | None = None

        def chunk(i: int, text: str | None = None, finish: str | None = None, role: bool = False, extra=None) -> dict:
            if chat:
                delta = Delta(role="assistant" if role else None, content=text)
                c = ChatCompletionChunk(id=rid, created=created, model=setup.id,
                                        choices=[ChatChunkChoice(index=i, delta=delta, finish_reason=finish,
                                                                 fuselm=extra)])  # fmt: skip
            else:
                c = CompletionResponse(id=rid, created=created, model=setup.id,
                                       choices=[CompletionChoice(index=i, text=text or "", finish_reason=finish,
                                                                 fuselm=extra)])  # fmt: skip
            return {"data": c.model_dump_json(exclude_none=True)}

        def spans_chunk(i: int, spans: list[TextSpan]) -> dict:
            extra = FuselmSpans(spans=spans) if p["trace"] else None
            return chunk(i, text="".join(s.text for s in spans), extra=extra)

        status = "200"
        completion_tokens = 0
        try:
            async with asyncio.timeout(limits.request_timeout_s):
                async with engine.scheduler.slot():
                    for i in range(body.n):
                        queue: asyncio.Queue[list[TextSpan]] = asyncio.Queue()

                        def on_spans(spans: list[TextSpan], queue=queue) -> None:
                            loop.call_soon_threadsafe(queue.put_nowait, spans)

                        if chat:
                            yield chunk(i, role=True, text="")
                        task = asyncio.ensure_future(run(setup, p, seeded(gen, i), on_spans, cancel))
                        stopping = asyncio.ensure_future(shutdown.wait())
                        try:
                            while True:
                                getter = asyncio.ensure_future(queue.get())
                                done, _ = await asyncio.wait(
                                    {getter, task, stopping}, return_when=asyncio.FIRST_COMPLETED
                                )
                                if stopping in done:
                                    getter.cancel()
                                    raise ServerStopping()
                                if getter not in done:
                                    getter.cancel()
                                    break
                                if first_text is None:
                                    first_text = time.perf_counter()
                                    metrics.first_token.labels(setup.id).observe(first_text - t0)
                                yield spans_chunk(i, getter.result())
                            while not queue.empty():  # spans sent just before the end
                                yield spans_chunk(i, queue.get_nowait())
                            result: GenerationResult = task.result()
                        finally:
                            stopping.cancel()
                            if not task.done():
                                cancel.set()
                                await wait_quietly(task)
                        account(setup, result)
                        completion_tokens += result.stats.new_tokens
                        yield chunk(i, finish=FINISH[result.finish_reason], extra=info(result, p["trace"]),
                                    text=None if chat else "")  # fmt: skip
            if body.stream_options is not None and body.stream_options.include_usage:
                usage = Usage(prompt_tokens=p["n_prompt"], completion_tokens=completion_tokens,
                              total_tokens=p["n_prompt"] + completion_tokens)  # fmt: skip
                if chat:
                    last = ChatCompletionChunk(id=rid, created=created, model=setup.id, choices=[], usage=usage)
                else:
                    last = CompletionResponse(id=rid, created=created, model=setup.id, choices=[], usage=usage)
                yield {"data": last.model_dump_json()}
            metrics.prompt_tokens.labels(setup.id).inc(p["n_prompt"])
        except Overloaded:
            status = "429"
            yield _error_event(overloaded(limits.retry_after_s))
        except TimeoutError:
            status = "408"
            yield _error_event(APIError(408, f"the request took longer than its deadline of "
                                        f"{limits.request_timeout_s:g} s", type="timeout", code="deadline_exceeded"))  # fmt: skip
        except ServerStopping:
            status = "503"
            yield _error_event(APIError(503, "the server is shutting down", type="unavailable", code="shutting_down"))
        except (GenerationCancelled, asyncio.CancelledError):
            status = "499"  # the client went away (or the server is stopping): nobody reads the rest
            raise
        except FuselmError as e:
            status = "400"
            yield _error_event(APIError(400, str(e)))
        except Exception:  # a fault of fuselm's own: the stream still ends as a stream
            log.exception("internal error in a stream")
            status = "500"
            yield _error_event(APIError(500, "internal error in fuselm (see the server log)", type="internal_error"))
        finally:
            if p["method"] is not None:
                p["method"].close()
            metrics.requests.labels(endpoint, setup.id, status).inc()
            metrics.latency.labels(endpoint, setup.id).observe(time.perf_counter() - t0)
        yield {"data": "[DONE]"}

    def _error_event(e: APIError) -> dict:
        return {"data": json.dumps(e.body())}

    def openapi() -> dict[str, Any]:
        """The schema, with what this server accepts: its model ids and its limits."""
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            from .._version import __version__

            schema = get_openapi(title=app.title, version=__version__, summary=app.summary, routes=app.routes)
            for name in ("CompletionRequest", "ChatCompletionRequest"):
                props = schema["components"]["schemas"][name]["properties"]
                props["model"]["enum"] = [s.id for s in config.setups]
                for field in ("max_tokens", "max_completion_tokens"):
                    if field in props:
                        _set_maximum(props[field], limits.max_tokens)
                _set_maximum(props["n"], limits.max_n)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)
    return app


def _set_maximum(prop: dict[str, Any], maximum: int) -> None:
    """Put a maximum on an integer property (which pydantic may have written as anyOf [int, null])."""
    for option in prop.get("anyOf", [prop]):
        if option.get("type") == "integer":
            option["maximum"] = maximum
