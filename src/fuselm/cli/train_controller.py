"""`fuselm train-controller`: a learned fusion controller for adafuse, fitted on dev rows."""

from __future__ import annotations

import argparse
import json
import sys

from pydantic import ValidationError

from ..config import ModelConfig, validation_message
from ..errors import FuselmError
from .flags import DATA_DIR_HELP, SPECIAL_FIELDS, add_model_flags, add_option_flag, given_models, options, task_list


def add_parser(sub: argparse._SubParsersAction) -> None:
    tc = sub.add_parser("train-controller", help="fit a learned fusion controller for adafuse on dev rows (resumable)")
    tc.add_argument("--task", required=True, help=f"task: {task_list()}")
    tc.add_argument("--model", "--models", dest="models", metavar="NAMES", required=True,
                    help="the ensemble's models, comma-separated, in the order they will run")  # fmt: skip
    tc.add_argument("--data", metavar="FILE", help="dev rows (default: the task's dev file; `test` as for calibrate)")
    tc.add_argument("--offset", type=int, default=0, help="first dev row")
    tc.add_argument("--limit", type=int, default=100, help="dev rows (default 100)")
    add_option_flag(tc, "adafuse option while collecting (use the same when generating)")
    tc.add_argument("--out", required=True, metavar="CONTROLLER.json", help="the controller file to write")
    tc.add_argument("--data-dir", help=DATA_DIR_HELP)
    tc.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_flags(tc, ModelConfig, skip=SPECIAL_FIELDS)


def run(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    from ..eval.tasks import get_task
    from ..fusion.methods import method_options
    from ..training.controller_train import ControllerTrainSpec, train_controller

    console = Console(stderr=True, width=None if sys.stderr.isatty() else 140)
    models = given_models(ns)
    opts = options(ns.option)
    task = get_task(ns.task).name  # a task file: its path, as calibrate records it
    method_options("adafuse", opts)  # a bad option: one line, before any model loads
    try:
        spec = ControllerTrainSpec(task=task, models=models, data=ns.data, offset=ns.offset, limit=ns.limit,
                                   options=opts)  # fmt: skip
    except ValidationError as e:
        raise FuselmError(validation_message(e, "train-controller", flags=True)) from None
    info = train_controller(spec, ns.out, Path(ns.data_dir) if ns.data_dir else None, not ns.no_progress,
                            say=console.print)  # fmt: skip
    table = Table(title=f"choosing the right candidate, {info['held_out_rows']} held-out dev rows")
    table.add_column("rule")
    table.add_column("accuracy")
    for rule, acc in info["held_out_accuracy"].items():
        table.add_row(rule, "n/a" if acc is None else f"{acc:.3f}")
    console.print(table)
    console.print(f"controller saved to {ns.out} (use: fuselm generate --method adafuse --models {ns.models}"
                  f" -O controller={ns.out} ...)")  # fmt: skip
    print(json.dumps(info, ensure_ascii=False))
    return 0
