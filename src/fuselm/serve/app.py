"""The HTTP server: an OpenAI-compatible API over fuselm setups (FastAPI, uvicorn, sse-starlette).

A request meets the edge first (`serve.edge`: Host, API key before the body, content type, size,
strict JSON), then its route: cheap checks (model id, fields, bounds of what it may choose,
`serve.bounds`) answer 4xx before it waits; then it takes a generation slot (`serve.engine`:
429 when the queue is full) under its deadline, and only then costs model work (tokenizing the
prompt, building another method, generating), which the deadline and a disconnect stop between
model calls. Errors are data (`serve.errors`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import ValidationError
from sse_starlette.sse import EventSourceResponse

from ..cancel import GenerationCancelled
from ..config import SEED_MIN, GenerationConfig, validation_message
from ..errors import EngineError, FuselmError, UnknownNameError
from ..result import GenerationResult, TextSpan, unique_names
from .bounds import OptionRefused, RequestBounds
from .config import ServeConfig
from .edge import Edge
from .engine import Engine, Overloaded, RequestMethod, ServedSetup, Slot, wait_quietly
from .errors import APIError, cancelled, deadline_exceeded, install_handlers, overloaded, shutting_down
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
    FuselmInfo,
    FuselmSpans,
    FuselmStats,
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


@dataclass
class Checked:
    """A request past its cheap checks, before any model work."""

    setup: ServedSetup
    gen: GenerationConfig
    prompt: Any  # a text, or a conversation of role/content messages
    where: str  # the prompt's field, for errors
    asked: tuple[str, dict[str, Any]] | None  # another method or other options (None: the setup's own)
    trace: bool
    asked_param: str = "fuselm.options"  # what a refusal of `asked` names: the method, or the options


@dataclass
class Prepared:
    """A request that holds a slot, with its prompt measured and its method built."""

    checked: Checked
    n_prompt: int
    method: RequestMethod | None
    slot: Slot
    deadline: float  # on the event loop's clock

    def close(self) -> None:
        """Give back what the request holds (idempotent): its slot and its own method."""
        self.slot.release()
        if self.method is not None:
            method, self.method = self.method, None
            method.close()


class HeldStream(EventSourceResponse):
    """A stream that gives back what its request holds when it ends, also when its generator
    never started (the client left before the first byte)."""

    def __init__(self, *args, prepared: Prepared, **kwargs):
        super().__init__(*args, **kwargs)
        self.prepared = prepared

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.prepared.close()


def create_app(config: ServeConfig, engine: Engine | None = None, load: bool = True) -> FastAPI:
    """The app for `config`. Models load in a thread after startup, so /health answers at once
    and /ready once every setup has answered a first token."""
    engine = engine or Engine(config)
    metrics = Metrics()
    limits = config.limits
    bounds = {s.id: RequestBounds.of(s, limits) for s in config.setups}
    served_ids = {s.id for s in config.setups}

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
        engine.cancel_all.set()  # in-flight generations stop at their next model call
        if loader is not None:
            loader.join(timeout=1)
        await asyncio.to_thread(engine.close)

    app = FastAPI(title="fuselm", summary="Fused language models behind the OpenAI API", lifespan=lifespan)
    app.state.engine = engine
    app.state.metrics = metrics
    install_handlers(app)

    def require_ready() -> None:
        if engine.load_error:  # what failed (paths, addresses) is in the server's log, not for clients
            raise APIError(503, "the server failed to load its models (its log says why)", type="unavailable")
        if not engine.ready:
            raise APIError(503, "the models are still loading; see /ready", type="unavailable",
                           headers={"Retry-After": "5"})  # fmt: skip

    def model_label(model: str) -> str:
        """A metrics label from a request's model id: only ids this server serves (nothing else a
        client sends is stored)."""
        return model if model in served_ids else "unknown"

    # --- endpoints ----------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if engine.load_error:
            return JSONResponse({"status": "failed"}, status_code=503)
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
    async def models() -> ModelList:
        return ModelList(data=[card(s) for s in config.setups])

    def card(s) -> ModelCard:
        """A setup's card: its models as the traces name them once loaded (as configured before),
        and what a request may choose on it."""
        served = engine.setups[s.id] if s.id in engine.setups else None
        names = unique_names([m.name for m in served.models]) if served else [m.name for m in s.models]
        b = bounds[s.id]
        return ModelCard(id=s.id, created=engine.started, method=s.method, models=names,
                         request_methods=list(b.methods), option_max=b.option_max)  # fmt: skip

    @app.post("/v1/completions", response_model=CompletionResponse)
    async def completions(request: Request, body: CompletionRequest):
        return await serve_request(request, body, chat=False)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse)
    async def chat_completions(request: Request, body: ChatCompletionRequest):
        return await serve_request(request, body, chat=True)

    # --- one request ----------------------------------------------------------------------------

    async def serve_request(request: Request, body: CompletionRequest | ChatCompletionRequest, chat: bool):
        endpoint = "chat" if chat else "completions"
        label = model_label(body.model)
        t0 = time.perf_counter()
        cancel = threading.Event()
        watcher = asyncio.create_task(watch_disconnect(request, cancel))  # until the answer or stream starts
        try:
            require_ready()
            checked = check(body, chat)
            prepared = await admit(checked, cancel)
            if body.stream:
                shutdown = anyio.Event()  # set by sse-starlette when the server is stopping
                events = stream(body, chat, prepared, cancel, t0, shutdown)
                return HeldStream(events, ping=15, shutdown_event=shutdown, shutdown_grace_period=5,
                                  prepared=prepared)  # fmt: skip
            try:
                response = await complete(body, chat, prepared, cancel)
            finally:
                prepared.close()
            metrics.requests.labels(endpoint, label, "200").inc()
            metrics.latency.labels(endpoint, label).observe(time.perf_counter() - t0)
            return response
        except Overloaded:
            metrics.requests.labels(endpoint, label, "429").inc()
            raise overloaded(limits.retry_after_s) from None
        except APIError as e:
            metrics.requests.labels(endpoint, label, str(e.status)).inc()
            raise
        finally:
            watcher.cancel()  # a stream's client is watched by sse-starlette from here on

    def check(body: CompletionRequest | ChatCompletionRequest, chat: bool) -> Checked:
        """Everything that needs no model: the model id, the fields, what the request may choose."""
        if len(body.model) > 256:  # no "did you mean" over a megabyte, no echo of it
            raise APIError(404, "unknown model (an id of over 256 characters)", param="model", code="model_not_found")
        try:
            setup = engine.setups.get(body.model)
        except UnknownNameError as e:
            raise APIError(404, str(e), param="model", code="model_not_found") from None
        bad = body.unsupported()
        if bad is not None:
            raise APIError(400, bad[1], param=bad[0], code="unsupported")
        if body.n > limits.max_n:
            raise APIError(400, f"n is {body.n}, at most {limits.max_n} here", param="n")
        for stop in body.stop_list() or []:
            if len(stop) > limits.max_stop_chars:
                raise APIError(400, f"a stop string is {len(stop)} characters, at most {limits.max_stop_chars} here",
                               param="stop")  # fmt: skip
        gen = generation_for(setup, body)
        if gen.max_new_tokens > limits.max_tokens:
            raise APIError(400, f"max_tokens is {gen.max_new_tokens}, at most {limits.max_tokens} here",
                           param="max_tokens")  # fmt: skip
        ext = body.fuselm
        asked = None
        if ext is not None and (ext.method is not None or ext.options is not None):
            try:
                names = unique_names([m.name for m in setup.models])
                asked = setup.request_method(bounds[setup.id].resolve(setup.config, ext.method, ext.options, names))
            except OptionRefused as e:
                raise APIError(400, str(e), param=e.param) from None
            except FuselmError as e:
                raise APIError(400, str(e), param="fuselm.method" if ext.method else "fuselm.options") from None
        prompt = body.conversation() if chat else body.prompt_text()
        where = "messages" if chat else "prompt"
        param = "fuselm.method" if ext is not None and ext.method else "fuselm.options"
        return Checked(setup, gen, prompt, where, asked, bool(ext and ext.trace), param)

    async def admit(c: Checked, cancel: threading.Event) -> Prepared:
        """A slot (429 when the queue is full), then the request's model work before its first
        token: the prompt measured by every model, its own method built. All within its deadline."""
        deadline = asyncio.get_running_loop().time() + limits.request_timeout_s
        slot = None
        method = None
        try:
            async with asyncio.timeout_at(deadline):
                slot = await engine.scheduler.acquire()
                if cancel.is_set():
                    raise cancelled()
                n_prompt = await measure(c)
                if c.asked is not None:
                    method = await build(c)
        except TimeoutError:
            if slot is not None:
                slot.release()
            raise deadline_exceeded(limits.request_timeout_s) from None
        except BaseException:
            if slot is not None:
                slot.release()
            raise
        return Prepared(c, n_prompt, method, slot, deadline)

    async def build(c: Checked) -> RequestMethod | None:
        """The request's own method, built in a thread; if the request is cancelled meanwhile
        (deadline, shutdown), the method is closed once built, never left behind."""
        try:
            return await in_thread(c.setup.build, c.asked, drop=lambda m: m is not None and m.close())
        except FuselmError as e:
            raise refusal(e, c.asked_param) from None

    async def measure(c: Checked) -> int:
        """The prompt's length in tokens (the longest of the models' tokenizations), within limits."""
        try:
            n_prompt = await in_thread(c.setup.prompt_tokens, c.prompt, c.gen)
        except FuselmError as e:
            raise refusal(e, c.where) from None
        except Exception as e:  # noqa: BLE001 - a chat template that refuses the conversation
            if not _is_template_error(e):
                raise
            raise APIError(400, f"the conversation does not fit the chat template: {e}", param="messages") from None
        if n_prompt > limits.max_prompt_tokens:
            raise APIError(400, f"the prompt is {n_prompt} tokens, at most {limits.max_prompt_tokens} here",
                           param=c.where, code="prompt_too_long")  # fmt: skip
        context = c.setup.context_length()
        if n_prompt + c.gen.max_new_tokens > context:
            raise APIError(400, f"prompt ({n_prompt} tokens) + max_tokens ({c.gen.max_new_tokens}) is over the "
                           f"context of {context} tokens", param="max_tokens", code="context_length_exceeded")  # fmt: skip
        return n_prompt

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
        return FuselmInfo(method=result.method, models=result.models, stats=FuselmStats.of(result.stats),
                          trace=result.trace)  # fmt: skip

    async def watch_disconnect(request: Request, cancel: threading.Event) -> None:
        while not cancel.is_set():
            if await request.is_disconnected():
                cancel.set()
                return
            await asyncio.sleep(0.1)

    def run(p: Prepared, gen: GenerationConfig, on_spans, cancel: threading.Event):
        c = p.checked
        return c.setup.run(p.method, c.prompt, gen, on_spans, cancel, engine.cancel_all)

    async def complete(body, chat: bool, p: Prepared, cancel: threading.Event):
        setup = p.checked.setup
        results: list[GenerationResult] = []
        try:
            async with asyncio.timeout_at(p.deadline):
                for i in range(body.n):
                    results.append(await run(p, seeded(p.checked.gen, i), None, cancel))
        except TimeoutError:
            raise deadline_exceeded(limits.request_timeout_s) from None
        except GenerationCancelled:
            # the client went away (or the server is shutting down): nobody reads this answer
            raise cancelled() from None
        except FuselmError as e:
            raise refusal(e) from None
        metrics.prompt_tokens.labels(setup.id).inc(p.n_prompt)
        for r in results:
            account(setup, r)
        completion_tokens = sum(r.stats.new_tokens for r in results)
        usage = Usage(prompt_tokens=p.n_prompt, completion_tokens=completion_tokens,
                      total_tokens=p.n_prompt + completion_tokens)  # fmt: skip
        rid, created = new_id("chatcmpl" if chat else "cmpl"), now()
        trace = p.checked.trace
        if chat:
            choices = [
                ChatChoice(
                    index=i,
                    message=AssistantMessage(content=r.text),
                    finish_reason=FINISH[r.finish_reason],
                    fuselm=info(r, trace),
                )  # fmt: skip
                for i, r in enumerate(results)
            ]
            return ChatCompletionResponse(id=rid, created=created, model=setup.id, choices=choices, usage=usage)
        choices = [
            CompletionChoice(index=i, text=r.text, finish_reason=FINISH[r.finish_reason], fuselm=info(r, trace))
            for i, r in enumerate(results)
        ]
        return CompletionResponse(id=rid, created=created, model=setup.id, choices=choices, usage=usage)

    async def stream(body, chat: bool, p: Prepared, cancel: threading.Event, t0: float, shutdown: anyio.Event):
        """The server-sent events of one request: a chunk per committed span, then `[DONE]`. On
        server shutdown the generation stops and the stream ends with an error event."""
        setup, gen = p.checked.setup, p.checked.gen
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
            extra = FuselmSpans(spans=spans) if p.checked.trace else None
            return chunk(i, text="".join(s.text for s in spans), extra=extra)

        status = "200"
        completion_tokens = 0
        try:
            async with asyncio.timeout_at(p.deadline):
                for i in range(body.n):
                    queue: asyncio.Queue[list[TextSpan]] = asyncio.Queue()

                    def on_spans(spans: list[TextSpan], queue=queue) -> None:
                        loop.call_soon_threadsafe(queue.put_nowait, spans)

                    if chat:
                        yield chunk(i, role=True, text="")
                    task = asyncio.ensure_future(run(p, seeded(gen, i), on_spans, cancel))
                    stopping = asyncio.ensure_future(shutdown.wait())
                    try:
                        while True:
                            getter = asyncio.ensure_future(queue.get())
                            done, _ = await asyncio.wait({getter, task, stopping}, return_when=asyncio.FIRST_COMPLETED)
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
                    yield chunk(i, finish=FINISH[result.finish_reason], extra=info(result, p.checked.trace),
                                text=None if chat else "")  # fmt: skip
            if body.stream_options is not None and body.stream_options.include_usage:
                usage = Usage(prompt_tokens=p.n_prompt, completion_tokens=completion_tokens,
                              total_tokens=p.n_prompt + completion_tokens)  # fmt: skip
                if chat:
                    last = ChatCompletionChunk(id=rid, created=created, model=setup.id, choices=[], usage=usage)
                else:
                    last = CompletionResponse(id=rid, created=created, model=setup.id, choices=[], usage=usage)
                yield {"data": last.model_dump_json()}
            metrics.prompt_tokens.labels(setup.id).inc(p.n_prompt)
        except TimeoutError:
            status = "408"
            yield deadline_exceeded(limits.request_timeout_s).event()
        except ServerStopping:
            status = "503"
            yield shutting_down().event()
        except (GenerationCancelled, asyncio.CancelledError):
            status = "499"  # the client went away (or the server is stopping): nobody reads the rest
            raise
        except FuselmError as e:
            error = refusal(e)
            status = str(error.status)
            yield error.event()
        except Exception:  # a fault of fuselm's own: the stream still ends as a stream
            log.exception("internal error in a stream")
            status = "500"
            yield APIError(500, "internal error in fuselm (see the server log)", type="internal_error").event()
        finally:
            p.close()
            metrics.requests.labels(endpoint, setup.id, status).inc()
            metrics.latency.labels(endpoint, setup.id).observe(time.perf_counter() - t0)
        yield {"data": "[DONE]"}

    def openapi() -> dict[str, Any]:
        """The schema, with what this server accepts: its model ids, its limits, and what the
        `fuselm` extension may choose (the methods, their options and the bounds per model id)."""
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            from .._version import __version__

            schema = get_openapi(title=app.title, version=__version__, summary=app.summary, routes=app.routes)
            components = schema["components"]["schemas"]
            for name in ("CompletionRequest", "ChatCompletionRequest"):
                props = components[name]["properties"]
                props["model"]["enum"] = [s.id for s in config.setups]
                for field in ("max_tokens", "max_completion_tokens"):
                    if field in props:
                        _set_maximum(props[field], limits.max_tokens)
                _set_maximum(props["n"], limits.max_n)
            if "FuselmExtension" in components:
                _describe_extension(components["FuselmExtension"], bounds)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    app.add_middleware(Edge, config=config, metrics=metrics)
    return app


def refusal(e: FuselmError, param: str | None = None) -> APIError:
    """A FuselmError as an answer: an engine behind the setup that failed is the server's fault
    (502), anything else the request's (400)."""
    if isinstance(e, EngineError):  # the engine's address and answer stay in the server's log
        log.warning("engine failure: %s", e)
        expert = str(e).split(": ", 1)[0] if str(e).startswith("expert ") else "an expert"
        return APIError(502, f"{expert}: its engine failed (the server's log says why)", type="engine_error",
                        code="engine_failed")  # fmt: skip
    return APIError(400, str(e), param=param)


async def in_thread(fn, *args, drop=None):
    """`fn(*args)` in a worker thread. If the awaiting request is cancelled (its deadline, the
    server stopping), this waits until the thread is done before the cancellation goes on, so
    the request's slot is held until then (no more model work at once than slots), and `drop`
    gets a result that nobody will read."""
    future = asyncio.get_running_loop().run_in_executor(None, fn, *args)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await wait_quietly(future)
        if drop is not None and not future.cancelled() and future.exception() is None:
            drop(future.result())
        raise


def _is_template_error(e: Exception) -> bool:
    """A chat template that raised on the conversation (roles that do not alternate, a role it
    does not know): jinja2's errors, raised by the template's own `raise_exception`."""
    return type(e).__module__.startswith("jinja2")


def _set_maximum(prop: dict[str, Any], maximum: int) -> None:
    """Put a maximum on an integer property (which pydantic may have written as anyOf [int, null])."""
    for option in prop.get("anyOf", [prop]):
        if option.get("type") == "integer":
            option["maximum"] = maximum


def _describe_extension(schema: dict[str, Any], bounds: dict[str, RequestBounds]) -> None:
    """The `fuselm` extension as one variant per method a request may name, each with that
    method's options (path options left out: a request cannot name a file; each work option with
    the largest bound of any model id), so that a generated request is a real one; the bounds per
    model id under `x-fuselm-bounds`."""
    from ..fusion.methods import METHODS, PATH_OPTIONS

    methods = sorted({m for b in bounds.values() for m in b.methods})
    top: dict[str, int] = {}
    for b in bounds.values():
        for option, maximum in b.option_max.items():
            top[option] = max(top.get(option, 0), maximum)
    trace = schema["properties"]["trace"]
    variants = []
    for name in methods:
        fields = {
            field: spec
            for field, spec in METHODS.get(name).Options.model_json_schema().get("properties", {}).items()
            if field not in PATH_OPTIONS
        }
        for field, spec in fields.items():
            if field in top:
                _set_maximum(spec, top[field])
        variants.append({
            "type": "object",
            "properties": {
                "method": {"type": "string", "enum": [name]},
                "options": {"type": "object", "properties": fields, "additionalProperties": False},
                "trace": trace,
            },
            "required": ["method"],
            "additionalProperties": False,
        })  # fmt: skip
    variants.append({"type": "object", "properties": {"trace": trace}, "additionalProperties": False})
    description = schema.get("description", "")
    schema.clear()
    schema.update({"description": description, "anyOf": variants})
    schema["x-fuselm-bounds"] = {
        sid: {"methods": list(b.methods), "option_max": b.option_max} for sid, b in bounds.items()
    }
