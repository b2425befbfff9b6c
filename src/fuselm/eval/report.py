"""Runs side by side: per task and metric, mean and 95% bootstrap interval, cost per sample;
as a terminal table, Markdown, and a PNG of quality against cost."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FuselmError
from .runner import _read_rows


@dataclass
class RunView:
    name: str
    summary: dict[str, Any]
    rows: list[dict[str, Any]]


def load_run(path: str | Path) -> RunView:
    path = Path(path)
    summary_path = path / "summary.json"
    if not summary_path.is_file():
        raise FuselmError(f"{path} is not a finished run (no summary.json); run `fuselm eval` there first")
    return RunView(path.name, json.loads(summary_path.read_text()), _read_rows(path / "rows.jsonl"))


def bootstrap_ci(values: list[float], n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean (seeded: the same rows give the same interval)."""
    if not values:
        return (float("nan"), float("nan"))
    arr = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = arr[rng.integers(0, len(arr), size=(n_boot, len(arr)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def report_rows(runs: list[RunView]) -> list[dict[str, Any]]:
    out = []
    for run in runs:
        s = run.summary
        for metric, mean in s["metrics"].items():
            values = [r["metrics"][metric] for r in run.rows if r["metrics"].get(metric) is not None]
            lo, hi = bootstrap_ci(values) if values else (None, None)
            out.append(
                {
                    "run": run.name,
                    "task": s["task"],
                    "method": s["method"],
                    "models": "+".join(s["models"]),
                    "metric": metric,
                    "mean": mean,
                    "ci_low": lo,
                    "ci_high": hi,
                    "n": s["n"],
                    "seconds_per_sample": s["seconds_per_sample"],
                }
            )
    return out


def _fmt(x: float | None, scale: float = 1.0) -> str:
    return "n/a" if x is None else f"{x * scale:.1f}"


def to_markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| run | task | method | models | metric | mean | 95% CI | n | s/sample |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        per_sample = r["ci_low"] is not None
        scale = 100.0 if per_sample else 1.0  # per-sample metrics in %, corpus metrics as reported
        ci = f"[{_fmt(r['ci_low'], scale)}, {_fmt(r['ci_high'], scale)}]" if per_sample else "corpus"
        lines.append(
            f"| {r['run']} | {r['task']} | {r['method']} | {r['models']} | {r['metric']} | "
            f"{_fmt(r['mean'], scale)} | {ci} | {r['n']} | {_fmt(r['seconds_per_sample'])} |"
        )
    return "\n".join(lines) + "\n"


def plot_quality_cost(runs: list[RunView], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        s = run.summary
        main = s.get("main_metric")
        y = s["metrics"].get(main)
        if y is None or s["seconds_per_sample"] is None:
            continue
        ax.scatter(s["seconds_per_sample"], y, s=40)
        ax.annotate(
            f"{run.name}\n({s['task']} {main})",
            (s["seconds_per_sample"], y),
            fontsize=8,
            xytext=(4, 4),
            textcoords="offset points",
        )
    ax.margins(x=0.25, y=0.2)  # room for the labels
    ax.set_xlabel("seconds per sample")
    ax.set_ylabel("main metric")
    ax.set_title("quality against cost")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
