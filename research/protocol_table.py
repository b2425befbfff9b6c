"""The tables of the frozen-rule protocol (research/protocol.py), read off its run directories:
per ensemble and task, each member alone and the calibrated choice on the unseen test rows,
the choice's paired difference against the best member there, the cost per row of each (CPU
seconds, the ratio to the best member), and what the calibration cost.

    python research/protocol_table.py [--root runs/protocol2] [--chains default/triviaqa,...]

A chain not finished yet is shown as far as it got (`partial`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from protocol_setups import ENSEMBLES, ORDER, calib_path, calibrated_run, member_run  # this folder

from fuselm.calibration import load_calibration
from fuselm.eval.calibrate import member_dir, trial_dir
from fuselm.eval.report import RunView, load_run, paired_difference
from fuselm.eval.tasks import get_task


def cost_per_row(view: RunView) -> tuple[float | None, float]:
    """CPU seconds per row (None unless every row has them) and wall seconds per row."""
    n = max(len(view.rows), 1)
    cpu = [r.cpu_seconds for r in view.rows]
    return (sum(cpu) / n if cpu and None not in cpu else None), sum(r.seconds for r in view.rows) / n


def cost_cells(view: RunView, best: RunView) -> str:
    """Cost per row and its ratio to the best member's: CPU seconds where both runs have them
    (another job on the machine hardly moves them), else wall seconds for both (marked)."""
    (cpu, wall), (best_cpu, best_wall) = cost_per_row(view), cost_per_row(best)
    if cpu is not None and best_cpu is not None:
        return f"{cpu:.2f} CPU-s | {cpu / best_cpu:.2f}x"
    return f"{wall:.2f} wall-s | {wall / best_wall:.2f}x (wall)"


def calibration_cost(path: Path) -> tuple[float, int, bool]:
    """CPU minutes of every dev run the calibration made (wall seconds where a row has no CPU
    time), the most dev rows a setup reached, and whether any row counted wall seconds."""
    cal = load_calibration(path)
    runs = path.with_suffix(".runs")
    dirs = [member_dir(runs, m.name) for m in cal.members] + [trial_dir(runs, t.label, t.models) for t in cal.tried]
    total, reached, wall = 0.0, 0, False
    for d in dirs:
        if (d / "rows.jsonl").is_file():
            view = load_run(d)
            total += sum(r.cpu_seconds if r.cpu_seconds is not None else r.seconds for r in view.rows)
            wall = wall or any(r.cpu_seconds is None for r in view.rows)
            reached = max(reached, len(view.rows))
    return total / 60, reached, wall


def fmt(x: float, scale: float) -> str:
    return f"{x * scale:.1f}"


def chain_lines(root: Path, chain: str) -> list[str]:
    ensemble, task_name = chain.split("/")
    task = get_task(task_name)
    metric = task.main_metric
    scale = task.scale(metric)
    members = {}
    for m in ENSEMBLES[ensemble]:
        run = member_run(root, task_name, m)
        if (run / "rows.jsonl").is_file():
            members[m] = load_run(run)
    if not members:
        return [f"| {chain} | (not run yet) |||||||"]
    best_name = max(members, key=lambda m: members[m].summary.metrics[metric])
    best = members[best_name]
    lines = []
    for m, view in members.items():
        part = "" if view.summary.complete else " (partial)"
        lines.append(
            f"| {chain} | {m} alone{' (best)' if m == best_name else ''} | {view.summary.n}{part} |"
            f" {fmt(view.summary.metrics[metric], scale)} | | {cost_cells(view, best)} | |"
        )
    calib = calib_path(root, chain)
    if not calib.is_file():
        lines.append(f"| {chain} | calibration not finished | | | | | | |")
        return lines
    cal = load_calibration(calib)
    minutes, reached, wall = calibration_cost(calib)
    spent = f"{minutes:.0f} min{' (partly wall time)' if wall else ''}, {reached} rows"
    choice = f"{cal.method} {' '.join(f'{k}={v}' for k, v in cal.method_options.items())}".strip()
    choice += f" over {'+'.join(cal.models)}"
    run = calibrated_run(root, chain)
    if not (run / "rows.jsonl").is_file():
        lines.append(f"| {chain} | calibrated: {choice} | not run yet | | | | | {spent} |")
        return lines
    view = load_run(run)
    d = paired_difference(view, best, metric)
    diff = "" if d is None else f"{d[0] * scale:+.1f} [{d[1] * scale:+.1f}, {d[2] * scale:+.1f}]"
    part = "" if view.summary.complete else " (partial)"
    # the best member alone, chosen: its cost is the best member's own (timings of two runs of the
    # same greedy work differ only by what else ran on the machine)
    same = cal.method == "single" and cal.models == [best_name]
    cost = "the best member's own | 1.00x" if same else cost_cells(view, best)
    lines.append(
        f"| {chain} | calibrated: {choice} | {view.summary.n}{part} | {fmt(view.summary.metrics[metric], scale)} |"
        f" {diff} | {cost} | {spent} |"
    )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="runs/protocol2", type=Path)
    ap.add_argument("--chains", default=",".join(ORDER))
    ns = ap.parse_args()
    print(
        "| ensemble/task | setup | test rows | score | vs best member (paired 95%) | cost per row | cost vs best"
        " | calibration (CPU, dev rows) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for chain in ns.chains.split(","):
        for line in chain_lines(ns.root, chain):
            print(line)


if __name__ == "__main__":
    main()
