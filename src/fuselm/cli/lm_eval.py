"""`fuselm lm-eval ARGS`: lm-eval's command line, every argument its own, with the `fuselm` model
registered (dispatched before argparse: it would take lm-eval's flags)."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    sub.add_parser(
        "lm-eval",
        help="run lm-evaluation-harness with the `fuselm` model registered: fuselm lm-eval --model fuselm"
        " --model_args config=fuse.yaml --tasks TASK ... (lm-eval's own arguments; docs/tasks.md)",
        add_help=False,
    )


def run(args: list[str]) -> int:
    try:
        from ..eval.harness import run_cli
    except ImportError as e:
        if "lm_eval" not in str(e):
            raise
        print("fuselm: error: lm-evaluation-harness is not installed: pip install 'fuselm[lm-eval]'", file=sys.stderr)
        return 1
    return run_cli(args)
