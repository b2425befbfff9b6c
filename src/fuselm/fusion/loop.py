"""The one decoding loop: prompt -> sessions -> method steps -> committed text -> result."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from ..config import GenerationConfig, validation_message
from ..errors import FuselmError
from ..models.loading import Model
from ..models.session import DecodingSession
from ..result import GenerationResult
from ..text.words import earliest_stop
from .base import StepContext
from .registry import get_method


def _stop_holdback(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that could be the start of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def unique_names(names: list[str]) -> list[str]:
    """Model names made unique for per-model stats (a model used twice becomes NAME#2)."""
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}#{seen[n]}")
    return out


def generate(
    models: list[Model],
    prompt: str,
    method: str = "single",
    generation: GenerationConfig | None = None,
    method_options: dict[str, Any] | None = None,
    on_text: Callable[[str], None] | None = None,
) -> GenerationResult:
    """Run `method` over `models` for one prompt; `on_text` receives committed text as it is decided."""
    gen = generation or GenerationConfig()
    cls = get_method(method)
    try:
        options = cls.Options(**(method_options or {}))
    except ValidationError as e:
        raise FuselmError(validation_message(e, f"options of method {method!r}")) from None
    runner = cls(models, gen, options)
    sessions = [DecodingSession(m.backend, m.prompt_text(prompt, gen)) for m in models]
    generated = ""
    streamed = 0
    new_tokens = 0
    trace: list[dict[str, Any]] = []
    shares = [0] * len(models)
    finish = "length"
    t0 = time.perf_counter()
    while new_tokens < gen.max_new_tokens:
        step = runner.step(StepContext(sessions, gen.max_new_tokens - new_tokens, generated))
        new_tokens += step.new_tokens
        text = step.text
        cut = earliest_stop(generated + text, gen.stop, start=len(generated)) if gen.stop else None
        stopped = cut is not None
        if stopped:
            if cut < len(generated):  # the stop began in text committed by earlier steps ("\n" "def" " f")
                generated, text = generated[:cut], ""
            else:
                text = text[: cut - len(generated)]
        if step.trace is not None:
            trace.append(step.trace)
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
    names = unique_names([m.name for m in models])
    stats = {
        "new_tokens": new_tokens,
        "seconds": round(seconds, 4),
        "tokens_per_second": round(new_tokens / seconds, 2) if seconds > 0 else None,
        "forward_passes": {n: s.stats.forward_passes for n, s in zip(names, sessions)},
        "tokens_forwarded": {n: s.stats.tokens_forwarded for n, s in zip(names, sessions)},
        "prompt_tokens": {n: s.stats.prompt_tokens for n, s in zip(names, sessions)},
        "cached_prompt_tokens": {n: s.stats.cached_prompt_tokens for n, s in zip(names, sessions)},
        "text_share": {n: round(c / total, 4) for n, c in zip(names, shares)},
        "rounds": len(trace) if trace else None,
    }
    return GenerationResult(
        text=generated,
        models=[m.name for m in models],
        method=method,
        finish_reason=finish,
        stats=stats,
        trace=trace,
    )
