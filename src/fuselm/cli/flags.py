"""The flags several commands share, derived from the config models' fields, and how a command's
flags become a run's config (through the library's `resolve.resolve_run_config`)."""

from __future__ import annotations

import argparse
import typing
from typing import Any

import yaml
from pydantic import BaseModel

from ..config import GenerationConfig, ModelConfig, RunConfig
from ..errors import FuselmError
from ..resolve import model_entries, resolve_run_config, with_model_settings

# Flags whose CLI spelling differs from a plain --field-name (or that belong to one model entry:
# a model on an engine is given in --models as ENGINE:URL, see config.parse_model_ref).
SPECIAL_FIELDS = {"chat", "name", "weight", "trust_remote_code", "engine", "url", "model", "api_key_env", "tokenizer"}

MEMO_HELP = (
    "neither read nor keep single-model work in the memo (a greedy `single` generation, a model's scores of"
    " continuations: docs/evaluation.md); on by default"
)
DATA_DIR_HELP = "directory with the benchmark files (default: $FUSELM_DATA, else ./data)"


def add_model_flags(parser: argparse.ArgumentParser, model: type[BaseModel], skip: set[str]) -> None:
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


def picked(ns: argparse.Namespace, model: type[BaseModel]) -> dict[str, Any]:
    """The fields of `model` given as flags."""
    return {k: getattr(ns, k) for k in model.model_fields if hasattr(ns, k)}


def add_run_flags(p: argparse.ArgumentParser, config_help: str = "run config; flags override its values") -> None:
    """Flags shared by `generate`, `eval` and `serve`: models, method, config, and the config fields."""
    p.add_argument(
        "--model",
        "--models",
        dest="models",
        metavar="NAMES",
        help="model (or comma-separated models): bundled name, directory or .gguf",
    )
    p.add_argument(
        "--method",
        default=argparse.SUPPRESS,
        help=f"decoding method (default: single): {method_list()}; a multiple_choice task is scored by single,"
        " product or mixture (docs/tasks.md)",
    )
    p.add_argument("--config", metavar="FILE.yaml", help=config_help)
    add_option_flag(p, "method option, e.g. -O theta=0.5 -O max_words=2 (see docs/methods.md)")
    p.add_argument("--router", metavar="DIR", help="trained router for fusionroute / expert-route (= -O router=DIR)")
    p.add_argument(
        "--calibration",
        metavar="CALIB.yaml",
        help="run the setup a `fuselm calibrate` chose: its models, method and options (-O overrides them)",
    )
    for flag, const, help_text in [
        ("--chat", "chat", "use the chat template (error if the model has none)"),
        ("--raw", "raw", "feed the prompt as raw text"),
    ]:
        p.add_argument(flag, dest="chat", action="store_const", const=const, default=argparse.SUPPRESS, help=help_text)
    p.add_argument(
        "--trust-remote-code",
        dest="trust_remote_code",
        action="store_true",
        default=argparse.SUPPRESS,
        help="allow custom model code from a model directory (off by default)",
    )
    add_model_flags(p, GenerationConfig, skip=SPECIAL_FIELDS)
    add_model_flags(p, ModelConfig, skip=SPECIAL_FIELDS)


def add_option_flag(p: argparse.ArgumentParser, help_text: str) -> None:
    p.add_argument("--option", "-O", action="append", default=[], metavar="KEY=VALUE", help=help_text)


def method_list() -> str:
    from ..fusion.methods import METHODS

    return ", ".join(METHODS.names())


def task_list() -> str:
    from ..eval.tasks import TASKS

    return ", ".join(TASKS.names()) + ", or a task file (lm-eval YAML, docs/tasks.md; descriptions: `fuselm tasks`)"


def options(items: list[str]) -> dict[str, Any]:
    """`--option KEY=VALUE`s (`-O`): each value read as YAML, dashes in a key as underscores."""
    opts: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise FuselmError(f"--option expects KEY=VALUE, got {item!r}")
        opts[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return opts


def given_models(ns: argparse.Namespace) -> list[dict[str, Any]]:
    """`--models A,B` as model entries, with the model flags (--threads, ...) where they fit."""
    settings = picked(ns, ModelConfig)
    return [with_model_settings(m, settings) for m in model_entries(ns.models)]


def run_config(ns: argparse.Namespace, data: dict[str, Any] | None = None, task: str | None = None) -> RunConfig:
    """The run config from a config file (or its contents, `data`) and the flags; with a
    calibration (for `task`, when given), the setup it chose. Checked before any model loads:
    the method (for `task`: that it fits the task)."""
    opts = options(ns.option)
    if getattr(ns, "router", None):
        opts["router"] = ns.router
    cfg = resolve_run_config(
        data if data is not None else ns.config,
        models=model_entries(ns.models) if ns.models else None,
        method=getattr(ns, "method", None),
        options=opts,
        generation=picked(ns, GenerationConfig),
        model_settings=picked(ns, ModelConfig),
        calibration=getattr(ns, "calibration", None),
        task=task,
        where=ns.config or "options",
    )
    if task is not None:
        from ..eval.choice import check_task_method
        from ..eval.tasks import get_task

        check_task_method(get_task(task), cfg.method, len(cfg.models), cfg.method_options)
    else:
        from ..fusion.methods import check_method

        check_method(cfg.method, len(cfg.models), cfg.method_options)
    return cfg


def floats(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise FuselmError(f"{flag} expects numbers separated by commas, got {text!r}") from None
