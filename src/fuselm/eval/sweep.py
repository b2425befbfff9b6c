"""`fuselm eval` over several tasks and methods: each pair one run of its own resolved setup, in
its own directory under the output (one pair: the output itself), refused on rows a calibration
it came from ran on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..errors import FuselmError
from .calibrate import check_unused
from .records import EvalSpec, EvalSummary
from .runner import run_eval
from .tasks import get_task


def tasks_and_methods(
    data: dict[str, Any], tasks: list[str] | None, method: str | None, calibration: str | None
) -> tuple[list[str], list[tuple[str, str | None]]]:
    """What an eval config (`data`: its `tasks`/`task` and `methods` are taken out, the rest is a
    run config) and the values given beside it ask to run: the given `tasks`, else the file's;
    the given `method`, else the file's `methods`, else its `method`, else single. Each method
    as (its name in the run directories, the method to run: None where `calibration`, the file
    given beside it or the config's own, chooses it)."""
    tasks = tasks or data.pop("tasks", None) or ([data.pop("task")] if "task" in data else [])
    methods = [method] if method else (data.pop("methods", None) or [data.get("method", "single")])
    data.pop("tasks", None), data.pop("methods", None)
    if not tasks:
        raise FuselmError("no task given: use --task NAME (see `fuselm eval --list-tasks`)")
    chooses = bool(calibration or data.get("calibration")) and not method and "method" not in data
    return tasks, [(m, None if chooses else m) for m in methods]


def run_evals(
    setups: list[tuple[str, str, RunConfig]],
    out: Path,
    *,
    data: str | None = None,
    limit: int | None = None,
    offset: int = 0,
    seed: int | None = None,
    calibration: str | None = None,
    data_dir: Path | None = None,
    explicit_generation: set[str] | None = None,
    show_progress: bool = True,
    concurrency: int = 1,
    memo: bool = True,
) -> list[EvalSummary]:
    """Run each (task, method as asked, run config) of `setups` on the rows `data`, `offset`,
    `limit` and `seed` select (`run_eval`: resumable); `calibration`: the file the setups came
    from, whose dev rows are refused."""
    summaries = []
    for task, method, run in setups:
        spec = EvalSpec(
            task=task,
            method=run.method,
            models=run.models,
            method_options=run.method_options,
            generation=run.generation,
            data=data,
            limit=limit,
            offset=offset,
            seed=seed,  # --seed also shuffles the rows
        )
        if calibration:
            check_unused(calibration, spec, data_dir)
        where = out if len(setups) == 1 else out / f"{get_task(task).label}__{method}"
        summaries.append(
            run_eval(spec, where, data_dir, explicit_generation, show_progress, concurrency=concurrency, memo=memo)
        )
    return summaries
