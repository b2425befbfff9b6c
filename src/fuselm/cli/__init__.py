"""The `fuselm` command line: a module per command, each with `add_parser` (its flags) and `run`
(flags -> the library -> what it prints). Flags for generation and models are derived from the
config models (flags.py); a run's config is resolved by the library (`resolve.resolve_run_config`).

A new command: a module here with `add_parser(sub)` and `run(ns) -> int`, listed in COMMANDS."""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import FuselmError
from . import calibrate, generate, lm_eval, models, report, serve, tasks, train_controller, train_router
from . import eval as evaluate

# in the order `fuselm --help` lists them
COMMANDS = {
    "models": models,
    "tasks": tasks,
    "generate": generate,
    "eval": evaluate,
    "serve": serve,
    "calibrate": calibrate,
    "train-router": train_router,
    "train-controller": train_controller,
    "lm-eval": lm_eval,
    "report": report,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fuselm", description="Fuse several language models at inference time.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and library logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS.values():
        command.add_parser(sub)
    return parser


def _quiet_libraries() -> None:
    import warnings

    # peft calls a transformers API deprecated in 5.x: a warning per model load, nothing for users to do
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.modeling_utils")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["lm-eval"]:  # lm-eval parses its own arguments (argparse would take their flags)
        try:
            return lm_eval.run(args[1:])
        except FuselmError as e:
            print(f"fuselm: error: {e}", file=sys.stderr)
            return 1
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
    try:
        return COMMANDS[ns.command].run(ns)
    except FuselmError as e:
        if ns.debug:
            raise
        print(f"fuselm: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nfuselm: interrupted", file=sys.stderr)
        return 130
