"""Run a task with any method and models: one JSONL row per sample, resumable, with a summary.

A run directory holds:
  config.json   what the run is (task, method, models, options, generation, data selection) and
                the versions it was made with; a resumed run must have the same config
  rows.jsonl    one row per sample, appended and fsynced as each finishes
  summary.json  per-metric means, cost per sample, corpus metrics (written at the end)

Interrupting a run (Ctrl-C, kill, crash) loses at most the sample in progress; running the same
command again continues after the last complete row, never duplicating one. The same command
with a larger --limit (over the same rows: same data, offset and seed) extends a run.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..config import GenerationConfig, ModelConfig
from ..errors import FuselmError
from ..fusion.registry import get_method
from .task import Task, default_data_dir, get_task, load_rows, reference_text


class EvalSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: str
    method: str = "single"
    models: list[ModelConfig] = Field(min_length=1)
    method_options: dict[str, Any] = Field(default_factory=dict)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    data: str | None = None
    limit: int | None = Field(None, ge=1)
    offset: int = Field(0, ge=0)
    seed: int | None = None  # shuffle the rows with this seed before offset/limit


def select_rows(rows: list[dict[str, Any]], spec: EvalSpec) -> list[dict[str, Any]]:
    rows = list(rows)
    if spec.seed is not None:
        random.Random(spec.seed).shuffle(rows)
    end = None if spec.limit is None else spec.offset + spec.limit
    return rows[spec.offset : end]


def task_generation(task: Task, gen: GenerationConfig, explicit: set[str]) -> GenerationConfig:
    """The task's stop strings and token budget, unless the user set them."""
    update: dict[str, Any] = {"stop": list(dict.fromkeys([*task.stop, *gen.stop]))}
    if "max_new_tokens" not in explicit:
        update["max_new_tokens"] = task.max_new_tokens
    if "chat" not in explicit:
        update["chat"] = task.chat
    return gen.model_copy(update=update)


def _versions() -> dict[str, str]:
    import torch
    import transformers

    from .. import __version__

    out = {"fuselm": __version__, "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import llama_cpp

        out["llama_cpp"] = llama_cpp.__version__
    except ImportError:
        pass
    return out


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """Complete rows of rows.jsonl; a torn last line (crash mid-write) is cut off the file."""
    if not path.is_file():
        return []
    good: list[dict[str, Any]] = []
    keep_bytes = 0
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            try:
                good.append(json.loads(line))
            except json.JSONDecodeError:
                break
            keep_bytes += len(line)
    if keep_bytes != path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(keep_bytes)
    return good


def _append_row(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _selection_digest(rows: list[dict[str, Any]]) -> str:
    return hashlib.sha256(json.dumps([r["id"] for r in rows], default=str).encode()).hexdigest()


def _extends(old: dict[str, Any], spec: EvalSpec, all_rows: list[dict[str, Any]] | None) -> bool:
    """Whether `spec` only raises the row limit of the run recorded in `old` (same rows first):
    its rows are kept and the run goes on to the new limit."""
    old_spec = old.get("spec") or {}
    new_spec = spec.model_dump(mode="json")
    if all_rows is None or {k: v for k, v in old_spec.items() if k != "limit"} != {
        k: v for k, v in new_spec.items() if k != "limit"
    }:
        return False
    before, after = old_spec.get("limit"), spec.limit
    if before is None or (after is not None and after <= before):
        return False
    try:
        earlier = select_rows(all_rows, EvalSpec.model_validate(old_spec))
    except ValueError:
        return False
    return _selection_digest(earlier) == old.get("data_sha256")


def prepare_run_dir(out: Path, spec: EvalSpec, data_digest: str, all_rows: list[dict[str, Any]] | None = None) -> None:
    """Record the run's config in `out`, or check that `out` holds this same run. A larger
    --limit over the same rows (given `all_rows`, the task's rows before selection) extends it."""
    record = {"spec": spec.model_dump(mode="json"), "data_sha256": data_digest}
    cfg = out / "config.json"
    if cfg.is_file():
        old = json.loads(cfg.read_text())
        mine = {"spec": old.get("spec"), "data_sha256": old.get("data_sha256")}
        if mine != record and _extends(old, spec, all_rows):
            tmp = cfg.with_suffix(".tmp")
            tmp.write_text(json.dumps({**old, **record, "extended_from_limit": old["spec"]["limit"]}, indent=2))
            os.replace(tmp, cfg)
            return
        if mine != record:
            diff = [k for k in record["spec"] if record["spec"].get(k) != (old.get("spec") or {}).get(k)]
            if old.get("data_sha256") != data_digest:
                diff.append("data")
            raise FuselmError(
                f"{out} holds a run with a different config (differs in: {', '.join(diff) or '?'}); "
                "use another --out or delete it"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    tmp = cfg.with_suffix(".tmp")
    tmp.write_text(json.dumps({**record, "versions": _versions()}, indent=2, ensure_ascii=False))
    os.replace(tmp, cfg)


def run_eval(
    spec: EvalSpec,
    out: str | Path,
    data_dir: Path | None = None,
    explicit_generation: set[str] | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    from ..fusion.loop import generate
    from ..models.loading import load_model

    task = get_task(spec.task)
    data_dir = data_dir or default_data_dir()
    all_rows = load_rows(task, spec.data, data_dir)
    rows = select_rows(all_rows, spec)
    if not rows:
        raise FuselmError(f"task {task.name}: no rows selected (check --offset/--limit)")
    out = Path(out)
    prepare_run_dir(out, spec, _selection_digest(rows), all_rows)
    rows_path = out / "rows.jsonl"
    done = _read_rows(rows_path)
    done_ids = {r["id"] for r in done}
    todo = [r for r in rows if r["id"] not in done_ids]
    prefix = task.prompt_prefix(data_dir)
    gen = task_generation(task, spec.generation, explicit_generation or set())
    models = [load_model(m) for m in spec.models] if todo else []
    main = task.main_metric
    scores = [r["metrics"].get(main) for r in done if r["metrics"].get(main) is not None]

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        disable=not show_progress,
        transient=False,
    ) as progress:
        bar = progress.add_task(_label(task.name, main, scores), total=len(rows), completed=len(done))
        needs_reference = getattr(get_method(spec.method), "needs_reference", False)
        for row in todo:
            prompt = task.build_prompt(prefix, row)
            t0 = time.perf_counter()
            options = spec.method_options
            if needs_reference:  # oracle-route follows each row's reference
                options = {**options, "reference": reference_text(task, row)}
            result = generate(models, prompt, spec.method, gen, options)
            seconds = time.perf_counter() - t0
            answer = task.extract(result.text)
            metrics = {name: fn(result.text, answer, row) for name, fn in task.metrics.items()}
            record = {
                "id": row["id"],
                "prompt": prompt,
                "output": result.text,
                "answer": answer,
                "reference": task.reference(row),
                "metrics": metrics,
                "seconds": round(seconds, 4),
                "new_tokens": result.stats["new_tokens"],
                "forward_passes": result.stats["forward_passes"],
                "text_share": result.stats["text_share"],
                "finish_reason": result.finish_reason,
            }
            _append_row(rows_path, record)
            if metrics.get(main) is not None:
                scores.append(metrics[main])
            progress.update(bar, advance=1, description=_label(task.name, main, scores))
    summary = summarize(task, spec, _read_rows(rows_path), rows)
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    os.replace(tmp, out / "summary.json")
    return summary


def _label(task: str, metric: str, scores: list[float]) -> str:
    if not scores or not metric:
        return task
    return f"{task} {metric}={sum(scores) / len(scores):.3f}"


def summarize(task: Task, spec: EvalSpec, done: list[dict[str, Any]], selected: list[dict[str, Any]]) -> dict[str, Any]:
    by_id = {r["id"]: r for r in done}
    ordered = [by_id[r["id"]] for r in selected if r["id"] in by_id]
    n = len(ordered)
    metrics: dict[str, float | None] = {}
    for name in task.metrics:
        vals = [r["metrics"][name] for r in ordered if r["metrics"].get(name) is not None]
        metrics[name] = sum(vals) / len(vals) if vals else None
    if n:  # over the rows so far when the run is partial ("complete" says which)
        for name, fn in task.corpus_metrics.items():
            metrics[name] = fn([r["output"] for r in ordered], [r["reference"] for r in ordered])
    return {
        "task": task.name,
        "method": spec.method,
        "models": [m.name for m in spec.models],
        "n": n,
        "complete": n == len(selected),
        "metrics": metrics,
        "main_metric": task.main_metric,
        "seconds_per_sample": sum(r["seconds"] for r in ordered) / n if n else None,
        "tokens_per_sample": sum(r["new_tokens"] for r in ordered) / n if n else None,
    }
