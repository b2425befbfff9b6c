"""The ARC-Easy tables of docs/tasks.md, from the runs of research/arc_easy.sh.

    python research/arc_easy_table.py [--runs runs/arc]

Per ensemble: each member alone, product, mixture and the calibrated choice on the 1000 test
rows: acc with its 95% bootstrap interval, the paired difference to the ensemble's better member
on these rows, seconds per question and its ratio to that member's; then the calibrated setup
through lm-eval's own command line, and whether it picked the same choice on every row.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fuselm.calibration import load_calibration
from fuselm.eval.report import interval, load_run, paired_difference

ENSEMBLES = {
    "default": ["smollm2-135m", "qwen2.5-coder-0.5b"],
    "gemma-qwen": ["gemma3-270m", "qwen2.5-coder-1.5b"],
    "qwens": ["qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"],
}


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def lm_eval_samples(runs: Path, name: str) -> list[dict] | None:
    found = sorted((runs / "lm-eval" / name).rglob("samples_arc_easy_*.jsonl"))
    return [json.loads(line) for line in found[-1].read_text().splitlines()] if found else None


def through_lm_eval(runs: Path, name: str, ours: Path, what: str) -> list[str]:
    """lm-eval's run `name` against `fuselm eval`'s run `ours` of the same setup, question by question."""
    samples = lm_eval_samples(runs, name)
    if samples is None or not (ours / "rows.jsonl").is_file():
        return []
    rows = {r.id: r for r in load_run(ours).rows}
    acc = sum(float(s["acc"]) for s in samples) / len(samples)
    same = sum(1 for s in samples if s["doc"]["id"] in rows and float(s["acc"]) == rows[s["doc"]["id"]].metrics["acc"])
    return ["", f"{what} through lm-eval (`fuselm lm-eval --model fuselm ...`): acc {pct(acc)} on {len(samples)}"
            f" questions; the same acc as `fuselm eval` on {same} of them."]  # fmt: skip


def table(runs: Path, ens: str) -> list[str]:
    test = runs / "test"
    members = {m: load_run(test / m) for m in ENSEMBLES[ens]}
    best = max(members, key=lambda m: members[m].summary.main or 0.0)
    base = members[best]
    lines = [f"**{ens}** ({' + '.join(ENSEMBLES[ens])}; better member on the test rows: {best})", "",
             "| setup | acc [95%] | minus the better member [paired 95%] | s/question | x the better member's | n |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    setups = [(f"{m} alone", test / m) for m in ENSEMBLES[ens]]
    setups += [("product", test / f"{ens}-product"), ("mixture", test / f"{ens}-mixture")]
    cal_path = runs / f"{ens}.calib.yaml"
    if cal_path.is_file():
        cal = load_calibration(cal_path)
        chosen = f"{cal.method} {'+'.join(cal.models)}"
        setups.append((f"calibrated (= {chosen})", test / f"{ens}-calibrated"))
    for label, path in setups:
        if not (path / "rows.jsonl").is_file():
            lines.append(f"| {label} | not run | | | | |")
            continue
        run = load_run(path)
        lo_hi = interval(run, "acc")
        d = None if run is base else paired_difference(run, base, "acc")
        s, b = run.summary.seconds_per_sample, base.summary.seconds_per_sample
        partial = "" if run.summary.complete else " (partial)"
        lines.append(
            f"| {label}{partial} | {pct(run.summary.main or 0)} [{pct(lo_hi[0])}, {pct(lo_hi[1])}] | "
            + ("" if d is None else f"{100 * d[0]:+.1f} [{100 * d[1]:+.1f}, {100 * d[2]:+.1f}]")
            + f" | {s:.2f} | {s / b:.2f} | {run.summary.n} |"
        )
    lines += through_lm_eval(runs, ens, test / f"{ens}-calibrated", "The calibrated setup")
    lines += through_lm_eval(runs, f"{ens}-product", test / f"{ens}-product", "`product`")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default="runs/arc")
    args = p.parse_args()
    for ens in ENSEMBLES:
        print("\n".join(table(Path(args.runs), ens)), end="\n\n")


if __name__ == "__main__":
    main()
