"""`fuselm generate`: one prompt through one model or an ensemble, streamed or as JSON."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import FuselmError
from .flags import add_run_flags, run_config


def add_parser(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="generate text with one model or an ensemble")
    g.add_argument("prompt", nargs="?", help="the prompt ('-' reads standard input)")
    add_run_flags(g)
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    g.add_argument("--html", metavar="OUT.html", help="also write the answer as HTML, spans coloured by model")


def run(ns: argparse.Namespace) -> int:
    from ..fusion.loop import decode
    from ..fusion.methods import build_method
    from ..models.loading import load_models

    prompt = ns.prompt
    if prompt == "-":
        prompt = sys.stdin.read()
    if not prompt:
        raise FuselmError("no prompt given")
    cfg = run_config(ns)
    models = load_models(cfg.models)
    stream = None if ns.json else _stdout_stream
    method = build_method(cfg.method, models, cfg.method_options)
    try:
        result = decode(method, prompt, cfg.generation, on_text=stream)
    finally:
        method.close()
    if ns.html:
        from ..viz import render_html

        with open(ns.html, "w", encoding="utf-8") as f:
            f.write(render_html(result, prompt))
    if ns.json:
        print(json.dumps(result.to_dict(), ensure_ascii=False))
    else:
        sys.stdout.write("\n")
        sys.stdout.flush()
    return 0


def _stdout_stream(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
