"""Run a task with any method and models: one JSONL row per sample, resumable, with a summary.

A run directory holds:
  config.json   what the run is (task, method, models, options, generation, data selection) and
                the versions it was made with; a resumed run must have the same config
  rows.jsonl    one row per sample, appended and fsynced as each finishes
  summary.json  per-metric means, cost per sample, corpus metrics (written at the end)

A `multiple_choice` task's rows are scored, not generated (eval/choice.py: its methods are
`single`, `product` and `mixture`), into the same rows and summary.

Interrupting a run (Ctrl-C, kill, crash) loses at most the sample in progress; running the same
command again continues after the last complete row, never duplicating one. The same command
with a larger --limit (over the same rows: same data, offset and seed) extends a run. A run
directory is locked while a run works in it (an OS lock on `.lock`, which holds the pid): a
second `fuselm eval` on it is refused, and a killed run's lock is released by the kernel.
"""

from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from ..config import GenerationConfig, ModelConfig
from ..errors import FuselmError
from ..files import DirLock, append_jsonl, atomic_write_json
from ..fusion.loop import decode
from ..fusion.methods import build_method
from ..models.loading import DeferredModel, check_reference, load_model, load_models
from ..progress import progress_bar
from .choice import ChoiceScorer, check_task_method, is_multiple_choice
from .memo import Memo, generation_key, model_key
from .records import EvalRow, EvalSpec, EvalSummary, Stopwatch, add_cpu, check_concurrency
from .rundir import prepare_run_dir, read_rows, selection_digest
from .task import Task, default_data_dir, load_rows
from .tasks import get_task

__all__ = ["EvalRow", "EvalSpec", "EvalSummary", "check_concurrency", "run_eval", "summarize", "task_generation"]


def task_generation(task: Task, gen: GenerationConfig, explicit: set[str]) -> GenerationConfig:
    """The task's stop strings and token budget, unless the user set them."""
    update: dict[str, Any] = {"stop": list(dict.fromkeys([*task.stop, *gen.stop]))}
    if "max_new_tokens" not in explicit:
        update["max_new_tokens"] = task.max_new_tokens
    if "chat" not in explicit:
        update["chat"] = task.chat
    return gen.model_copy(update=update)


def run_eval(
    spec: EvalSpec,
    out: str | Path,
    data_dir: Path | None = None,
    explicit_generation: set[str] | None = None,
    show_progress: bool = True,
    concurrency: int = 1,
    memo: bool = True,
) -> EvalSummary:
    """Run (or resume) `spec` in the run directory `out`, locked for the time of the run.
    `concurrency` rows are in flight at once (models on engines only: the engines batch them).
    With `memo`, single-model work is read from and kept in the memo (eval/memo.py): a greedy
    `single` generation, each member's scores of a multiple-choice row."""
    out = Path(out)
    check_concurrency(spec.models, concurrency)
    with DirLock(out, "eval"):
        return _run_locked(spec, out, data_dir, explicit_generation or set(), show_progress, concurrency, memo)


def _uses_memo(spec: EvalSpec, task: Task, gen: GenerationConfig) -> bool:
    """Whether the run has single-model work the memo keeps: a greedy `single` generation by an
    in-process model, or a multiple-choice row scored by one (models on engines are not kept)."""
    local = any(m.in_process for m in spec.models)
    if is_multiple_choice(task):
        return local
    return local and spec.method == "single" and gen.temperature == 0


def _models(cfgs: list[ModelConfig], deferred: bool) -> list[Any]:
    """The run's models: loaded now, or (`deferred`, for the memo) the in-process ones at their
    first use, so that a run the memo answers whole loads none."""
    if not deferred:
        return load_models(cfgs)
    for cfg in cfgs:  # a misspelt last name fails before anything runs
        check_reference(cfg)
    return [DeferredModel(cfg) if cfg.in_process else load_model(cfg) for cfg in cfgs]


def _run_locked(
    spec: EvalSpec,
    out: Path,
    data_dir: Path | None,
    explicit: set[str],
    show_progress: bool,
    concurrency: int,
    use_memo: bool,
):
    task = get_task(spec.task)
    # a multiple-choice task is scored by single/product/mixture; a decoding method is refused here
    check_task_method(task, spec.method, len(spec.models), spec.method_options)
    data_dir = data_dir or default_data_dir()
    all_rows = load_rows(task, spec.data, data_dir)
    rows = spec.select(all_rows)
    if not rows:
        raise FuselmError(f"task {task.name}: no rows selected (check --offset/--limit)")
    prepare_run_dir(out, spec, selection_digest(rows), all_rows)
    task.pin(out / "config.json")  # a task file: its files' digests recorded, or a changed one refused
    rows_path = out / "rows.jsonl"
    done = read_rows(rows_path)
    done_ids = {r.id for r in done}
    todo = [r for r in rows if r["id"] not in done_ids]
    if todo:
        prefix = task.prompt_prefix(data_dir)
        gen = task_generation(task, spec.generation, explicit)
        memo = Memo() if use_memo and _uses_memo(spec, task, gen) else None
        keys = [model_key(m) for m in spec.models] if memo is not None else [None] * len(spec.models)
        models = _models(spec.models, deferred=memo is not None)
        try:
            method: Any = task.row_runner(spec, models, memo, keys)  # an lm-eval task: lm-eval runs its rows
            if method is not None:
                pass
            elif is_multiple_choice(task):  # once for the run
                method = ChoiceScorer(spec.method, models, spec.method_options, memo, keys)
            else:
                method = build_method(spec.method, models, spec.method_options)
        except BaseException:
            for m in models:
                m.close()
            if memo is not None:
                memo.close()
            raise
        try:
            _generate_rows(task, method, prefix, gen, todo, rows, done, rows_path, show_progress, concurrency,
                           memo, keys[0])  # fmt: skip
        finally:
            if hasattr(method, "close"):
                method.close()
            for m in models:
                m.close()
            if memo is not None:
                memo.close()
    summary = summarize(task, spec, read_rows(rows_path), rows)
    atomic_write_json(out / "summary.json", summary.model_dump(mode="json"))
    return summary


def _generate_rows(
    task, method, prefix, gen, todo, rows, done, rows_path, show_progress, concurrency, memo=None, memo_key=None
) -> None:
    main = task.main_metric
    # CPU seconds where every model runs in this process, one row at a time (rows.cpu_seconds)
    cpu = concurrency == 1 and all(m.works_in_process for m in getattr(method, "models", []))
    scores = [r.metrics[main] for r in done if r.metrics.get(main) is not None]
    from_memo = [sum(r.memo for r in done)]
    with progress_bar(show_progress) as progress:
        bar = progress.add_task(_label(task.name, main, scores, from_memo[0]), total=len(rows), completed=len(done))

        def one(row) -> EvalRow:
            if isinstance(method, ChoiceScorer):  # a multiple_choice task: each choice scored, nothing generated
                return method.row(task, prefix, gen, row)
            prompt = task.build_prompt(prefix, row)
            key = generation_key(memo_key, prompt, gen) if memo is not None and memo_key else None
            generated = memo.get(key) if memo is not None else None
            if generated is None:
                for m in method.models:  # loaded before the clock starts
                    if isinstance(m, DeferredModel):
                        m.model()
                watch = Stopwatch(cpu=cpu)
                reference = task.reference_text(row) if method.needs_reference else None  # oracle-route follows it
                result = decode(method, prompt, gen, reference=reference)
                generated = {"text": result.text, "finish_reason": result.finish_reason,
                             "new_tokens": result.stats.new_tokens, "forward_passes": result.stats.forward_passes,
                             "text_share": result.stats.text_share, "seconds": watch.wall(),
                             "cpu_seconds": watch.cpu()}  # fmt: skip
                if key is not None:
                    memo.put({key: generated})
            else:
                generated = {**generated, "memo": True}
            scoring = Stopwatch(cpu=cpu)
            return EvalRow(
                id=row["id"],
                prompt=prompt,
                output=generated["text"],
                answer=task.extract(generated["text"]),
                reference=task.reference(row),
                metrics=task.score(generated["text"], row),
                # the generation's seconds (as measured when it ran: now, or when the memo kept it), then scoring's
                seconds=round(generated["seconds"] + scoring.wall(), 4),
                cpu_seconds=add_cpu(generated.get("cpu_seconds"), scoring.cpu()),
                new_tokens=generated["new_tokens"],
                forward_passes=generated["forward_passes"],
                text_share=generated["text_share"],
                finish_reason=generated["finish_reason"],
                memo=generated.get("memo", False),
            )

        def record(row: EvalRow) -> None:  # on this thread only: rows.jsonl has one writer
            append_jsonl(rows_path, row.record())
            if row.metrics.get(main) is not None:
                scores.append(row.metrics[main])
            from_memo[0] += row.memo
            progress.update(bar, advance=1, description=_label(task.name, main, scores, from_memo[0]))

        chunk = getattr(method, "chunk_rows", None)  # rows it runs together (an lm-eval task's)
        if chunk:
            for i in range(0, len(todo), chunk):
                for row in method.rows(todo[i : i + chunk]):
                    record(row)
            return
        if concurrency == 1:
            for row in todo:
                record(one(row))
            return
        # Rows in flight at once, each recorded as it finishes (the summary orders them by the
        # selection); on a failure, what finished is kept and nothing new starts.
        with ThreadPoolExecutor(concurrency, thread_name_prefix="fuselm-eval") as pool:
            pending = {pool.submit(one, row) for row in todo[:concurrency]}
            queue = iter(todo[concurrency:])
            try:
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for f in finished:
                        record(f.result())
                        nxt = next(queue, None)
                        if nxt is not None:
                            pending.add(pool.submit(one, nxt))
            finally:
                for f in pending:
                    f.cancel()


def _label(task: str, metric: str, scores: list[float], from_memo: int = 0) -> str:
    memo = f" ({from_memo} from the memo)" if from_memo else ""
    if not scores or not metric:
        return task + memo
    return f"{task} {metric}={sum(scores) / len(scores):.3f}{memo}"


def summarize(task: Task, spec: EvalSpec, done: list[EvalRow], selected: list[dict[str, Any]]) -> EvalSummary:
    by_id = {r.id: r for r in done}
    ordered = [by_id[r["id"]] for r in selected if r["id"] in by_id]
    n = len(ordered)
    metrics: dict[str, float | None] = {}
    for name in task.metrics:
        vals = [r.metrics[name] for r in ordered if r.metrics.get(name) is not None]
        metrics[name] = sum(vals) / len(vals) if vals else None
    if n:  # over the rows so far when the run is partial ("complete" says which)
        for name, fn in task.corpus_metrics.items():
            metrics[name] = fn([r.output for r in ordered], [r.reference for r in ordered])
    return EvalSummary(
        task=task.name,
        method=spec.method,
        models=[m.name for m in spec.models],
        n=n,
        complete=n == len(selected),
        metrics=metrics,
        main_metric=task.main_metric,
        seconds_per_sample=sum(r.seconds for r in ordered) / n if n else None,
        cpu_seconds_per_sample=(
            sum(r.cpu_seconds for r in ordered) / n if n and all(r.cpu_seconds is not None for r in ordered) else None
        ),
        tokens_per_sample=sum(r.new_tokens for r in ordered) / n if n else None,
        memo_rows=sum(r.memo for r in ordered),
    )
