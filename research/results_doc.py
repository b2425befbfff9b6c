"""Fill the generated parts of docs/results.md from the run directories, keeping the text around them.

    python research/results_doc.py            # runs/results -> docs/results.md and docs/results.png
    python research/results_doc.py --check    # exit 1 when the doc does not match the runs

Generated blocks sit between ``<!-- generated: NAME -->`` and ``<!-- /generated -->``:

* ``overview``: each setup's main metric per task;
* ``commands``: the ``fuselm eval`` command of every run shown (from research/results_matrix.py,
  with the router each FusionRoute run recorded);
* ``tables``: one table per task, every metric with its 95% bootstrap interval, and the main
  metric's paired difference against each Qwen model alone (``fuselm report --baseline``).

The reading (what the numbers say) is written by hand between the blocks; rerun this script after
more rows land and re-read it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from matrix_setups import METHODS, TASKS, jobs  # noqa: E402  (this folder)

from fuselm.eval.report import by_task, load_run, markdown_table, overview, plot_quality_cost, report_rows  # noqa: E402

BASELINES = ["qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]  # the better member of each ensemble
BLOCK = re.compile(r"(<!-- generated: (\w+) -->\n)(.*?)(<!-- /generated -->)", re.S)


def run_dirs(root: Path) -> list[Path]:
    """Every run directory with rows, in the matrix's order (task, then method)."""
    order = [f"{t}-{m}" for t in TASKS for m in METHODS]
    found = {d.name: d for d in root.iterdir() if d.is_dir() and (d / "rows.jsonl").is_file()}
    return [found[name] for name in order if name in found]


def commands(runs: list[Path], root: Path) -> str:
    lines = []
    for run in runs:
        task, method = next((t, m) for t in TASKS for m in METHODS if run.name == f"{t}-{m}")
        router = json.loads((run / "config.json").read_text())["spec"]["method_options"].get("router")
        for _name, args, _ in jobs(root, [task], [method], **({"router": router} if router else {})):
            lines.append(" ".join(args))
    return "```bash\n" + "\n".join(lines) + "\n```\n"


def blocks(root: Path, plot: Path | None) -> dict[str, str]:
    dirs = run_dirs(root)
    runs = [load_run(d) for d in dirs]
    rows = report_rows(runs, BASELINES)
    tables = by_task(rows)
    if plot is not None:
        plot_quality_cost(runs, plot)
    return {
        "overview": markdown_table(*overview(rows)) + "\n",
        "commands": commands(dirs, root.resolve().relative_to(ROOT) if root.resolve().is_relative_to(ROOT) else root),
        "tables": "\n".join(f"## {task}\n\n{markdown_table(*table)}\n" for task, table in tables.items()),
    }


def fill(doc: str, new: dict[str, str]) -> str:
    missing = set(new) - {m.group(2) for m in BLOCK.finditer(doc)}
    if missing:
        raise SystemExit(f"docs/results.md has no block for {sorted(missing)} (<!-- generated: NAME -->)")
    return BLOCK.sub(lambda m: m.group(1) + new[m.group(2)] + m.group(4), doc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=ROOT / "runs/results", help="the run directories")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs/results.md")
    ap.add_argument("--plot", type=Path, default=ROOT / "docs/results.png")
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 when out of date")
    ns = ap.parse_args()
    doc = ns.doc.read_text(encoding="utf-8")
    updated = fill(doc, blocks(ns.root, None if ns.check else ns.plot))
    if ns.check:
        print("up to date" if updated == doc else f"{ns.doc} is out of date: python research/results_doc.py")
        return 0 if updated == doc else 1
    ns.doc.write_text(updated, encoding="utf-8")
    print(f"wrote {ns.doc} and {ns.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
