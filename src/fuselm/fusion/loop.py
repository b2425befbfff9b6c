"""The one decoding loop: prompt -> sessions -> method steps -> committed text -> result."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ..config import GenerationConfig
from ..models.loading import Model, Prompt
from ..result import GenerationResult, GenerationStats, TraceStep, unique_names
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


class GenerationCancelled(Exception):
    """A generation stopped by its caller's `cancel` (a client that went away, a deadline)."""


def decode(
    method: FusionMethod,
    prompt: Prompt,
    generation: GenerationConfig | None = None,
    on_text: Callable[[str], None] | None = None,
    reference: str | None = None,
    cancel: Callable[[], bool] | None = None,
) -> GenerationResult:
    """Run a built method for one prompt (a text, or a conversation of role/content messages);
    `on_text` receives committed text as it is decided. `reference` is the prompt's reference
    text, for methods that follow one (oracle-route). `cancel` is asked before every step: when
    it says yes, the generation stops there with :class:`GenerationCancelled`."""
    gen = generation or GenerationConfig()
    models = method.models
    sessions = method.open_sessions([m.prompt_text(prompt, gen) for m in models])
    try:
        return _run(method, sessions, gen, on_text, reference, cancel)
    finally:
        for s in sessions:
            s.close()


def _run(method, sessions, gen: GenerationConfig, on_text, reference, cancel) -> GenerationResult:
    models = method.models
    names = unique_names([s.name for s in sessions])
    ctx = StepContext(sessions, gen.max_new_tokens, "", 0, gen, Sampler.from_config(gen), reference)
    ctx.state = method.start(ctx)
    generated = ""
    streamed = 0
    new_tokens = 0
    trace: list[TraceStep] = []
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
        trace.append(TraceStep(round=ctx.round, text=step.text, source=source, new_tokens=step.new_tokens, **detail))
        if text:
            generated += text
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
        if on_text is not None:
            upto = len(generated) - _stop_holdback(generated, gen.stop)
            if upto > streamed:
                on_text(generated[streamed:upto])
                streamed = upto
    if on_text is not None and len(generated) > streamed:
        on_text(generated[streamed:])
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
    models: list[Model],
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
