"""One generation request, from its typed body to its answer: what completions and chat
completions share (their answers differ only in shape: `serving_completion`, `serving_chat`).

A request past the edge is checked without any model work (model id, fields, limits, what its
`fuselm` extension may choose: `serve.bounds`) and refused with a 4xx before it waits; then it
takes a generation slot (`serve.engine`: 429 when the queue is full) under its deadline, and
only then costs model work (tokenizing the prompt, building another method, generating), which
the deadline and a disconnect stop between model calls. Whatever the work raises is answered by
`serve.errors.answer_for`, as a response or as a stream's last event.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from typing import Any, ClassVar

import anyio
from fastapi import Request
from pydantic import BaseModel, ValidationError
from sse_starlette.sse import EventSourceResponse

from ..cancel import GenerationCancelled
from ..config import SEED_MIN, GenerationConfig, validation_message
from ..errors import FuselmError, UnknownNameError
from ..models.prompts import Prompt
from ..result import GenerationResult, TextSpan, unique_names
from .bounds import MethodChoice, OptionRefused
from .engine import RequestMethod, ServedSetup, Slot, wait_quietly
from .errors import APIError, ServerStopping, answer_for, cancelled, deadline_exceeded, refusal
from .protocol import FuselmInfo, FuselmSpans, FuselmStats, GenerationRequest, Usage, new_id, now
from .state import ServerState

FINISH = {"eos": "stop", "stop": "stop", "stalled": "stop", "length": "length"}

MAX_MODEL_ID = 256  # a longer id is refused without "did you mean" over it, nor an echo of it


class Responses:
    """How one endpoint answers one request: its whole response, or its stream's chunks. A
    subclass per endpoint gives the shapes (`serving_completion`, `serving_chat`)."""

    endpoint: ClassVar[str]  # the metrics label
    id_prefix: ClassVar[str]

    def __init__(self, model: str, trace: bool):
        self.id, self.created, self.model, self.trace = new_id(self.id_prefix), now(), model, trace

    def info(self, result: GenerationResult) -> FuselmInfo | None:
        """What `generate --json` shows of a generation, when the request asked for its trace."""
        if not self.trace:
            return None
        return FuselmInfo(method=result.method, models=result.models, stats=FuselmStats.of(result.stats),
                          trace=result.trace)  # fmt: skip

    def response(self, results: list[GenerationResult], usage: Usage) -> BaseModel:
        raise NotImplementedError

    def opening(self, index: int) -> BaseModel | None:
        """The chunk that opens choice `index` of a stream, before any text (None: none)."""
        return None

    def chunk(self, index: int, text: str | None, finish: str | None = None, extra: Any = None) -> BaseModel:
        raise NotImplementedError

    def usage_chunk(self, usage: Usage) -> BaseModel:
        raise NotImplementedError

    def spans_chunk(self, index: int, spans: list[TextSpan]) -> BaseModel:
        extra = FuselmSpans(spans=spans) if self.trace else None
        return self.chunk(index, "".join(s.text for s in spans), extra=extra)

    def finish_chunk(self, index: int, result: GenerationResult) -> BaseModel:
        return self.chunk(index, None, finish=FINISH[result.finish_reason], extra=self.info(result))


@dataclass
class CheckedRequest:
    """A request past its cheap checks, before any model work."""

    request: GenerationRequest
    setup: ServedSetup
    generation: GenerationConfig
    prompt: Prompt
    method: MethodChoice | None  # another method or other options (None: the setup's own)


@dataclass
class PreparedRequest:
    """A request that holds a slot, with its prompt measured and its own method built."""

    checked: CheckedRequest
    n_prompt: int
    method: RequestMethod | None
    slot: Slot
    deadline: float  # on the event loop's clock
    cancel: threading.Event  # set when the client goes away: the generation stops at its next step
    started: float  # time.perf_counter() when the request arrived

    def close(self) -> None:
        """Give back what the request holds (idempotent): its slot and its own method."""
        self.slot.release()
        if self.method is not None:
            method, self.method = self.method, None
            method.close()


class HeldStream(EventSourceResponse):
    """A stream that gives back what its request holds when it ends, also when its generator
    never started (the client left before the first byte)."""

    def __init__(self, *args, prepared: PreparedRequest, **kwargs):
        super().__init__(*args, **kwargs)
        self.prepared = prepared

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.prepared.close()


async def serve_generation(server: ServerState, request: Request, body: GenerationRequest, responses: type[Responses]):
    """The answer to one completion or chat request: a response, or a stream of its chunks."""
    metrics = server.metrics
    label = server.model_label(body.model)
    started = time.perf_counter()
    cancel = threading.Event()
    watcher = asyncio.create_task(watch_disconnect(request, cancel))  # until the answer or stream starts
    try:
        server.require_ready()
        checked = check(server, body)
        prepared = await admit(server, checked, cancel, started)
        answer = responses(checked.setup.id, body.trace)
        if body.stream:
            shutdown = anyio.Event()  # set by sse-starlette when the server is stopping
            events = stream(server, answer, prepared, shutdown)
            return HeldStream(events, ping=15, shutdown_event=shutdown, shutdown_grace_period=5,
                              prepared=prepared)  # fmt: skip
        try:
            response = await complete(server, answer, prepared)
        finally:
            prepared.close()
        metrics.requests.labels(responses.endpoint, label, "200").inc()
        metrics.latency.labels(responses.endpoint, label).observe(time.perf_counter() - started)
        return response
    except Exception as e:  # noqa: BLE001 - every failure is answered, and counted
        error = answer_for(e, server.limits)
        metrics.requests.labels(responses.endpoint, label, str(error.status)).inc()
        raise error from None
    finally:
        watcher.cancel()  # a stream's client is watched by sse-starlette from here on


def check(server: ServerState, body: GenerationRequest) -> CheckedRequest:
    """Everything that needs no model: the model id, the fields, the limits, what the request
    may choose."""
    limits = server.limits
    if len(body.model) > MAX_MODEL_ID:
        raise APIError(404, f"unknown model (an id of over {MAX_MODEL_ID} characters)", param="model",
                       code="model_not_found")  # fmt: skip
    try:
        setup = server.engine.setups.get(body.model)
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
    try:
        gen = body.to_generation_config(setup.config.generation)
    except ValidationError as e:
        raise APIError(400, validation_message(e)) from None
    if gen.max_new_tokens > limits.max_tokens:
        raise APIError(400, f"max_tokens is {gen.max_new_tokens}, at most {limits.max_tokens} here",
                       param="max_tokens")  # fmt: skip
    return CheckedRequest(body, setup, gen, body.prompt_input(), requested_method(server, setup, body))


def requested_method(server: ServerState, setup: ServedSetup, body: GenerationRequest) -> MethodChoice | None:
    """The method and options the request's `fuselm` extension asks for, within the setup's
    bounds (None: the setup's own)."""
    ext = body.fuselm
    if ext is None or (ext.method is None and ext.options is None):
        return None
    try:
        names = unique_names([m.name for m in setup.models])
        return setup.request_method(server.bounds[setup.id].resolve(setup.config, ext.method, ext.options, names))
    except OptionRefused as e:
        raise APIError(400, str(e), param=e.param) from None
    except FuselmError as e:
        raise APIError(400, str(e), param=body.method_param) from None


async def admit(server: ServerState, c: CheckedRequest, cancel: threading.Event, started: float) -> PreparedRequest:
    """A slot (429 when the queue is full), then the request's model work before its first
    token: the prompt measured by every model, its own method built. All within its deadline."""
    limits = server.limits
    deadline = asyncio.get_running_loop().time() + limits.request_timeout_s
    slot = None
    method = None
    try:
        async with asyncio.timeout_at(deadline):
            slot = await server.engine.scheduler.acquire()
            if cancel.is_set():
                raise cancelled()
            n_prompt = await measure(server, c)
            if c.method is not None:
                method = await build(c)
    except TimeoutError:
        if slot is not None:
            slot.release()
        raise deadline_exceeded(limits.request_timeout_s) from None
    except BaseException:
        if slot is not None:
            slot.release()
        raise
    return PreparedRequest(c, n_prompt, method, slot, deadline, cancel, started)


async def build(c: CheckedRequest) -> RequestMethod | None:
    """The request's own method, built in a thread; if the request is cancelled meanwhile
    (deadline, shutdown), the method is closed once built, never left behind."""
    try:
        return await in_thread(c.setup.build, c.method, drop=lambda m: m is not None and m.close())
    except FuselmError as e:
        raise refusal(e, c.request.method_param) from None


async def measure(server: ServerState, c: CheckedRequest) -> int:
    """The prompt's length in tokens (the longest of the models' tokenizations), within limits."""
    limits = server.limits
    where = c.request.prompt_param
    try:
        n_prompt = await in_thread(c.setup.prompt_tokens, c.prompt, c.generation)
    except FuselmError as e:
        raise refusal(e, where) from None
    except Exception as e:  # noqa: BLE001 - a chat template that refuses the conversation
        if not _is_template_error(e):
            raise
        raise APIError(400, f"the conversation does not fit the chat template: {e}", param="messages") from None
    if n_prompt > limits.max_prompt_tokens:
        raise APIError(400, f"the prompt is {n_prompt} tokens, at most {limits.max_prompt_tokens} here",
                       param=where, code="prompt_too_long")  # fmt: skip
    context = c.setup.context_length()
    if n_prompt + c.generation.max_new_tokens > context:
        raise APIError(400, f"prompt ({n_prompt} tokens) + max_tokens ({c.generation.max_new_tokens}) is over the "
                       f"context of {context} tokens", param="max_tokens", code="context_length_exceeded")  # fmt: skip
    return n_prompt


def seeded(gen: GenerationConfig, i: int) -> GenerationConfig:
    if gen.seed is None or i == 0:
        return gen
    # choice i's own seed, wrapped into the 64-bit range
    return gen.model_copy(update={"seed": (gen.seed + i - SEED_MIN) % 2**64 + SEED_MIN})


def account(server: ServerState, setup: ServedSetup, result: GenerationResult) -> None:
    server.metrics.generated_tokens.labels(setup.id).inc(result.stats.new_tokens)
    for name, n in result.stats.forward_passes.items():
        server.metrics.forward_passes.labels(setup.id, name).inc(n)


async def watch_disconnect(request: Request, cancel: threading.Event) -> None:
    while not cancel.is_set():
        if await request.is_disconnected():
            cancel.set()
            return
        await asyncio.sleep(0.1)


def run(server: ServerState, p: PreparedRequest, i: int, on_spans) -> Coroutine[Any, Any, GenerationResult]:
    """Choice `i` of the request, on a free replica of its setup."""
    c = p.checked
    return c.setup.run(p.method, c.prompt, seeded(c.generation, i), on_spans, p.cancel, server.engine.cancel_all)


async def complete(server: ServerState, answer: Responses, p: PreparedRequest) -> BaseModel:
    """The whole response: every choice generated in turn within the deadline."""
    setup = p.checked.setup
    async with asyncio.timeout_at(p.deadline):
        results = [await run(server, p, i, None) for i in range(p.checked.request.n)]
    server.metrics.prompt_tokens.labels(setup.id).inc(p.n_prompt)
    for r in results:
        account(server, setup, r)
    return answer.response(results, Usage.of(p.n_prompt, sum(r.stats.new_tokens for r in results)))


def _event(chunk: BaseModel) -> dict[str, str]:
    return {"data": chunk.model_dump_json(exclude_none=True)}


async def stream(
    server: ServerState, answer: Responses, p: PreparedRequest, shutdown: anyio.Event
) -> AsyncIterator[dict[str, str]]:
    """The server-sent events of one request: a chunk per committed span, then `[DONE]`. On
    server shutdown the generation stops and the stream ends with an error event."""
    request, setup, metrics = p.checked.request, p.checked.setup, server.metrics
    loop = asyncio.get_running_loop()
    first_text: float | None = None
    status = "200"
    completion_tokens = 0
    try:
        async with asyncio.timeout_at(p.deadline):
            for i in range(request.n):
                queue: asyncio.Queue[list[TextSpan]] = asyncio.Queue()

                def on_spans(spans: list[TextSpan], queue=queue) -> None:
                    loop.call_soon_threadsafe(queue.put_nowait, spans)

                opening = answer.opening(i)
                if opening is not None:
                    yield _event(opening)
                task = asyncio.ensure_future(run(server, p, i, on_spans))
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
                            metrics.first_token.labels(setup.id).observe(first_text - p.started)
                        yield _event(answer.spans_chunk(i, getter.result()))
                    while not queue.empty():  # spans sent just before the end
                        yield _event(answer.spans_chunk(i, queue.get_nowait()))
                    result: GenerationResult = task.result()
                finally:
                    stopping.cancel()
                    if not task.done():
                        p.cancel.set()
                        await wait_quietly(task)
                account(server, setup, result)
                completion_tokens += result.stats.new_tokens
                yield _event(answer.finish_chunk(i, result))
        if request.stream_options is not None and request.stream_options.include_usage:
            yield {"data": answer.usage_chunk(Usage.of(p.n_prompt, completion_tokens)).model_dump_json()}
        metrics.prompt_tokens.labels(setup.id).inc(p.n_prompt)
    except (GenerationCancelled, asyncio.CancelledError):
        status = "499"  # the client went away (or the server is stopping): nobody reads the rest
        raise
    except Exception as e:  # noqa: BLE001 - the stream still ends as a stream, with the error
        error = answer_for(e, server.limits)
        status = str(error.status)
        yield error.event()
    finally:
        p.close()
        metrics.requests.labels(answer.endpoint, setup.id, status).inc()
        metrics.latency.labels(answer.endpoint, setup.id).observe(time.perf_counter() - p.started)
    yield {"data": "[DONE]"}


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
