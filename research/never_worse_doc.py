"""The never-worse tables of docs/results.md, from the runs of research/never_worse_matrix.py.

    python research/never_worse_doc.py                      # refill docs/results.md between its markers
    python research/never_worse_doc.py --print              # print the tables instead

It also draws docs/never-worse.png: per ensemble and task, each setup minus the best member with
its paired interval (red: significantly below, green: significantly above).

`runs/` does not outlive a machine, and the matrix takes more CPU-hours than one session has, so
each (ensemble, task) summary (its table and its picture's panel) is kept in
docs/never-worse.json: the runs under --root replace their own entries there, the others stay
(a chain made again replaces its record only once every run complete there is complete again).

Per ensemble and task: every member alone, today's adafuse, anchored AdaFuse and the calibrated
setup on the test rows, each with its 95% bootstrap interval and its paired difference against
the best member on these test rows (the same resampled rows for both), the cost per sample,
and what the calibration chose on its dev rows (where it was made again on more dev rows, the
earlier choice's run too, if it chose otherwise). A run still in progress is marked *.

Above the tables, one overview: per ensemble and task, the calibrated setup and the controller
minus the best member (paired 95%), relative to the best member's score, and per ensemble the
mean of those relative differences over its tasks (the issue's "+5% on average" target).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from fuselm.eval.report import interval, load_run, paired_difference
from fuselm.eval.rundir import run_setup
from fuselm.eval.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- generated: never-worse -->", "<!-- /generated: never-worse -->"
ORDER = ["single-", "adafuse", "token-average", "anchored", "calibrated", "controller"]


def _fmt(x: float | None, scale: float) -> str:
    return "n/a" if x is None else f"{x * scale:.1f}"


def _runs(where: Path) -> dict:
    runs = {}
    for d in sorted(where.iterdir()):
        if d.is_dir() and (d / "config.json").is_file() and not d.name.endswith((".superseded", "-rows")):
            try:
                runs[d.name] = load_run(d)
            except Exception:  # noqa: BLE001 - a run with no rows yet
                continue
    return runs


def _calibration(path: Path) -> dict | None:
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def _setups(where: Path) -> dict:
    """The runs a table and a panel show: the one without the loss bound only where it chose
    otherwise (else it is the calibrated run again, copied), and where the calibration was made
    again on more dev rows (`calib.N-rows.yaml` kept by the matrix), the earlier choice's run
    as `calibrated-N-rows` where it chose otherwise."""
    runs = _runs(where)
    cal, free = _calibration(where / "calib.yaml"), _calibration(where / "calib.no-bound.yaml")
    if not (cal and free) or _chosen(free) == _chosen(cal):
        runs.pop("calibrated-no-bound", None)
    for path in sorted(where.glob("calib.[0-9]*-rows.yaml")):
        earlier = _calibration(path)
        if cal and _chosen(earlier) != _chosen(cal):
            run = _run_of(where, earlier)
            if run is not None:
                runs[f"calibrated-{path.stem.split('.')[-1]}"] = run
    return runs


def _run_of(where: Path, cal: dict):
    """A finished run in `where` (set aside or not) of the setup a calibration chose."""
    want = (cal["method"], cal["models"], cal.get("method_options") or {})
    for d in sorted(where.iterdir()):
        if (d / "summary.json").is_file() and run_setup(d) == want:
            run = load_run(d)
            if run.summary.complete:
                return run
    return None


def _best_member(runs: dict) -> str | None:
    members = {n: r for n, r in runs.items() if n.startswith("single-")}
    complete = {n: r for n, r in members.items() if r.summary.complete} or members
    return max(complete, key=lambda n: complete[n].summary.main or 0.0) if complete else None


def panel(where: Path) -> dict | None:
    """Each setup minus the best member, paired 95% interval, for the picture."""
    runs = _setups(where)
    best = _best_member(runs)
    if not best:
        return None
    task = get_task(runs[best].summary.task)
    scale = task.scale()
    rows = []
    for name in sorted(runs, key=lambda n: (next(i for i, p in enumerate(ORDER) if n.startswith(p)), n)):
        if name == best:
            continue
        d = paired_difference(runs[name], runs[best], task.main_metric)
        if d is not None:
            label = name[len("single-") :] + " alone" if name.startswith("single-") else name
            rows.append([label + ("" if runs[name].summary.complete else " *"), [round(x * scale, 2) for x in d]])
    if not rows:
        return None
    return {"metric": f"{task.main_metric} minus {best[len('single-') :]}", "rows": rows}


def plot(archive: dict, path: Path) -> None:
    """One panel per ensemble and task: each setup minus the best member, paired 95% interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(key.replace("/", " / "), e["panel"]["metric"], e["panel"]["rows"])
              for key, e in sorted(archive.items()) if e.get("panel")]  # fmt: skip
    if not panels:
        return
    cols = min(4, len(panels))
    n_rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(4.6 * cols, 3.2 * n_rows), squeeze=False, layout="constrained")
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax, (title, metric, rows) in zip(axes.flat, panels):
        ys = list(range(len(rows)))[::-1]
        for y, (_, (d, lo, hi)) in zip(ys, rows):
            colour = "tab:red" if hi < 0 else ("tab:green" if lo > 0 else "tab:gray")
            ax.errorbar(d, y, xerr=[[d - lo], [hi - d]], fmt="o", color=colour, capsize=3)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(ys, [r[0] for r in rows])
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(f"{metric} (paired 95%)", fontsize=8)
        ax.grid(axis="x", alpha=0.3)
    fig.savefig(path, dpi=110)


def task_table(where: Path) -> str | None:
    runs = _setups(where)
    if not runs:
        return None
    task = get_task(next(iter(runs.values())).summary.task)
    metric = task.main_metric
    scale = 1.0 if metric in task.corpus_metrics else 100.0
    best_name = _best_member(runs)
    cal = _calibration(where / "calib.yaml")
    free = _calibration(where / "calib.no-bound.yaml")
    lines = [
        f"| setup | {metric} [95%] | minus the best member [paired 95%] | s/sample | n |",
        "|---|---|---|---|---|",
    ]
    for name in sorted(runs, key=lambda n: (next(i for i, p in enumerate(ORDER) if n.startswith(p)), n)):
        r = runs[name]
        ci = interval(r, metric)
        cell = _fmt(r.summary.main, scale) + (f" [{_fmt(ci[0], scale)}, {_fmt(ci[1], scale)}]" if ci else "")
        diff = ""
        if best_name and name != best_name:
            d = paired_difference(r, runs[best_name], metric)
            if d is not None:
                diff = f"{d[0] * scale:+.1f} [{d[1] * scale:+.1f}, {d[2] * scale:+.1f}]"
        label = name[len("single-") :] + " alone" if name.startswith("single-") else name
        if name == "calibrated" and cal:
            label += f" (= {_chosen(cal)})"
        if name == "calibrated-no-bound" and free:
            label = f"calibrated without the loss bound (= {_chosen(free)})"
        if name.endswith("-rows") and name.startswith("calibrated-"):
            earlier = _calibration(where / f"calib.{name.removeprefix('calibrated-')}.yaml")
            label = f"calibrated on {len(earlier['dev']['ids'])} dev rows before (= {_chosen(earlier)})"
        if name == best_name:
            label += " (best member)"
        star = "" if r.summary.complete else "*"
        cost = f"{r.summary.seconds_per_sample:.2f}" if r.summary.seconds_per_sample is not None else ""
        lines.append(f"| {label} | {cell}{star} | {diff} | {cost} | {r.summary.n} |")
    head = f"**{where.parent.name} / {where.name}**"
    if cal:
        cost = f", {cal['dev_seconds'] / 60:.0f} CPU-minutes of dev runs" if cal.get("dev_seconds") else ""
        head += (f" (calibrated on {len(cal['dev']['ids'])} dev rows of {_dev_file(cal['dev']['file'])}"
                 f" from row {cal['dev']['offset']}{cost}: {cal['reason']}")  # fmt: skip
        # calibrations before 2026-12-06 anchored the best dev score and did not say so
        head += f"; anchor {cal.get('anchor_reason') or cal['anchor'] + ': the best dev score'})"
    return head + "\n\n" + "\n".join(lines)


def _dev_file(file: str) -> str:
    """`test` (or, from an older calibration, a package file's absolute path): its own test file."""
    return "its test file" if file == "test" or Path(file).is_absolute() else f"`{file}`"


def _chosen(cal: dict) -> str:
    """What a calibration chose, as its table of tried setups names it, and over which models."""
    if cal["method"] == "single":  # the fallback to the best member
        return f"single {cal['models'][0]}"
    setup = (cal["method"], cal["models"], cal.get("method_options") or {})
    tried = (t for t in cal.get("tried") or [] if (t["method"], t["models"], t.get("method_options") or {}) == setup)
    label = next((t["label"] for t in tried), cal["method"])
    return f"{label}, {'+'.join(cal['models'])}"


def _table_rows(entry: dict) -> dict[str, list[str]]:
    """{setup label: its cells} from an archived table (the record the docs print)."""
    rows = {}
    for line in entry["table"].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0] not in ("setup", "---"):
            rows[cells[0]] = cells[1:]
    return rows


def _covers(new: dict, old: dict) -> bool:
    """Whether a record made again has every setup the old one had complete, complete too (a
    chain run again replaces its record only then, not with runs still in progress)."""

    def complete(entry: dict) -> set[str]:  # setups by name: "calibrated", "adafuse", "x alone"
        return {k.split(" (")[0] for k, v in _table_rows(entry).items() if not v[0].endswith("*")}

    return complete(old) <= complete(new)


def overview(archive: dict) -> str:
    """Per ensemble and task: calibrated and controller minus the best member, and the means."""
    lines = [
        "| ensemble | task | best member | calibrated minus it [paired 95%] | relative | controller minus it | relative |",
        "|---|---|---|---|---|---|---|",
    ]
    means: dict[str, dict[str, list[float]]] = {}
    for key, entry in sorted(archive.items()):
        ensemble, task = key.split("/")
        rows = _table_rows(entry)
        best = next(((k, v) for k, v in rows.items() if k.endswith("(best member)")), None)
        if best is None:
            continue
        score = float(best[1][0].split()[0].rstrip("*"))
        cells = []
        for setup in ("calibrated", "controller"):
            row = next((v for k, v in rows.items() if k == setup or k.startswith(setup + " (")), None)
            if row is None or not row[1]:
                cells += ["not run", ""]
                continue
            star = " *" if row[0].split("]")[-1].endswith("*") else ""  # still in progress
            rel = 100 * float(row[1].split()[0]) / score if score else 0.0
            if not star:
                means.setdefault(ensemble, {}).setdefault(setup, []).append(rel)
            cells += [row[1] + star, f"{rel:+.0f}%"]
        member = best[0].removesuffix(" (best member)").removesuffix(" alone")
        lines.append(f"| {ensemble} | {task} | {member}: {score:.1f} | " + " | ".join(cells) + " |")
    sums = []
    for e, v in sorted(means.items()):
        part = [f"{name} {sum(x) / len(x):+.1f}% over {len(x)} tasks" for name, x in sorted(v.items())]
        sums.append(f"**{e}** " + ", ".join(part))
    return (
        "\n".join(lines) + "\n\nMean relative difference over the tasks run (complete runs): " + "; ".join(sums) + ".\n"
    )


def summaries(root: Path) -> dict:
    """{"ENSEMBLE/TASK": {"table": markdown, "panel": ...}} for every task with runs under root."""
    out = {}
    for ensemble in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        for where in sorted(p for p in ensemble.iterdir() if p.is_dir()):
            t = task_table(where)
            if t:
                out[f"{ensemble.name}/{where.name}"] = {"table": t, "panel": panel(where)}
    return out


def tables(archive: dict) -> str:
    return overview(archive) + "\n" + "\n\n".join(e["table"] for _, e in sorted(archive.items())) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=str(ROOT / "runs" / "never-worse"))
    ap.add_argument("--doc", default=str(ROOT / "docs" / "results.md"))
    ap.add_argument("--print", action="store_true")
    ap.add_argument("--plot", default=str(ROOT / "docs" / "never-worse.png"), help="the picture ('' for none)")
    ap.add_argument("--archive", default=str(ROOT / "docs" / "never-worse.json"), help="kept summaries")
    ns = ap.parse_args()
    path = Path(ns.archive)
    archive = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    for key, entry in summaries(Path(ns.root)).items():
        if key in archive and not _covers(entry, archive[key]):
            print(
                f"{key}: kept the archived record; runs that were complete there are still in progress", file=sys.stderr
            )
            continue
        archive[key] = entry
    text = tables(archive)
    if ns.print:
        print(text)
        return 0
    path.write_text(json.dumps(archive, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    if ns.plot:
        plot(archive, Path(ns.plot))
    doc = Path(ns.doc)
    body = doc.read_text(encoding="utf-8")
    if START not in body or END not in body:
        print(f"{doc} has no {START} ... {END} markers", file=sys.stderr)
        return 1
    before, rest = body.split(START, 1)
    _, after = rest.split(END, 1)
    doc.write_text(before + START + "\n" + text + END + after, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
