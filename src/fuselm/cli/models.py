"""`fuselm models`: the bundled models and their state on this machine."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("models", help="list the bundled models and their state on this machine")


def run(ns: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..models import assets
    from ..models.catalog import BUNDLED

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
