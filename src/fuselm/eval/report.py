"""Runs side by side: per task and metric, mean and 95% bootstrap interval, cost per sample;
as a terminal table, Markdown, and a PNG of quality against cost; and the picture of a
calibration (what it tried, with paired intervals)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..calibration import Calibration
from ..errors import FuselmError, UnknownNameError
from .metrics import bootstrap_indices, percentile_interval
from .records import EvalRow, EvalSpec, EvalSummary
from .rundir import read_rows
from .runner import summarize
from .tasks import get_task


@dataclass
class RunView:
    """A run as the report sees it (summary and rows may be given as dicts: they are validated)."""

    name: str
    summary: EvalSummary
    rows: list[EvalRow]

    def __post_init__(self) -> None:
        self.summary = EvalSummary.model_validate(self.summary)
        self.rows = [EvalRow.model_validate(r) for r in self.rows]


@dataclass
class ReportLine:
    """One run and metric of a report: the mean, its interval, and paired differences."""

    run: str
    task: str
    method: str
    models: str
    metric: str
    main: bool
    corpus: bool
    mean: float | None
    ci_low: float | None
    ci_high: float | None
    n: int
    partial: bool
    seconds_per_sample: float | None
    versus: dict[str, tuple[float, float, float] | None] = field(default_factory=dict)


def load_run(path: str | Path) -> RunView:
    """A run directory; one still in progress (or interrupted) is summarized from its rows so far
    and marked partial."""
    path = Path(path)
    summary_path = path / "summary.json"
    rows = read_rows(path / "rows.jsonl")
    if summary_path.is_file():
        return RunView(path.name, EvalSummary.model_validate_json(summary_path.read_text()), rows)
    config = path / "config.json"
    if not config.is_file():
        raise FuselmError(f"{path} is not a run directory (no config.json); see `fuselm eval --out`")
    if not rows:
        raise FuselmError(f"{path} has no finished rows yet")
    spec = EvalSpec(**json.loads(config.read_text())["spec"])
    summary = summarize(get_task(spec.task), spec, rows, [{"id": r.id} for r in rows])
    summary.complete = False
    return RunView(path.name, summary, rows)


def _resampled(run: RunView, rows: list[EvalRow], metric: str, indices: np.ndarray) -> np.ndarray | None:
    """The metric on each resample of ``rows`` (a run's rows): the mean of a per-sample metric,
    or the corpus metric (chrF, spBLEU) rescored on the resampled sentences."""
    corpus = get_task(run.summary.task).corpus_metrics.get(metric)
    if corpus is not None:
        return corpus.resampled([r.output for r in rows], [r.reference for r in rows], indices)
    values = np.asarray([r.metrics.get(metric) for r in rows], dtype=float)
    return None if np.isnan(values).any() or not len(values) else values[indices].mean(axis=1)


def _is_corpus(run: RunView, metric: str) -> bool:
    return metric in get_task(run.summary.task).corpus_metrics


def interval(run: RunView, metric: str, n_boot: int = 1000, seed: int = 0) -> tuple[float, float] | None:
    """95% bootstrap interval of a run's metric, resampling its rows."""
    rows = [r for r in run.rows if _is_corpus(run, metric) or r.metrics.get(metric) is not None]
    if not rows:
        return None
    scores = _resampled(run, rows, metric, bootstrap_indices(len(rows), n_boot, seed))
    return None if scores is None else percentile_interval(scores)


def paired_difference(
    run: RunView, baseline: RunView, metric: str, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float] | None:
    """``run`` minus ``baseline`` on the rows both have, with a paired bootstrap interval (95%
    by default): each resample draws the same rows for both runs, so the row-to-row variation
    they share cancels (two runs' separate intervals can overlap while one is above the other on
    almost every resample). None when they share no row."""
    by_id = {r.id: r for r in baseline.rows}
    pairs = [(r, by_id[r.id]) for r in run.rows if r.id in by_id]
    if not pairs:
        return None
    mine, theirs = [p[0] for p in pairs], [p[1] for p in pairs]
    whole = np.arange(len(pairs))[None, :]
    idx = np.concatenate([whole, bootstrap_indices(len(pairs), n_boot, seed)])
    a, b = _resampled(run, mine, metric, idx), _resampled(baseline, theirs, metric, idx)
    if a is None or b is None:
        return None
    diffs = a - b
    return (float(diffs[0]), *percentile_interval(diffs[1:], level))


def _baselines_by_task(runs: list[RunView], names: list[str]) -> dict[tuple[str, str], RunView]:
    """(task, name) -> the run each baseline name stands for on that task: the single-model run of
    the model of that name or, failing that, the one run of the method of that name (e.g.
    ``token-average``). A name that matches no run at all, or two runs of one task, is an error."""
    found: dict[tuple[str, str], RunView] = {}
    for name in names:
        for task in dict.fromkeys(r.summary.task for r in runs):
            on_task = [r for r in runs if r.summary.task == task]
            single = [r for r in on_task if r.summary.method == "single" and r.summary.setup == name]
            method = [r for r in on_task if r.summary.method == name]
            match = single or method
            if len(match) > 1:
                raise FuselmError(
                    f"baseline {name!r} is ambiguous on {task}: runs {', '.join(r.name for r in match)};"
                    " pass only one of them to `fuselm report`"
                )
            if match:
                found[task, name] = match[0]
        if not any(key[1] == name for key in found):
            known = {r.summary.setup for r in runs if r.summary.method == "single"}
            known |= {r.summary.method for r in runs if r.summary.method != "single"}
            raise UnknownNameError("baseline (a model with a single-model run, or a method)", name, known)
    return found


def report_rows(runs: list[RunView], baselines: list[str] = ()) -> list[ReportLine]:
    """One line per run and metric. For each name in ``baselines`` (a model, meaning its
    single-model run, or a method such as ``token-average``), the main metric also gets its
    paired difference against that run on the same task."""
    base_runs = _baselines_by_task(runs, list(baselines))
    out = []
    for run in runs:
        s = run.summary
        for metric, mean in s.metrics.items():
            main = metric == s.main_metric
            ci = interval(run, metric) if mean is not None else None
            versus = {}
            for name in baselines if main and mean is not None else ():
                base = base_runs.get((s.task, name))
                if base is not None and base is not run:
                    versus[name] = paired_difference(run, base, metric)
            out.append(
                ReportLine(
                    run=run.name,
                    task=s.task,
                    method=s.method,
                    models=s.setup,
                    metric=metric,
                    main=main,
                    corpus=_is_corpus(run, metric),
                    mean=mean,
                    ci_low=ci[0] if ci else None,
                    ci_high=ci[1] if ci else None,
                    versus=versus,
                    n=s.n,
                    partial=not s.complete,
                    seconds_per_sample=s.seconds_per_sample,
                )
            )
    return out


def _fmt(x: float | None, scale: float = 1.0) -> str:
    return "n/a" if x is None else f"{x * scale:.1f}"


def _scale(r: ReportLine) -> float:
    """Per-sample metrics (fractions) are shown in %, corpus metrics (chrF, spBLEU) on their own 0-100 scale."""
    return 1.0 if r.corpus else 100.0


def _cell(r: ReportLine) -> str:
    """A metric's mean and 95% interval."""
    scale = _scale(r)
    if r.ci_low is None:
        return _fmt(r.mean, scale)
    return f"{_fmt(r.mean, scale)} [{_fmt(r.ci_low, scale)}, {_fmt(r.ci_high, scale)}]"


def _delta_cell(r: ReportLine, name: str) -> str:
    d = r.versus.get(name)
    if d is None:
        return ""
    scale = _scale(r)
    return f"{d[0] * scale:+.1f} [{d[1] * scale:+.1f}, {d[2] * scale:+.1f}]"


def by_task(rows: list[ReportLine]) -> dict[str, tuple[list[str], list[list[str]]]]:
    """Per task: a header and one line per run (run, method, models, each metric, the main
    metric's paired difference against each baseline, n, s/sample)."""
    runs: dict[str, dict[str, list[ReportLine]]] = {}
    for r in rows:
        runs.setdefault(r.task, {}).setdefault(r.run, []).append(r)
    out = {}
    for task, per_run in runs.items():
        metrics = list(dict.fromkeys(m.metric for ms in per_run.values() for m in ms))
        mains = [m for ms in per_run.values() for m in ms if m.main]
        against = list(dict.fromkeys(name for m in mains for name in m.versus))
        body = []
        for run, ms in per_run.items():
            cells = {m.metric: _cell(m) for m in ms}
            main = next((m for m in ms if m.main), None)
            first = ms[0]
            body.append(
                [run, first.method, first.models, *(cells.get(m, "") for m in metrics)]
                + [_delta_cell(main, name) if main else "" for name in against]
                + [
                    f"{first.n} (partial)" if first.partial else str(first.n),
                    _fmt(first.seconds_per_sample),
                ]
            )
        main_metric = mains[0].metric if mains else ""
        deltas = [f"{main_metric} - {name}" for name in against]
        out[task] = (["run", "method", "models", *metrics, *deltas, "n", "s/sample"], body)
    return out


def overview(rows: list[ReportLine]) -> tuple[list[str], list[list[str]]]:
    """Each method-and-models setup against each task's main metric (mean; * = partial run)."""
    tasks = list(dict.fromkeys(r.task for r in rows))
    setups: dict[tuple[str, str], dict[str, str]] = {}
    metric_of: dict[str, str] = {}
    for r in rows:
        if not r.main:
            continue
        metric_of[r.task] = r.metric
        scale = _scale(r)
        mark = "*" if r.partial else ""
        setups.setdefault((r.method, r.models), {})[r.task] = _fmt(r.mean, scale) + mark
    header = ["method", "models", *(f"{t} {metric_of.get(t, '')}".strip() for t in tasks)]
    body = [[m, models, *(cells.get(t, "") for t in tasks)] for (m, models), cells in setups.items()]
    return header, body


def markdown_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(b) + " |" for b in body])


def to_markdown(rows: list[ReportLine]) -> str:
    """One table per task: a row per run, a column per metric (mean and 95% bootstrap interval;
    per-sample metrics in %, corpus metrics such as chrF and spBLEU as sacrebleu scores them)."""
    parts = [
        "Each cell: score [95% bootstrap interval over rows]. Per-sample metrics in %; corpus metrics"
        " (chrF, spBLEU) on sacrebleu's 0-100 scale, their interval from resampled sentences."
    ]
    if len({r.task for r in rows}) > 1:
        parts.append("### main metric by task (* = partial run)\n\n" + markdown_table(*overview(rows)))
    for task, (header, body) in by_task(rows).items():
        parts.append(f"### {task}\n\n" + markdown_table(header, body))
    return "\n\n".join(parts) + "\n"


def _setup_labels(runs: list[RunView]) -> dict[int, str]:
    """A short name per run's setup: the model for a single model, else the method, with its
    models only where the same method runs on several model sets."""
    sets: dict[str, set[str]] = {}
    for run in runs:
        sets.setdefault(run.summary.method, set()).add(run.summary.setup)
    labels = {}
    for run in runs:
        method, models = run.summary.method, run.summary.setup
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
    singles = {label_of[id(r)] for r in runs if r.summary.method == "single"}
    for run in runs:
        s = run.summary
        main = s.main_metric
        y = s.main
        if y is None or s.seconds_per_sample is None:
            continue
        per_sample = not _is_corpus(run, main)
        if per_sample:  # in %, like the tables
            y *= 100
        metric_of[s.task] = f"{main} (%)" if per_sample else main
        setup = label_of[id(run)]
        if setup not in setups:
            setups.append(setup)
        panels.setdefault(s.task, []).append((setup, s.seconds_per_sample, y, not s.complete))
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


@dataclass
class CalibrationPoint:
    """One line of a calibration's picture: a member alone or a tried setup, its dev score (in
    the task's units: % for per-row metrics) and, for a tried setup, the 95% interval of that
    score paired against the anchor (the anchor's score plus the difference's interval)."""

    label: str
    score: float | None
    interval: tuple[float, float] | None
    kind: str  # "anchor" (what the setups are measured against), "member", "tried"
    chosen: bool


def calibration_points(cal: Calibration) -> list[CalibrationPoint]:
    """The members alone, then every tried setup, in the calibration's order."""
    scale = get_task(cal.task).scale(cal.metric)
    best = next((m.score for m in cal.scores if m.name == cal.anchor), None)
    picked = cal.chosen_trial()
    out = []
    for m in cal.scores:
        chosen = cal.method == "single" and cal.models == [m.name]
        label = m.name + " alone" + (" (anchor)" if m.name == cal.anchor else "" if m.kept else " (dropped)")
        score = None if m.score is None else m.score * scale
        out.append(CalibrationPoint(label, score, None, "anchor" if m.name == cal.anchor else "member", chosen))
    for t in cal.tried:
        chosen = t is picked
        d = t.versus_best
        interval = None if d is None or best is None else ((best + d[1]) * scale, (best + d[2]) * scale)
        score = None if t.score is None else t.score * scale
        out.append(CalibrationPoint(t.label, score, interval, "tried", chosen))
    return out


def plot_calibration(cal: Calibration, path: str | Path) -> None:
    """What a calibration tried, one line each, on the dev score's axis: the members alone
    (circles; the anchor, which the setups are measured against, marks a dashed line), each
    fused setup (squares) with its paired 95% interval against the anchor, the chosen one in green."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = calibration_points(cal)
    scored = [p for p in points if p.score is not None]
    if not scored:
        raise FuselmError("the calibration has no dev score to plot")
    fig, ax = plt.subplots(figsize=(8.0, 1.4 + 0.42 * len(points)))
    ys = list(range(len(points)))[::-1]  # the first line on top
    for y, p in zip(ys, points):
        if p.score is None:
            continue
        colour = (
            "tab:green"
            if p.chosen
            else ("black" if p.kind == "anchor" else "tab:grey" if p.kind == "member" else "tab:blue")
        )
        if p.interval is not None:
            ax.plot(p.interval, [y, y], color=colour, linewidth=2, alpha=0.7)
        ax.scatter(p.score, y, marker="s" if p.kind == "tried" else "o", s=60, color=colour, zorder=3)
    best = next((p.score for p in points if p.kind == "anchor"), None)
    if best is not None:
        ax.axvline(best, color="black", linestyle="--", linewidth=1, alpha=0.6)
    ax.set_yticks(ys, [p.label + ("  (chosen)" if p.chosen else "") for p in points])
    for tick, p in zip(ax.get_yticklabels(), points):
        if p.chosen:
            tick.set_color("tab:green")
            tick.set_fontweight("bold")
    unit = cal.metric if get_task(cal.task).scale(cal.metric) == 1.0 else f"{cal.metric} (%)"
    ax.set_xlabel(f"{unit} on {len(cal.dev.ids)} dev rows\n(lines: 95% interval paired against the anchor)")
    ax.grid(axis="x", alpha=0.3)
    ax.margins(x=0.1, y=0.5 / max(1, len(points)))
    title = f"calibration of {cal.task}: " + cal.reason
    head = 0.25 + 0.17 * len(textwrap.wrap(title, 110))  # inches above the axes
    fig.set_figheight(fig.get_figheight() + head)
    fig.text(0.01, 0.99, textwrap.fill(title, 110), ha="left", va="top", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - head / fig.get_figheight()))
    fig.savefig(path, dpi=110)
    plt.close(fig)
