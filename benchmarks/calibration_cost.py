"""What a calibration cost, against what the rule before the race would have cost on the same
machine, from the calibration's own runs (nothing is decoded again).

    python benchmarks/calibration_cost.py runs/race/default-triviaqa.yaml [more.yaml ...]

For each calibration file (its dev runs in CALIB.runs/ beside it): the seconds every run decoded
(each member alone and each fused setup, on the rows the race took it to), and two references
read off the same rows' recorded times:
- "one block": every setup on the first `--block` rows (default 50), the rule before the race
  (`--limit 50`);
- "before": the README's command before the race, `--limit 50 --controller-rows 100`: one
  block, plus a controller trained on 100 more dev rows and run on the 50 (its training decodes
  plain `adafuse` with traces: 150 rows at plain `adafuse`'s CPU per row here, an estimate);
- "full grid": every setup on all the rows the race reached, what the same budget costs
  without racing.
Each row's CPU seconds as the run recorded them (its wall seconds where it has none: a row
from before CPU times were kept); another job on the machine hardly moves CPU time. A
calibration stopped before its end is shown as far as it got.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fuselm.calibration import load_calibration
from fuselm.eval.calibrate import member_dir, trial_dir
from fuselm.eval.report import RunView, load_run


def seconds(view: RunView, first: int | None = None) -> float:
    """CPU seconds of the rows (wall seconds for a row without CPU time: one from before they
    were kept, or a model on an engine)."""
    rows = view.rows if first is None else view.rows[:first]
    return sum(r.cpu_seconds if r.cpu_seconds is not None else r.seconds for r in rows)


def per_row(view: RunView) -> float:
    return seconds(view) / max(len(view.rows), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("calibrations", nargs="+")
    ap.add_argument("--block", type=int, default=50, help="the one-block rule's rows (default 50)")
    ap.add_argument("--controller-rows", type=int, default=100, help="the rule before: its controller's rows")
    args = ap.parse_args()
    print(
        f"| calibration | dev rows | race CPU-min | one block of {args.block} CPU-min | before: one block + a"
        f" controller on {args.controller_rows} rows, CPU-min | full grid CPU-min | setups out early |"
    )
    print("|---|---|---|---|---|---|---|")
    for path in map(Path, args.calibrations):
        cal = load_calibration(path)
        runs = path.with_suffix(".runs")
        members = [load_run(member_dir(runs, m.name)) for m in cal.members]
        trials = [load_run(trial_dir(runs, t.label, t.models)) for t in cal.tried]
        views = [*members, *trials]
        n = len(cal.dev.ids)
        race = sum(seconds(v) for v in views)
        block = sum(seconds(v, args.block) for v in views)
        full = sum(per_row(v) * n for v in views)  # a setup left early: its rate on the rows it ran
        out = sum(t.dropped is not None for t in cal.tried)
        plain = next((v for t, v in zip(cal.tried, trials) if t.label == "adafuse"), None)
        before = "" if plain is None else f"{(block + per_row(plain) * (args.controller_rows + args.block)) / 60:.1f}"
        print(
            f"| {path.stem} | {n} | {race / 60:.1f} | {block / 60:.1f} | {before} | {full / 60:.1f} |"
            f" {out} of {len(cal.tried)} |"
        )


if __name__ == "__main__":
    main()
