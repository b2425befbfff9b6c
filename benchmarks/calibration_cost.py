"""What a calibration cost, against what the rule before the race would have cost on the same
machine, from the calibration's own runs (nothing is decoded again).

    python benchmarks/calibration_cost.py runs/race/default-triviaqa.yaml [more.yaml ...]

For each calibration file (its dev runs in CALIB.runs/ beside it): the seconds every run decoded
(each member alone and each fused setup, on the rows the race took it to), and two references
read off the same rows' recorded times:
- "one block": every setup on the first `--block` rows (default 50), the rule before the race
  (`--limit 50`);
- "full grid": every setup on all the rows the race reached, what the same budget costs
  without racing.
The models ran on one thread each, so seconds are CPU-seconds of one core. A calibration
stopped before its end is shown as far as it got.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fuselm.calibration import load_calibration
from fuselm.eval.calibrate import member_dir, trial_dir
from fuselm.eval.report import RunView, load_run


def seconds(view: RunView, first: int | None = None) -> float:
    rows = view.rows if first is None else view.rows[:first]
    return sum(r.seconds for r in rows)


def per_row(view: RunView) -> float:
    return seconds(view) / max(len(view.rows), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("calibrations", nargs="+")
    ap.add_argument("--block", type=int, default=50, help="the one-block rule's rows (default 50)")
    args = ap.parse_args()
    print(
        "| calibration | dev rows | race CPU-min | one block of {0} CPU-min | full grid CPU-min | setups out early |".format(
            args.block
        )
    )
    print("|---|---|---|---|---|---|")
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
        print(
            f"| {path.stem} | {n} | {race / 60:.1f} | {block / 60:.1f} | {full / 60:.1f} | {out} of {len(cal.tried)} |"
        )


if __name__ == "__main__":
    main()
