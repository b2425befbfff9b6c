"""See the fusion: the answer as HTML, each span coloured by the model whose candidate won."""

from __future__ import annotations

import html
import json

from .result import GenerationResult

PALETTE = ["#cfe8ff", "#ffd9c2", "#d7f5d0", "#f3d4f7", "#fff3b0", "#d0f0f0"]


def _tooltip(entry: dict) -> str:
    lines = []
    if "margins" in entry:
        lines.append("margins: " + ", ".join(f"{k} {v:.2f}" for k, v in entry["margins"].items()))
    lines.append("confident round" if entry.get("confident") else "ensemble decision")
    for i, c in enumerate(entry.get("candidates", [])):
        mark = "*" if i == entry.get("winner") else " "
        score = c.get("score", c.get("p"))
        label = "<eos>" if c.get("eos") else json.dumps(c["text"], ensure_ascii=False)
        by = ", ".join(c.get("proposers", []))
        lines.append(f"{mark} {label}  score={score}  by {by}")
    return "\n".join(lines)


def render_html(result: GenerationResult, prompt: str | None = None) -> str:
    colours = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(dict.fromkeys(result.models))}
    spans = []
    shown = 0
    if result.trace and all("text" in t for t in result.trace):
        for entry in result.trace:
            text = entry["text"][: max(0, len(result.text) - shown)]
            if not text:
                continue
            shown += len(text)
            colour = colours.get(entry.get("source", ""), "#eeeeee")
            spans.append(
                f'<span class="s" style="background:{colour}" title="{html.escape(_tooltip(entry))}">'
                f"{html.escape(text)}</span>"
            )
    if shown < len(result.text):
        colour = colours[result.models[0]] if len(result.models) == 1 else "#eeeeee"
        spans.append(f'<span class="s" style="background:{colour}">{html.escape(result.text[shown:])}</span>')
    legend = " ".join(
        f'<span class="s" style="background:{c}">{html.escape(n)} '
        f"{100 * result.stats.get('text_share', {}).get(n, 0):.0f}%</span>"
        for n, c in colours.items()
    )
    st = result.stats
    meta = html.escape(
        f"method {result.method} · {st.get('new_tokens')} tokens · {st.get('seconds')} s · "
        f"finish: {result.finish_reason}"
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
