"""The one decoding loop: prompt -> sessions -> method steps -> committed text -> result."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ..cancel import GenerationCancelled, cancel_scope
from ..config import GenerationConfig
from ..models.expert import Expert
from ..models.prompts import Prompt
from ..result import GenerationResult, GenerationStats, TextSpan, TraceStep, unique_names
from ..sampling import Sampler
from ..text.words import earliest_stop
from .base import FusionMethod, StepContext
from .methods import build_method


def _stop_holdback(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that could be the start of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def _spans(owners: list[tuple[int, str | None]], text: str, start: int, end: int) -> list[TextSpan]:
    """The pieces of `text[start:end]`, each with its source; `owners` holds (end offset, source)
    for every committed piece of `text`, in order."""
    out: list[TextSpan] = []
    begin = 0
    for stop, source in owners:
        lo, hi = max(begin, start), min(stop, end)
        if lo < hi:
            if out and out[-1].source == source:
                out[-1].text += text[lo:hi]
            else:
                out.append(TextSpan(text=text[lo:hi], source=source))
        begin = stop
    return out


def decode(
    method: FusionMethod,
    prompt: Prompt,
    generation: GenerationConfig | None = None,
    on_text: Callable[[str], None] | None = None,
    reference: str | None = None,
    cancel: Callable[[], bool] | None = None,
    on_spans: Callable[[list[TextSpan]], None] | None = None,
) -> GenerationResult:
    """Run a built method for one prompt (a text, or a conversation of role/content messages);
    `on_text` receives committed text as it is decided, and `on_spans` the same text cut into
    pieces by the model that won each (for colouring a stream). `reference` is the prompt's
    reference text, for methods that follow one (oracle-route). `cancel` is asked before every
    step, and before every model call inside a step (:mod:`fuselm.cancel`): when it says yes,
    the generation stops there with :class:`GenerationCancelled`."""
    gen = generation or GenerationConfig()
    models = method.models
    sessions = method.open_sessions([m.prompt_text(prompt, gen) for m in models])
    emit = None
    if on_text is not None or on_spans is not None:

        def emit(generated: str, owners: list[tuple[int, str | None]], start: int, end: int) -> None:
            if on_text is not None:
                on_text(generated[start:end])
            if on_spans is not None:
                on_spans(_spans(owners, generated, start, end))

    try:
        with cancel_scope(cancel):
            return _run(method, sessions, gen, emit, reference, cancel)
    finally:
        for s in sessions:
            s.close()


def _run(method, sessions, gen: GenerationConfig, emit, reference, cancel) -> GenerationResult:
    models = method.models
    names = unique_names([s.name for s in sessions])
    ctx = StepContext(sessions, gen.max_new_tokens, "", 0, gen, Sampler.from_config(gen), reference, pool=method.pool)
    ctx.state = method.start(ctx)
    generated = ""
    owners: list[tuple[int, str | None]] = []  # (end offset in generated, source) per committed piece
    streamed = 0
    new_tokens = 0
    trace: list[TraceStep] = []
    reported: set[int] = set()  # dropped experts already in the trace
    shares = [0] * len(sessions)
    finish = "length"
    t0 = time.perf_counter()
    while new_tokens < gen.max_new_tokens:
        if cancel is not None and cancel():
            raise GenerationCancelled(f"cancelled after {new_tokens} tokens")
        ctx.budget, ctx.generated, ctx.round = gen.max_new_tokens - new_tokens, generated, ctx.round + 1
        step = method.step(ctx)
        new_tokens += step.new_tokens
        text = step.text
        cut = earliest_stop(generated + text, gen.stop, start=len(generated)) if gen.stop else None
        stopped = cut is not None
        if stopped:
            if cut < len(generated):  # the stop began in text committed by earlier steps ("\n" "def" " f")
                generated, text = generated[:cut], ""
            else:
                text = text[: cut - len(generated)]
        detail: dict[str, Any] = dict(step.detail) if step.detail is not None else {}
        source = names[step.source] if step.source is not None else None
        dropped = {names[m]: why for m, why in ctx.dropped.items() if m not in reported}
        reported.update(ctx.dropped)
        trace.append(
            TraceStep(
                round=ctx.round,
                text=step.text,
                source=source,
                new_tokens=step.new_tokens,
                dropped=dropped or None,
                **detail,
            )  # fmt: skip
        )
        if text:
            generated += text
            owners.append((len(generated), source))  # pieces past a later stop cut are never shown
            if step.source is not None:
                shares[step.source] += len(text)
            for s in sessions:
                s.append(text)
        if stopped:
            finish = "stop"
            break
        if step.finished:
            finish = "eos"
            break
        if not step.text and step.new_tokens == 0:
            finish = "stalled"  # a method that proposes nothing would loop forever
            break
        if emit is not None:
            upto = len(generated) - _stop_holdback(generated, gen.stop)
            if upto > streamed:
                emit(generated, owners, streamed, upto)
                streamed = upto
    if emit is not None and len(generated) > streamed:
        emit(generated, owners, streamed, len(generated))
    seconds = time.perf_counter() - t0
    total = sum(shares) or 1
    stats = GenerationStats(
        new_tokens=new_tokens,
        seconds=round(seconds, 4),
        tokens_per_second=round(new_tokens / seconds, 2) if seconds > 0 else None,
        forward_passes={n: s.stats.forward_passes for n, s in zip(names, sessions)},
        tokens_forwarded={n: s.stats.tokens_forwarded for n, s in zip(names, sessions)},
        prompt_tokens={n: s.stats.prompt_tokens for n, s in zip(names, sessions)},
        cached_prompt_tokens={n: s.stats.cached_prompt_tokens for n, s in zip(names, sessions)},
        text_share={n: round(c / total, 4) for n, c in zip(names[: len(models)], shares)},
        rounds=len(trace),
    )
    return GenerationResult(
        text=generated,
        models=[m.name for m in models],
        method=method.name,
        finish_reason=finish,
        stats=stats,
        trace=trace,
    )


def generate(
    models: list[Expert],
    prompt: Prompt,
    method: str = "single",
    generation: GenerationConfig | None = None,
    method_options: dict[str, Any] | None = None,
    on_text: Callable[[str], None] | None = None,
    reference: str | None = None,
) -> GenerationResult:
    """Build `method` over `models` and run it for one prompt (for many prompts, build the method
    once with :func:`fuselm.fusion.methods.build_method` and call :func:`decode`)."""
    built = build_method(method, models, method_options)
    try:
        return decode(built, prompt, generation, on_text, reference)
    finally:
        built.close()
