"""What the router did in FusionRoute evaluation runs, against a single-model run on the same rows.

    python research/fusionroute_stats.py runs/results-fr --baseline qwen2.5-coder-1.5b

For every TASK-fusionroute / TASK-expert-route run under the directory with a TASK-BASELINE run
beside it: the share of the output text each expert wrote, how many outputs are identical to
the baseline's, and the rows the method gets right that the baseline gets wrong (gained) and
the reverse (lost), on the task's main metric. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fuselm.eval import runner
from fuselm.eval.tasks import get_task


def read_rows(run: Path) -> dict:
    return {row.id: row for row in runner.read_rows(run / "rows.jsonl")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", type=Path)
    ap.add_argument("--baseline", default="qwen2.5-coder-1.5b")
    a = ap.parse_args()
    print(
        f"| run | rows | text written by each expert | outputs identical to {a.baseline} "
        "| gained | lost |\n|---|---|---|---|---|---|"
    )
    for run in sorted(a.root.glob("*-*route")):
        if not (run / "rows.jsonl").is_file():
            continue
        task = run.name.rsplit("-", 2)[0] if run.name.endswith("expert-route") else run.name.rsplit("-", 1)[0]
        base_dir = a.root / f"{task}-{a.baseline}"
        if not (base_dir / "rows.jsonl").is_file():
            continue
        main_metric = get_task(task).main_metric
        rows, base = read_rows(run), read_rows(base_dir)
        common = sorted(rows.keys() & base.keys())
        if not common:
            continue
        chars: dict[str, float] = {}
        for i in common:
            out_len = len(rows[i].output)
            for name, share in rows[i].text_share.items():
                chars[name] = chars.get(name, 0.0) + share * out_len
        total = sum(chars.values()) or 1.0
        shares = ", ".join(f"{name} {c / total:.1%}" for name, c in chars.items())
        same = sum(rows[i].output == base[i].output for i in common)

        def right(row, metric: str = main_metric) -> bool:
            return bool(row.metrics.get(metric))

        gained = sum(right(rows[i]) and not right(base[i]) for i in common)
        lost = sum(right(base[i]) and not right(rows[i]) for i in common)
        print(f"| {run.name} | {len(common)} | {shares} | {same} of {len(common)} | {gained} | {lost} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
