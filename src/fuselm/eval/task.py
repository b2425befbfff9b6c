"""A task is a small declarative definition; adding a task is adding one file under `tasks/`."""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..errors import FuselmError, UnknownNameError

# Per-sample metric: (output, extracted answer, row) -> score.
SampleMetric = Callable[[str, str, dict[str, Any]], float]


class CorpusMetric(Protocol):
    """Scored over all rows at once (chrF, BLEU), so its interval resamples rows and rescores."""

    def __call__(self, outputs: list[str], references: list[Any]) -> float | None: ...

    def resampled(self, outputs: list[str], references: list[Any], indices: Any) -> Any | None:
        """One score per row of ``indices`` (resamples x row positions); None if it cannot run."""
        ...


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    fields: tuple[str, ...]  # required fields of a data row
    build_prompt: Callable[[str, dict[str, Any]], str]  # (prompt-file text, row) -> prompt
    extract: Callable[[str], str]
    reference: Callable[[dict[str, Any]], Any]
    metrics: dict[str, SampleMetric]  # strict and lenient ("paper_*") per-sample metrics
    corpus_metrics: dict[str, CorpusMetric] = field(default_factory=dict)
    stop: tuple[str, ...] = ()
    max_new_tokens: int = 64
    data_file: str | None = None  # default file, relative to the data directory
    prompt_file: str | None = None  # few-shot / instruction file, relative to the data directory
    hub: tuple[str, str | None, str] | None = None  # (dataset, config, split) when online
    main_metric: str = ""
    # Few-shot and completion prompts are fed as raw text: wrapped in a chat template, instruct
    # models answer the examples instead of the last question. Overridden by --chat/--raw.
    chat: str = "raw"

    def prompt_prefix(self, data_dir: Path | None) -> str:
        if not self.prompt_file:
            return ""
        path = (data_dir or default_data_dir()) / self.prompt_file
        if not path.is_file():
            raise FuselmError(f"task {self.name}: prompt file not found: {path} (set --data-dir or FUSELM_DATA)")
        return path.read_text(encoding="utf-8").rstrip()


def reference_text(task: Task, row: dict[str, Any]) -> str:
    """The text a model should write after the task prompt for this row (a training target, and
    the reference that `oracle-route` follows)."""
    if task.name == "gsm8k":
        # In the shots' format: "Let's think step by step", the rationale, "The answer is \boxed{N}"
        # (the rationale's own closing line, "#### N" or "Therefore, the answer is N", is replaced).
        lines = str(row["answer"]).strip().split("\n")
        if lines and (lines[-1].startswith("####") or lines[-1].lower().startswith("therefore, the answer is")):
            lines = lines[:-1]
        body = "\n".join(["Let's think step by step", *lines])
        return f"{body}\nThe answer is \\boxed{{{task.reference(row)}}}\n"
    ref = task.reference(row)
    first = ref[0] if isinstance(ref, list) and ref else ref
    if isinstance(first, dict) or first is None:
        raise FuselmError(f"task {task.name} has no reference text for row {row.get('id')}")
    sep = "" if str(first).startswith((" ", "\n")) or task.build_prompt("", row).endswith((" ", "\n")) else " "
    return f"{sep}{first}\n"


TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    if task.name in TASKS:
        raise ValueError(f"task {task.name!r} registered twice")
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    from . import tasks  # noqa: F401  (registers the built-in tasks)

    try:
        return TASKS[name]
    except KeyError:
        raise UnknownNameError("task", name, TASKS) from None


def task_names() -> list[str]:
    from . import tasks  # noqa: F401

    return sorted(TASKS)


def default_data_dir() -> Path:
    """`$FUSELM_DATA`, else `../shared/data` next to the working directory's project, else ./data."""
    env = os.environ.get("FUSELM_DATA")
    if env:
        return Path(env)
    for candidate in (Path.cwd().parent / "shared" / "data", Path.cwd() / "data"):
        if candidate.is_dir():
            return candidate
    return Path.cwd() / "data"


def load_rows(task: Task, data: str | None, data_dir: Path | None = None) -> list[dict[str, Any]]:
    """Rows from a local JSONL (.gz allowed) or, when `data` is `hub:NAME[:CONFIG]:SPLIT`, from the hub.

    A missing field or a malformed line is an error naming the file and line, never a skip.
    """
    if data and data.startswith("hub:"):
        return _load_hub(task, data[4:])
    path = Path(data) if data else (data_dir or default_data_dir()) / (task.data_file or "")
    if not path.is_file():
        raise FuselmError(f"task {task.name}: data file not found: {path} (give --data PATH)")
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise FuselmError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise FuselmError(f"{path}:{lineno}: expected a JSON object")
            missing = [k for k in task.fields if k not in row]
            if missing:
                raise FuselmError(f"{path}:{lineno}: missing field(s) {', '.join(missing)} for task {task.name}")
            row.setdefault("id", row.get("task_id", lineno - 1))
            rows.append(row)
    return rows


def _load_hub(task: Task, spec: str) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise FuselmError("loading from the hub needs the `datasets` package (pip install datasets)") from None
    parts = spec.split(":")
    name, config, split = (parts + [None, None])[:3] if len(parts) == 3 else (parts[0], None, parts[-1])
    try:
        ds = datasets.load_dataset(name, config, split=split or "test")
    except Exception as e:  # noqa: BLE001
        raise FuselmError(f"cannot load {spec} from the hub: {str(e).splitlines()[0]}") from e
    return [dict(r, id=r.get("id", i)) for i, r in enumerate(ds)]
