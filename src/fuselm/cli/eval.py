"""`fuselm eval`: a setup (or several methods) on benchmark tasks, each run resumable."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..config import GenerationConfig
from ..errors import FuselmError
from ..files import load_yaml
from .flags import DATA_DIR_HELP, MEMO_HELP, add_run_flags, picked, run_config, task_list


def add_parser(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("eval", help="evaluate a method on benchmark tasks (resumable)")
    e.add_argument("--task", action="append", dest="tasks", metavar="TASK", help=f"task (repeatable): {task_list()}")
    e.add_argument("--list-tasks", action="store_true", help="list the tasks and exit")
    add_run_flags(e)
    e.add_argument("--data", help="local JSONL file for the task, or hub:NAME[:CONFIG]:SPLIT when online")
    e.add_argument("--data-dir", help=DATA_DIR_HELP)
    e.add_argument("--limit", type=int, help="number of rows")
    e.add_argument("--concurrency", type=int, default=1, metavar="N",
                   help="rows in flight at once, for models on engines, which batch them (default 1)")  # fmt: skip
    e.add_argument("--offset", type=int, default=0, help="first row")
    e.add_argument("--out", required=False, help="run directory (several tasks/methods: one subdirectory each)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.add_argument("--no-memo", action="store_true", help=MEMO_HELP)


def run(ns: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..eval.sweep import run_evals, tasks_and_methods
    from ..eval.tasks import TASKS, get_task

    console = Console(stderr=True)
    if ns.list_tasks:
        for name, description in TASKS.describe(lambda t: t.description):
            print(f"{name:14} {description}")
        return 0
    data = load_yaml(ns.config) if ns.config else {}
    tasks, methods = tasks_and_methods(data, ns.tasks, getattr(ns, "method", None), ns.calibration)
    if not ns.out:
        raise FuselmError("give --out DIR for the run (it is resumable: run the same command again to continue)")
    tasks = [get_task(t).name for t in tasks]  # unknown task: fail before loading any model; a file: its path
    setups = []
    for task in tasks:
        for label, method in methods:
            asked = argparse.Namespace(**vars(ns))
            if method is None:
                vars(asked).pop("method", None)  # the calibration chooses it
            else:
                asked.method = method
            setups.append((task, label, run_config(asked, data=data, task=task)))
    summaries = run_evals(
        setups,
        Path(ns.out),
        data=ns.data,
        limit=ns.limit,
        offset=ns.offset,
        seed=getattr(ns, "seed", None),
        calibration=ns.calibration or data.get("calibration"),
        data_dir=Path(ns.data_dir) if ns.data_dir else None,
        explicit_generation=set(picked(ns, GenerationConfig)) | set((data.get("generation") or {}).keys()),
        show_progress=not ns.no_progress,
        concurrency=ns.concurrency,
        memo=not ns.no_memo,
    )
    table = Table(title="evaluation")
    for col in ("task", "method", "models", "n", "metrics", "s/sample"):
        table.add_column(col)
    for s in summaries:
        shown = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} n/a" for k, v in s.metrics.items())
        cost = f"{s.seconds_per_sample:.2f}" if s.seconds_per_sample is not None else "n/a"
        table.add_row(s.task, s.method, s.setup, str(s.n), shown, cost)
    console.print(table)
    dumped = [s.model_dump(mode="json") for s in summaries]
    print(json.dumps(dumped if len(dumped) > 1 else dumped[0], ensure_ascii=False))
    return 0
