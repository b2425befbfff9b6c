"""`fuselm report`: evaluation runs compared, as tables, Markdown and a PNG."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("report", help="compare evaluation runs: table, Markdown, PNG")
    r.add_argument("runs", nargs="+", help="run directories")
    r.add_argument("--md", metavar="OUT.md", help="also write the table as Markdown")
    r.add_argument("--plot", metavar="OUT.png", help="also plot quality against cost")
    r.add_argument(
        "--baseline",
        metavar="NAME[,NAME]",
        help="add each run's main metric minus a baseline run's on the same task, with a 95%% paired"
        " bootstrap interval (same resampled rows for both); NAME is a model (its single-model run)"
        " or a method (e.g. token-average)",
    )


def run(ns: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..eval.report import by_task, load_run, overview, plot_quality_cost, report_rows, to_markdown

    runs = [load_run(p) for p in ns.runs]
    rows = report_rows(runs, [b for b in (ns.baseline or "").split(",") if b])
    console = Console(width=None if sys.stdout.isatty() else 160)
    tables = list(by_task(rows).items())
    if len(tables) > 1:
        tables.insert(0, ("main metric by task (* = partial run)", overview(rows)))
    for task, (header, body) in tables:
        table = Table(title=task)
        for col in header:
            table.add_column(col)
        for line in body:
            table.add_row(*line)
        console.print(table)
    if ns.md:
        with open(ns.md, "w", encoding="utf-8") as f:
            f.write(to_markdown(rows))
    if ns.plot:
        plot_quality_cost(runs, ns.plot)
    return 0
