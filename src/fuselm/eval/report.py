"""Runs side by side: per task and metric, mean and 95% bootstrap interval, cost per sample;
as a terminal table, Markdown, and a PNG of quality against cost."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FuselmError
from .metrics import bootstrap_indices
from .runner import _read_rows


@dataclass
class RunView:
    name: str
    summary: dict[str, Any]
    rows: list[dict[str, Any]]


def load_run(path: str | Path) -> RunView:
    """A run directory; one still in progress (or interrupted) is summarized from its rows so far
    and marked partial."""
    path = Path(path)
    summary_path = path / "summary.json"
    rows = _read_rows(path / "rows.jsonl")
    if summary_path.is_file():
        return RunView(path.name, json.loads(summary_path.read_text()), rows)
    config = path / "config.json"
    if not config.is_file():
        raise FuselmError(f"{path} is not a run directory (no config.json); see `fuselm eval --out`")
    if not rows:
        raise FuselmError(f"{path} has no finished rows yet")
    from .runner import EvalSpec, summarize
    from .task import get_task

    spec = EvalSpec(**json.loads(config.read_text())["spec"])
    summary = summarize(get_task(spec.task), spec, rows, rows)
    summary["complete"] = False
    return RunView(path.name, summary, rows)


def bootstrap_ci(values: list[float], n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean (seeded: the same rows give the same interval)."""
    if not values:
        return (float("nan"), float("nan"))
    arr = np.asarray(values, dtype=float)
    means = arr[bootstrap_indices(len(arr), n_boot, seed)].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def _interval(run: RunView, metric: str) -> tuple[tuple[float, float] | None, bool]:
    """A metric's 95% bootstrap interval over the run's rows, and whether it is a corpus metric
    (scored over all rows at once, on its own scale) rather than a per-sample mean (a fraction)."""
    from .task import get_task

    corpus = get_task(run.summary["task"]).corpus_metrics.get(metric)
    if corpus is not None:
        return corpus.interval([r["output"] for r in run.rows], [r["reference"] for r in run.rows]), True
    values = [r["metrics"][metric] for r in run.rows if r["metrics"].get(metric) is not None]
    return (bootstrap_ci(values) if values else None), False


def report_rows(runs: list[RunView]) -> list[dict[str, Any]]:
    out = []
    for run in runs:
        s = run.summary
        for metric, mean in s["metrics"].items():
            ci, corpus = _interval(run, metric) if mean is not None else (None, False)
            out.append(
                {
                    "run": run.name,
                    "task": s["task"],
                    "method": s["method"],
                    "models": "+".join(s["models"]),
                    "metric": metric,
                    "main": metric == s.get("main_metric"),
                    "corpus": corpus,
                    "mean": mean,
                    "ci_low": ci[0] if ci else None,
                    "ci_high": ci[1] if ci else None,
                    "n": s["n"],
                    "partial": not s.get("complete", True),
                    "seconds_per_sample": s["seconds_per_sample"],
                }
            )
    return out


def _fmt(x: float | None, scale: float = 1.0) -> str:
    return "n/a" if x is None else f"{x * scale:.1f}"


def _cell(r: dict[str, Any]) -> str:
    """A metric's mean and 95% interval: per-sample metrics in %, corpus metrics (chrF, spBLEU) on
    their own 0-100 scale."""
    scale = 1.0 if r["corpus"] else 100.0
    if r["ci_low"] is None:
        return _fmt(r["mean"], scale)
    return f"{_fmt(r['mean'], scale)} [{_fmt(r['ci_low'], scale)}, {_fmt(r['ci_high'], scale)}]"


def by_task(rows: list[dict[str, Any]]) -> dict[str, tuple[list[str], list[list[str]]]]:
    """Per task: a header and one line per run (run, method, models, each metric, n, s/sample)."""
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in rows:
        runs.setdefault(r["task"], {}).setdefault(r["run"], []).append(r)
    out = {}
    for task, per_run in runs.items():
        metrics = list(dict.fromkeys(m["metric"] for ms in per_run.values() for m in ms))
        body = []
        for run, ms in per_run.items():
            cells = {m["metric"]: _cell(m) for m in ms}
            first = ms[0]
            body.append(
                [run, first["method"], first["models"], *(cells.get(m, "") for m in metrics)]
                + [
                    f"{first['n']} (partial)" if first["partial"] else str(first["n"]),
                    _fmt(first["seconds_per_sample"]),
                ]
            )
        out[task] = (["run", "method", "models", *metrics, "n", "s/sample"], body)
    return out


def overview(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Each method-and-models setup against each task's main metric (mean; * = partial run)."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    setups: dict[tuple[str, str], dict[str, str]] = {}
    metric_of: dict[str, str] = {}
    for r in rows:
        if not r["main"]:
            continue
        metric_of[r["task"]] = r["metric"]
        scale = 1.0 if r["corpus"] else 100.0
        mark = "*" if r["partial"] else ""
        setups.setdefault((r["method"], r["models"]), {})[r["task"]] = _fmt(r["mean"], scale) + mark
    header = ["method", "models", *(f"{t} {metric_of.get(t, '')}".strip() for t in tasks)]
    body = [[m, models, *(cells.get(t, "") for t in tasks)] for (m, models), cells in setups.items()]
    return header, body


def to_markdown(rows: list[dict[str, Any]]) -> str:
    """One table per task: a row per run, a column per metric (mean and 95% bootstrap interval;
    per-sample metrics in %, corpus metrics such as chrF and spBLEU as sacrebleu scores them)."""
    parts = [
        "Each cell: score [95% bootstrap interval over rows]. Per-sample metrics in %; corpus metrics"
        " (chrF, spBLEU) on sacrebleu's 0-100 scale, their interval from resampled sentences."
    ]
    if len({r["task"] for r in rows}) > 1:
        header, body = overview(rows)
        lines = ["### main metric by task (* = partial run)", "", "| " + " | ".join(header) + " |"]
        lines += ["|" + "---|" * len(header)] + ["| " + " | ".join(b) + " |" for b in body]
        parts.append("\n".join(lines))
    for task, (header, body) in by_task(rows).items():
        lines = [f"### {task}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(b) + " |" for b in body]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def _setup_labels(runs: list[RunView]) -> dict[int, str]:
    """A short name per run's setup: the model for a single model, else the method, with its
    models only where the same method runs on several model sets."""
    sets: dict[str, set[str]] = {}
    for run in runs:
        sets.setdefault(run.summary.get("method", "?"), set()).add("+".join(run.summary.get("models", [])))
    labels = {}
    for run in runs:
        method, models = run.summary.get("method", "?"), "+".join(run.summary.get("models", []))
        if method == "single":
            labels[id(run)] = models
        else:
            labels[id(run)] = f"{method} ({models})" if len(sets[method]) > 1 else method
    return labels


def plot_quality_cost(runs: list[RunView], path: str | Path) -> None:
    """One panel per task: each run's main metric against its seconds per sample. A setup (a
    model alone, or a method) keeps one colour and marker in every panel, named in one legend;
    a run still in progress is drawn hollow."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    panels: dict[str, list[tuple[str, float, float, bool]]] = {}
    metric_of: dict[str, str] = {}
    setups: list[str] = []  # in order of first appearance: colours follow it
    label_of = _setup_labels(runs)
    singles = {label_of[id(r)] for r in runs if r.summary.get("method") == "single"}
    for run in runs:
        s = run.summary
        main = s.get("main_metric")
        y = s["metrics"].get(main)
        if y is None or s["seconds_per_sample"] is None:
            continue
        per_sample = any(r["metrics"].get(main) is not None for r in run.rows)
        if per_sample:  # in %, like the tables
            y *= 100
        metric_of[s["task"]] = f"{main} (%)" if per_sample else main
        setup = label_of[id(run)]
        if setup not in setups:
            setups.append(setup)
        panels.setdefault(s["task"], []).append((setup, s["seconds_per_sample"], y, not s.get("complete", True)))
    if not panels:
        raise FuselmError("no run has both a main metric and a cost to plot")
    colours = plt.get_cmap("tab10" if len(setups) <= 10 else "tab20")
    style = {
        name: {"color": colours(i % colours.N), "marker": "o" if name in singles else "s"}
        for i, name in enumerate(setups)
    }
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    spare = rows * cols - len(panels)  # an empty panel holds the legend; else it goes below
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.0 * rows + (0 if spare else 1.0)), squeeze=False)
    for ax, (task, points) in zip(axes.flat, panels.items()):
        for setup, x, y, partial in points:
            st = style[setup]
            ax.scatter(x, y, s=42, marker=st["marker"], edgecolors=st["color"],
                       facecolors="none" if partial else st["color"], linewidths=1.5)  # fmt: skip
        xs = [p[1] for p in points]
        if min(xs) > 0 and max(xs) / min(xs) > 10:
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.margins(x=0.15, y=0.15)
        ax.set_title(task)
        ax.set_xlabel("seconds per sample")
        ax.set_ylabel(metric_of[task])
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    order = sorted(setups, key=lambda n: (n not in singles, n))  # the models alone, then the methods
    handles = [
        plt.Line2D([], [], linestyle="", marker=style[n]["marker"], color=style[n]["color"], markersize=7)
        for n in order
    ]
    labels = list(order)
    if any(p[3] for points in panels.values() for p in points):
        handles.append(plt.Line2D([], [], linestyle="", marker="o", markerfacecolor="none", color="grey"))
        labels.append("hollow: run in progress")
    fig.suptitle("quality against cost")
    if spare:
        list(axes.flat)[len(panels)].legend(handles, labels, loc="center", fontsize=9, frameon=False)
        fig.tight_layout()
    else:
        ncol = min(5, len(labels))
        fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0.25 * math.ceil(len(labels) / ncol) / (4.0 * rows + 1.0), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
