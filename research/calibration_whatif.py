"""What other choice rules would have done with the calibrations of the never-worse matrix, read
from their files and dev runs (nothing decodes): which tried setups pass `--significant` (paired
interval above 0), which member each anchor rule picks (`--anchor-by score` and `nll`, the
default since 2026-12-06), and what the calibration chooses with and without `--max-loss`
(default 0.1 since 2026-12-06).

    python research/calibration_whatif.py [--root runs/never-worse]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fuselm.calibration import load_calibration
from fuselm.eval.calibrate import choose, choose_anchor, rank_members, trial_dir
from fuselm.eval.report import load_run
from fuselm.eval.tasks import get_task


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="runs/never-worse")
    ap.add_argument("--max-loss", type=float, default=0.1)
    ns = ap.parse_args()
    for path in sorted(Path(ns.root).glob("*/*/calib.yaml")):
        cal = load_calibration(path)
        task = get_task(cal.task)
        significant = [t.label for t in cal.tried if t.versus_best and t.versus_best[1] > 0]
        runs = {r.summary.models[0]: r for d in path.with_suffix(".runs").glob("single_*") if (r := load_run(d))}
        alone = {m.name: runs[m.name] for m in cal.scores if m.name in runs}
        nll = {m.name: m.nll for m in cal.scores}
        rules = {by: choose_anchor(task, rank_members(task, alone, nll), alone, nll, by)[0] for by in ("score", "nll")}
        where = f"{path.parent.parent.name}/{path.parent.name}"
        # the dev runs of what was tried, as calibrate names their directories
        views = {t.label: load_run(trial_dir(path.with_suffix(".runs"), t.label, t.models)) for t in cal.tried}
        picks = {bound: choose(task, alone[cal.anchor], cal.tried, views, cal.significant, bound)[0]
                 for bound in (None, ns.max_loss)}  # fmt: skip
        label = {bound: t.label if t else f"{cal.anchor} alone" for bound, t in picks.items()}
        print(f"{where}: anchor {cal.anchor} ({cal.anchor_reason or 'the best dev score'});"
              f" passes --significant: {', '.join(significant) or 'none'};"
              f" anchor by score: {rules['score']}, by NLL: {rules['nll']};"
              f" chosen without a loss bound: {label[None]}, with --max-loss {ns.max_loss:g}:"
              f" {label[ns.max_loss]}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
