"""See the fusion: the answer as HTML, each span coloured by the model whose candidate won."""

from __future__ import annotations

import html
import json

from .fusion.methods import METHODS
from .result import GenerationResult, StepDetail, TraceStep, unique_names

PALETTE = ["#cfe8ff", "#ffd9c2", "#d7f5d0", "#f3d4f7", "#fff3b0", "#d0f0f0"]


def _tooltip(step: TraceStep, detail_type: type[StepDetail] | None) -> str:
    """What decided one step, as lines (whatever the method recorded)."""
    lines = [f"round {step.round} · {step.source or '?'} · {step.new_tokens} token(s)"]
    if step.margins:
        lines.append("margins: " + ", ".join(f"{k} {v:.2f}" for k, v in step.margins.items()))
    if step.confident is not None:
        lines.append("confident round" if step.confident else "ensemble decision")
    if detail_type is not None:  # a method this fuselm knows says how its own fields read
        lines += step.detail_of(detail_type).notes()
    for i, c in enumerate(step.candidates):
        mark = "*" if i == step.winner else " "
        score = c.score if c.score is not None else c.p
        label = "<eos>" if c.eos else json.dumps(c.text, ensure_ascii=False)
        lines.append(f"{mark} {label}  score={score}  by {', '.join(c.proposers)}")
    return "\n".join(lines)


def render_html(result: GenerationResult, prompt: str | None = None) -> str:
    colours = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(unique_names(result.models))}
    spans = []
    shown = 0
    detail_type = METHODS.get(result.method).Detail if result.method in METHODS else None
    for step in result.trace:
        text = step.text[: max(0, len(result.text) - shown)]
        if not text:
            continue
        shown += len(text)
        colour = colours.get(step.source or "", "#eeeeee")
        spans.append(
            f'<span class="s" style="background:{colour}" title="{html.escape(_tooltip(step, detail_type))}">'
            f"{html.escape(text)}</span>"
        )
    if shown < len(result.text):
        colour = colours[result.models[0]] if len(result.models) == 1 else "#eeeeee"
        spans.append(f'<span class="s" style="background:{colour}">{html.escape(result.text[shown:])}</span>')
    legend = " ".join(
        f'<span class="s" style="background:{c}">{html.escape(n)} {100 * result.stats.text_share.get(n, 0):.0f}%</span>'
        for n, c in colours.items()
    )
    st = result.stats
    meta = html.escape(
        f"method {result.method} · {st.new_tokens} tokens · {st.seconds} s · finish: {result.finish_reason}"
    )
    prompt_html = f"<p class='prompt'>{html.escape(prompt)}</p>" if prompt else ""
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>fuselm: {html.escape(result.method)}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 52rem; margin: 2rem auto; line-height: 1.6; }}
.answer {{ white-space: pre-wrap; font-size: 1.05rem; border: 1px solid #ddd; padding: 1rem; border-radius: 6px; }}
.s {{ border-radius: 3px; padding: 0 1px; }}
.prompt {{ color: #555; white-space: pre-wrap; }}
.meta {{ color: #777; font-size: 0.9rem; }}
</style></head><body>
<h2>fuselm · {html.escape(result.method)}</h2>
{prompt_html}
<p class="meta">{legend}</p>
<div class="answer">{"".join(spans)}</div>
<p class="meta">{meta} · hover a span to see its candidates and scores</p>
</body></html>
"""
