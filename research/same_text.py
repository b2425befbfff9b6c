"""How often two setups of a calibration wrote the same text on the same dev row: what sharing
work between fused setups could save (docs/calibration.md, "Not done yet").

    python research/same_text.py runs/race/default-triviaqa.runs [--min 0.9]

For every pair of run directories under the calibration's runs: rows both reached, and on how
many of them their outputs are identical; pairs below `--min` of their rows are left out.
"""

from __future__ import annotations

import argparse
from itertools import combinations
from pathlib import Path

from fuselm.eval.report import load_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, help="a calibration's runs directory (CALIB.runs)")
    ap.add_argument("--min", type=float, default=0.9, help="show pairs with at least this share the same")
    ns = ap.parse_args()
    outputs = {}
    for d in sorted(p for p in ns.runs.iterdir() if (p / "rows.jsonl").is_file()):
        outputs[d.name] = {r.id: r.output for r in load_run(d).rows}
    print("| setup | other setup | same text | rows both reached |")
    print("|---|---|---|---|")
    for a, b in combinations(outputs, 2):
        both = outputs[a].keys() & outputs[b].keys()
        same = sum(outputs[a][i] == outputs[b][i] for i in both)
        if both and same / len(both) >= ns.min:
            print(f"| {a} | {b} | {same} | {len(both)} |")


if __name__ == "__main__":
    main()
