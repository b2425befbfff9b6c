"""One operation on every live expert of a round, all at once, and what a failing expert does.

Sessions whose calls wait on an engine (`Session.calls_wait_on_io`) are I/O: their calls of a
round go out together (each waits on a thread of the method's `ExpertPool`, fusion/pool.py,
while its engine's own loop carries the requests), so a round costs about the slowest expert,
not the sum. Sessions that compute in this process run side by side too
when their models can (`models.backend.side_by_side`: llama.cpp models, which run their passes
on a thread of their own, whose threads together fit on the free cores) and decoding is greedy
(a sampler's draws would come in changing order, and a seed would no longer give one text);
otherwise in turn on the calling thread meanwhile (torch models share one thread pool).

When an engine fails (it died, it timed out, it answered nonsense), the generation ends with
its one-line error, which names the expert; with `on_expert_failure: drop` (and another
expert left), the expert is dropped for the rest of the generation instead, and the step's
trace says so.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar, cast

from ..errors import EngineError, FuselmError
from ..models.backend import side_by_side
from ..models.session import DecodingSession, Session
from .base import StepContext

T = TypeVar("T")


def each(ctx: StepContext, fn: Callable[[int, Session], T], models: list[int] | None = None) -> dict[int, T]:
    """`fn(m, session)` for each live model `m` (or each of `models`); results by model index.
    A dropped expert has no result (and is no longer in `ctx.live`). The calls that run apart
    run on `ctx.pool` (the method's)."""
    todo = ctx.live if models is None else [m for m in models if m not in ctx.dropped]
    apart = [m for m in todo if ctx.sessions[m].calls_wait_on_io]  # on pool threads
    here = [m for m in todo if m not in apart]  # computing in this process: on a backend each
    if ctx.sampler.greedy and side_by_side([cast(DecodingSession, ctx.sessions[m]).backend for m in here]):
        apart += here
    # each call in a copy of this thread's context: it sees the generation's cancel check
    futures: dict[int, Future] = {
        m: ctx.pool.submit(contextvars.copy_context().run, fn, m, ctx.sessions[m]) for m in apart
    }
    out: dict[int, T] = {}
    failed: dict[int, EngineError] = {}
    other: BaseException | None = None
    try:
        for m in todo:
            if m not in futures:
                out[m] = fn(m, ctx.sessions[m])
    finally:  # never leave an engine call running past this round
        for m, f in futures.items():
            try:
                out[m] = f.result()
            except EngineError as e:
                failed[m] = e
            except BaseException as e:  # noqa: BLE001 - raised below, once every call is back
                other = other or e
    if other is not None:
        raise other
    for m, e in failed.items():
        if ctx.generation.on_expert_failure != "drop":
            raise e
        ctx.dropped[m] = str(e)
    if failed and not ctx.live:
        raise FuselmError("every expert failed: " + "; ".join(ctx.dropped.values()))
    return {m: v for m, v in out.items() if m not in ctx.dropped}
