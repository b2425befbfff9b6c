"""What other choice rules would have done with the calibrations of the never-worse matrix, read
from their files and dev runs (nothing decodes): which tried setups pass `--significant` (paired
interval above 0), and which members' dev scores are within noise of the anchor's while their
reference NLL is lower (the anchor rule docs/results.md proposes).

    python scripts/calibration_whatif.py [--root runs/never-worse]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fuselm.calibration import load_calibration
from fuselm.eval.report import load_run, paired_difference
from fuselm.eval.tasks import get_task


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="runs/never-worse")
    ns = ap.parse_args()
    for path in sorted(Path(ns.root).glob("*/*/calib.yaml")):
        cal = load_calibration(path)
        task = get_task(cal.task)
        scale = task.scale(cal.metric)
        significant = [t.label for t in cal.tried if t.versus_best and t.versus_best[1] > 0]
        runs = {r.summary.models[0]: r for d in path.with_suffix(".runs").glob("single_*") if (r := load_run(d))}
        nll = {m.name: m.nll for m in cal.scores}
        close = []
        for m in cal.scores:
            if m.name == cal.anchor or m.name not in runs or cal.anchor not in runs:
                continue
            d = paired_difference(runs[cal.anchor], runs[m.name], task.main_metric)
            if d and d[1] <= 0 and None not in (nll[m.name], nll[cal.anchor]) and nll[m.name] < nll[cal.anchor]:
                close.append(f"{m.name} ({d[0] * scale:+.1f} [{d[1] * scale:+.1f}, {d[2] * scale:+.1f}] behind)")
        where = f"{path.parent.parent.name}/{path.parent.name}"
        print(f"{where}: anchor {cal.anchor}; passes --significant: {', '.join(significant) or 'none'};"
              f" NLL-rule anchor: {', '.join(close) or 'unchanged'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
