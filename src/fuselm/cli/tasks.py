"""`fuselm tasks`: the built-in tasks, then those of the given task files."""

from __future__ import annotations

import argparse
import os
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    ts = sub.add_parser("tasks", help="list the built-in tasks and those of task files (see docs/tasks.md)")
    ts.add_argument("files", nargs="*", metavar="FILE.yaml", help="task files (lm-eval task YAML) to read and list")


def run(ns: argparse.Namespace) -> int:
    """A row each, in plain columns."""
    from ..eval.taskfile import load_task_file
    from ..eval.tasks import TASK_DIR, TASKS

    rows = [("name", "task", "type", "data", "metric", "description")]
    for name in TASKS.names():
        t = TASKS.get(name)
        rows.append((t.label, name, t.output_type, t.data_file or "", t.main_metric, t.description))
    for f in ns.files:
        t = load_task_file(f)
        data = os.path.relpath(t.data_file or "")  # under this directory: shorter
        rows.append((t.label, f, t.output_type, t.data_file if data.startswith("..") else data, t.main_metric,
                     t.description))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    # on stderr: the listing itself stays a table to read or parse
    print(
        f"the built-in tasks are the task files NAME.yaml in {TASK_DIR} (copy one to start your own)", file=sys.stderr
    )
    return 0
