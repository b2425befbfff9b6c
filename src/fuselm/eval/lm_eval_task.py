"""lm-evaluation-harness tasks, run by lm-eval itself on a fuselm setup (`--task lm-eval:TASK`).

`lm-eval:NAME` is a task of lm-eval's own registry; `lm-eval:PATH.yaml` is a task YAML that
lm-eval reads itself, everything it offers included (`process_docs`, `!function`, its filters
and metrics), with the file's directory as lm-eval's include path and as the directory its
`data_files` are read from (as fuselm reads a task file; lm-eval alone reads them from the
directory it runs in). fuselm's own reading of a task YAML (`--task PATH.yaml`, eval/taskfile.py)
is the other way to run a file: it knows the prompts, so it also offers reference NLLs, the
learned controller and each member's score of each choice.

The rows: each split lm-eval would read (test, validation, training) is written once as JSON
Lines into fuselm's cache (`$FUSELM_CACHE/lm-eval/`, the file named by its content's digest), one
row per document: its index in the split, the document, and an id (the document's `id` where
every document has a distinct one, else its index). Runs, calibrations and `--offset`/`--limit`
select those rows as any others; a run of the test split (`fuselm eval`) and the calibration's
dev rows (the validation split) are those files. lm-eval then scores the selected documents
(`simple_evaluate(samples=...)`) with `FuselmLM` over the run's loaded models, a chunk of rows per
call, each row recorded with lm-eval's own per-sample metrics. Only metrics lm-eval averages over
documents (aggregation `mean`) are read: a corpus metric (BLEU, chrF) is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..errors import FuselmError
from ..files import atomic_write
from .records import EvalRow, EvalSpec
from .task import Task

PREFIX = "lm-eval:"
OUTPUT_TYPES = ("generate_until", "multiple_choice")
CHUNK_ROWS = 32  # rows per lm-eval call: its own work costs seconds a call; a crash loses at most a chunk
SPLITS = ("test_split", "validation_split", "training_split")


def is_lm_eval_task(name: str) -> bool:
    return name.startswith(PREFIX)


def _cache_root() -> Path:
    from ..models.assets import cache_dir

    return cache_dir() / "lm-eval"


@dataclass(frozen=True)
class LmEvalTask(Task):
    """A task that lm-eval runs: rows written from its splits, scored by lm-eval (module doc)."""

    task_name: str = ""  # lm-eval's name of the task
    include_path: str | None = None  # the task YAML's directory, or None (lm-eval's registry)
    split_files: dict[str, str] = field(default_factory=dict)  # split -> the rows' file
    filter_name: str = "none"  # the filter pipeline whose answers are read

    @property
    def label(self) -> str:
        return self.task_name

    def row_runner(self, spec: EvalSpec, models: list[Any], memo: Any = None, memo_keys: Any = None) -> LmEvalRows:
        return LmEvalRows(self, spec, models, memo, memo_keys)


def load_lm_eval_task(ref: str) -> LmEvalTask:
    """The task `lm-eval:NAME` or `lm-eval:PATH.yaml` (a relative path made absolute: the name
    runs and calibrations record)."""
    target = ref[len(PREFIX) :]
    if target.endswith((".yaml", ".yml")):
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise FuselmError(f"{ref}: no such task file: {path}")
        return _load(f"{PREFIX}{path}", str(path))
    if not target:
        raise FuselmError("lm-eval: names no task: use lm-eval:TASK (lm-eval's registry) or lm-eval:PATH.yaml")
    return _load(ref, None)


@lru_cache(maxsize=16)
def _load(name: str, yaml_path: str | None) -> LmEvalTask:
    include = str(Path(yaml_path).parent) if yaml_path else None
    manager = task_manager(include)
    task_name = _name_in(manager, yaml_path) if yaml_path else name[len(PREFIX) :]
    lm_task = _lm_task(manager, task_name, include)
    cfg = lm_task.config
    if cfg.output_type not in OUTPUT_TYPES:
        raise FuselmError(f"{name}: output_type {cfg.output_type!r}: fuselm runs {', '.join(OUTPUT_TYPES)} tasks")
    aggregations = lm_task.aggregation()
    metrics = list(lm_task.higher_is_better())
    corpus = [m for m in metrics if getattr(aggregations.get(m), "__name__", "") != "mean"]
    if corpus:
        raise FuselmError(
            f"{name}: metric(s) {', '.join(corpus)} aggregate over the corpus; fuselm reads per-document metrics"
            " (aggregation mean): run the task with `fuselm lm-eval`, or as a fuselm task file"
        )
    split_files = {}
    with _in(include):
        for key in SPLITS:
            split = getattr(cfg, key)
            if split:
                split_files[split] = str(_write_rows(task_name, split, _docs(lm_task, key)))
    test = cfg.test_split or cfg.validation_split
    dev = cfg.validation_split if cfg.validation_split and cfg.validation_split != test else None
    filters = getattr(lm_task, "_filters", None) or []
    return LmEvalTask(
        name=name,
        description=f"lm-eval task {task_name}" + (f" ({yaml_path})" if yaml_path else ""),
        fields=("lm_eval_doc", "doc"),
        build_prompt=_no_prompt(name),
        extract=lambda output: output,
        reference=lambda row: row.get("target"),
        metrics={m: _scored_by_lm_eval for m in metrics},
        data_file=split_files.get(test) if test else None,
        dev_file=split_files.get(dev) if dev else None,
        main_metric=metrics[0] if metrics else "",
        output_type=cfg.output_type,
        task_name=task_name,
        include_path=include,
        split_files=split_files,
        filter_name=filters[0].name if filters else "none",
    )


def _no_prompt(name: str):
    def build(prefix: str, row: dict[str, Any]) -> str:
        raise FuselmError(
            f"{name}: lm-eval builds this task's prompts; reference NLLs and a fusion controller need fuselm's own"
            " reading of the task (a task file: --task PATH.yaml)"
        )

    return build


def _scored_by_lm_eval(output: str, answer: str, row: dict[str, Any]) -> float:
    raise FuselmError("an lm-eval task's rows are scored by lm-eval (eval/lm_eval_task.py)")


@lru_cache(maxsize=4)
def task_manager(include: str | None):
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise FuselmError("an lm-eval task needs lm-evaluation-harness: pip install 'fuselm[lm-eval]'") from None

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its per-call info lines, on every chunk
    return TaskManager(include_path=include) if include else TaskManager()


def _name_in(manager, yaml_path: str) -> str:
    """The name of the task that `yaml_path` defines, as lm-eval indexed it."""
    for name, entry in manager.task_index.items():
        found = entry.get("yaml_path") if isinstance(entry, dict) else getattr(entry, "yaml_path", None)
        if found and str(Path(found).resolve()) == yaml_path:
            return name
    raise FuselmError(f"{yaml_path}: lm-eval found no task in this file")


def _lm_task(manager, task_name: str, include: str | None, split: str | None = None):
    """lm-eval's task object (data loaded), with `split` as the split it evaluates."""
    with _in(include):
        try:
            loaded = manager.load([task_name])
        except (KeyError, ValueError) as e:
            raise FuselmError(f"lm-eval has no task {task_name!r} ({str(e).splitlines()[0][:200]})") from None
    task = loaded["tasks"].get(task_name)
    if task is None:
        raise FuselmError(f"lm-eval:{task_name} is a group of tasks ({', '.join(loaded['tasks'])}): name one of them")
    if split is not None:
        task.config.test_split = split
    return task


@contextlib.contextmanager
def _in(directory: str | None):
    """In the task YAML's directory, where its relative data files are."""
    if directory is None:
        yield
        return
    with contextlib.chdir(directory):
        yield


def _docs(lm_task, key: str) -> list[dict[str, Any]]:
    docs = {"test_split": lm_task.test_docs, "validation_split": lm_task.validation_docs,
            "training_split": lm_task.training_docs}[key]()  # fmt: skip
    return [dict(d) for d in docs]


def _write_rows(task_name: str, split: str, docs: list[dict[str, Any]]) -> Path:
    ids = [d.get("id") for d in docs]
    distinct = all(isinstance(i, (str, int)) for i in ids) and len(set(ids)) == len(ids)
    try:
        lines = [
            json.dumps(
                {"id": ids[i] if distinct else i, "lm_eval_split": split, "lm_eval_doc": i, "doc": d},
                ensure_ascii=False,
                sort_keys=True,
            )  # fmt: skip
            for i, d in enumerate(docs)
        ]
    except TypeError as e:
        raise FuselmError(
            f"lm-eval:{task_name}: its {split} documents are not JSON ({e}); fuselm runs text tasks"
        ) from None
    text = "".join(line + "\n" for line in lines)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    path = _cache_root() / _slug(task_name) / f"{_slug(split)}-{digest}.jsonl"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, text)
    return path


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:80]


class LmEvalRows:
    """Rows of an lm-eval task scored by lm-eval with the run's setup (`FuselmLM` over the run's
    loaded models), a chunk at a time (`rows`)."""

    chunk_rows = CHUNK_ROWS

    def __init__(self, task: LmEvalTask, spec: EvalSpec, models: list[Any], memo: Any = None, memo_keys: Any = None):
        from .harness import FuselmLM

        self.task = task
        setup = RunConfig(models=spec.models, method=spec.method, method_options=spec.method_options,
                          generation=spec.generation.model_copy(update={"chat": "raw"}))  # fmt: skip
        self.lm = FuselmLM.over(setup, models, memo=memo, memo_keys=memo_keys)
        self.by_split: dict[str, Any] = {}

    def close(self) -> None:
        self.lm.close()

    def rows(self, rows: list[dict[str, Any]]) -> list[EvalRow]:
        import lm_eval

        out: dict[Any, EvalRow] = {}
        for split in dict.fromkeys(r["lm_eval_split"] for r in rows):
            mine = [r for r in rows if r["lm_eval_split"] == split]
            if split not in self.by_split:
                manager = task_manager(self.task.include_path)
                self.by_split[split] = _lm_task(manager, self.task.task_name, self.task.include_path, split)
            busy = self.lm.busy_seconds
            with _in(self.task.include_path):
                results = lm_eval.simple_evaluate(
                    model=self.lm, tasks=[self.by_split[split]], task_manager=task_manager(self.task.include_path),
                    samples={self.task.task_name: [r["lm_eval_doc"] for r in mine]}, log_samples=True,
                    bootstrap_iters=0, verbosity="ERROR",
                )  # fmt: skip
            seconds = (self.lm.busy_seconds - busy) / len(mine)
            samples = {
                s["doc_id"]: s for s in results["samples"][self.task.task_name] if s["filter"] == self.task.filter_name
            }
            for r in mine:
                sample = samples.get(r["lm_eval_doc"])
                if sample is None:
                    raise FuselmError(f"lm-eval returned no sample for row {r['id']} of {self.task.name}")
                out[r["id"]] = self._row(r, sample, seconds)
        return [out[r["id"]] for r in rows]

    def _row(self, row: dict[str, Any], sample: dict[str, Any], seconds: float) -> EvalRow:
        metrics = {m: _number(sample.get(m)) for m in self.task.metrics}
        common = dict(id=row["id"], reference=_jsonable(sample.get("target")), metrics=metrics,
                      seconds=round(seconds, 4), prompt=str(sample["arguments"][0][0]))  # fmt: skip
        if self.task.output_type == "multiple_choice":
            lls = [float(r[0][0]) for r in sample["resps"]]
            texts = [str(a[1]) for a in sample["arguments"]]
            pick = max(range(len(lls)), key=lambda j: (lls[j], -j))  # the first of equals, as numpy's argmax
            choices = [{"text": t, "logprob": round(v, 6)} for t, v in zip(texts, lls)]
            return EvalRow(**common, output=texts[pick], answer=str(pick), finish_reason="scored", choices=choices)
        output = str(sample["resps"][0][0])
        answer = sample["filtered_resps"][0] if isinstance(sample["filtered_resps"], list) else sample["filtered_resps"]
        return EvalRow(**common, output=output, answer=str(answer), finish_reason="lm-eval")


def _number(value: Any) -> float | None:
    if isinstance(value, bool | int | float):
        return float(value)
    return None


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except TypeError:
        return str(value)
