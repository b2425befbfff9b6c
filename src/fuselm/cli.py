"""The `fuselm` command line. Flags for generation and models are derived from the config models."""

from __future__ import annotations

import argparse
import json
import os
import sys
import typing
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from .config import GenerationConfig, ModelConfig, RunConfig, load_yaml, validation_message
from .errors import FuselmError

# Flags whose CLI spelling differs from a plain --field-name.
_SPECIAL_FIELDS = {"chat", "name", "weight", "trust_remote_code"}


def _add_model_flags(parser: argparse.ArgumentParser, model: type[BaseModel], skip: set[str]) -> None:
    """Add --field-name flags for the fields of a pydantic model (defaults stay in the model)."""
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        ann = field.annotation
        origin = typing.get_origin(ann)
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": field.description}
        if origin is list:
            kwargs.update(action="append", metavar="TEXT")
        elif origin is typing.Literal:
            kwargs.update(choices=typing.get_args(ann))
        elif ann is bool:
            kwargs.update(action="store_true")
        else:
            args = [a for a in typing.get_args(ann) if a is not type(None)] or [ann]
            kwargs.update(type=args[0] if args[0] in (int, float, str) else str)
        parser.add_argument(flag, **kwargs)


def _pick(ns: argparse.Namespace, model: type[BaseModel]) -> dict[str, Any]:
    return {k: getattr(ns, k) for k in model.model_fields if hasattr(ns, k)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fuselm", description="Fuse several language models at inference time.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and library logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    sub.add_parser("models", help="list the bundled models and their state on this machine")

    g = sub.add_parser("generate", help="generate text with one model or an ensemble")
    g.add_argument("prompt", nargs="?", help="the prompt ('-' reads standard input)")
    g.add_argument(
        "--model",
        "--models",
        dest="models",
        metavar="NAMES",
        help="model (or comma-separated models): bundled name, directory or .gguf",
    )
    g.add_argument("--method", default=argparse.SUPPRESS, help="decoding method (default: single)")
    g.add_argument("--config", metavar="FILE.yaml", help="run config; flags override its values")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    g.add_argument("--html", metavar="OUT.html", help="also write the answer as HTML, spans coloured by model")
    g.add_argument(
        "--option",
        "-O",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="method option, e.g. -O theta=0.5 -O max_words=2 (see docs/methods.md)",
    )
    g.add_argument(
        "--chat",
        dest="chat",
        action="store_const",
        const="chat",
        default=argparse.SUPPRESS,
        help="use the chat template (error if the model has none)",
    )
    g.add_argument(
        "--raw",
        dest="chat",
        action="store_const",
        const="raw",
        default=argparse.SUPPRESS,
        help="feed the prompt as raw text",
    )
    g.add_argument(
        "--trust-remote-code",
        dest="trust_remote_code",
        action="store_true",
        default=argparse.SUPPRESS,
        help="allow custom model code from a model directory (off by default)",
    )
    _add_model_flags(g, GenerationConfig, skip=_SPECIAL_FIELDS)
    _add_model_flags(g, ModelConfig, skip=_SPECIAL_FIELDS)
    return parser


def _run_config(ns: argparse.Namespace) -> RunConfig:
    data: dict[str, Any] = load_yaml(ns.config) if ns.config else {}
    gen = dict(data.get("generation") or {})
    gen.update(_pick(ns, GenerationConfig))
    data["generation"] = gen
    model_overrides = _pick(ns, ModelConfig)
    if ns.models:
        names = [n.strip() for n in ns.models.split(",") if n.strip()]
        data["models"] = [{"name": n} for n in names]
    if not data.get("models"):
        raise FuselmError("no model given: use --model NAME (see `fuselm models`) or a --config file")
    data["models"] = [{**({"name": m} if isinstance(m, str) else m), **model_overrides} for m in data["models"]]
    if hasattr(ns, "method"):
        data["method"] = ns.method
    opts = dict(data.get("method_options") or {})
    for item in ns.option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise FuselmError(f"--option expects KEY=VALUE, got {item!r}")
        opts[key.strip().replace("-", "_")] = yaml.safe_load(value)
    data["method_options"] = opts
    try:
        return RunConfig(**data)
    except ValidationError as e:
        raise FuselmError(validation_message(e, ns.config or "options")) from None


def cmd_models(ns: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from .models import assets
    from .models.catalog import BUNDLED

    table = Table(title="bundled models")
    for col in ("name", "arch", "vocab", "chat", "installed", "assembled", "converted", "extra"):
        table.add_column(col)
    yes = lambda b: "[green]yes[/]" if b else "[dim]no[/]"  # noqa: E731
    for m in BUNDLED.values():
        installed = m.installed()
        assembled = assets.assembled_path(m).is_file()
        table.add_row(
            m.name,
            m.architecture,
            f"{m.vocab_size:,}",
            yes(m.chat_template),
            yes(installed),
            yes(assembled),
            yes(assets.is_converted(m.name)),
            m.extra,
        )
    console = Console(width=None if sys.stdout.isatty() else 110)
    console.print(table)
    console.print(f"cache: {assets.cache_dir()} (set FUSELM_CACHE to move it)")
    return 0


def cmd_generate(ns: argparse.Namespace) -> int:
    from .fusion.loop import generate
    from .models.loading import load_model

    prompt = ns.prompt
    if prompt == "-":
        prompt = sys.stdin.read()
    if not prompt:
        raise FuselmError("no prompt given")
    cfg = _run_config(ns)
    models = [load_model(m) for m in cfg.models]
    stream = None if ns.json else _stdout_stream
    result = generate(models, prompt, cfg.method, cfg.generation, cfg.method_options, on_text=stream)
    if ns.html:
        from .viz import render_html

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


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if not ns.command:
        parser.print_help()
        return 2
    if not ns.debug:
        _quiet_libraries()
    else:
        import logging

        logging.basicConfig(level=logging.INFO)
    handlers = {"models": cmd_models, "generate": cmd_generate}
    try:
        return handlers[ns.command](ns)
    except FuselmError as e:
        if ns.debug:
            raise
        print(f"fuselm: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nfuselm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
