"""A task is a small declarative definition. Every task, the built-in ones too, is read from a task
file (`taskfile.py`); adding a built-in task is adding its YAML file to `tasks/`."""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..errors import FuselmError

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
    train_file: str | None = None  # rows for training (router data), disjoint from data_file
    dev_file: str | None = None  # rows for calibration, disjoint from data_file
    hub: tuple[str, str | None, str] | None = None  # (dataset, config, split) when online
    main_metric: str = ""
    # Few-shot and completion prompts are fed as raw text: wrapped in a chat template, instruct
    # models answer the examples instead of the last question. Overridden by --chat/--raw.
    chat: str = "raw"
    # How each example of the prompt file starts (after a blank line): lets a prefix keep fewer shots.
    shot_marker: str = "Question:"
    # The text a model should write after the prompt, where it is not the first reference with a
    # newline (GSM8K: a rationale in the shots' format).
    target: Callable[[dict[str, Any]], str] | None = None
    # What a model is asked for, lm-eval's name: `generate_until` (text, scored against references)
    # or `multiple_choice` (each choice's log-likelihood scored, the best one taken: eval/choice.py).
    output_type: str = "generate_until"
    # The field a row's id is read from where the row has no `id` (else its line index).
    row_id: str = "task_id"
    # `multiple_choice` tasks (eval/choice.py): a row's choices, its gold choice index (or
    # indices), and what goes between the prompt and each choice (lm-eval's target_delimiter).
    choices: Callable[[dict[str, Any]], list[str]] | None = None
    gold: Callable[[dict[str, Any]], int | list[int]] | None = None
    target_delimiter: str = " "

    @property
    def label(self) -> str:
        """A short name to show and to name directories by (a task file's own `task` name)."""
        return self.name

    def row_runner(self, spec: Any, models: list[Any], memo: Any = None, memo_keys: Any = None) -> Any | None:
        """What runs this task's rows where the task runs them itself (an lm-eval task:
        eval/lm_eval_task.py), else None: the runner decodes or scores them."""
        return None

    def pin(self, run_config: Path) -> None:
        """Record in a run's config.json what the task was read from, or refuse a run made with
        another version of it. A built-in task is code (the run records fuselm's version): nothing."""

    def scale(self, metric: str | None = None) -> float:
        """How a metric (default: the main one) is shown: per-row scores in %, corpus metrics
        (chrF, BLEU) on their own scale."""
        return 1.0 if (metric or self.main_metric) in self.corpus_metrics else 100.0

    def prompt_prefix(self, data_dir: Path | None = None, shots: int | None = None) -> str:
        """The task's prompt file (few-shot examples or an instruction), with only its last `shots`
        examples when `shots` is given."""
        prefix = self.prompt_file_text(data_dir)
        if prefix is None:
            return ""
        return prefix if shots is None else self._keep_shots(prefix, shots)

    def prompt_file_text(self, data_dir: Path | None = None) -> str | None:
        """The text of the prompt file under the data directory, right-stripped; None without one."""
        if not self.prompt_file:
            return None
        path = (data_dir or default_data_dir()) / self.prompt_file
        if not path.is_file():
            raise FuselmError(f"task {self.name}: prompt file not found: {path} (set --data-dir or FUSELM_DATA)")
        return path.read_text(encoding="utf-8").rstrip()

    def _keep_shots(self, prefix: str, shots: int) -> str:
        marker = self.shot_marker
        parts = prefix.split("\n\n" + marker)
        head, examples = parts[0], parts[1:]
        if not examples:
            return prefix
        if head.startswith(marker):  # the file starts with an example, not an instruction
            examples = [head[len(marker) :], *examples]
            kept = examples[-shots:] if shots > 0 else []
            return "\n\n".join(marker + e for e in kept)
        kept = examples[-shots:] if shots > 0 else []
        return "\n\n".join([head, *(marker + e for e in kept)])

    def reference_text(self, row: dict[str, Any]) -> str:
        """The text a model should write after the task prompt for this row (a training target,
        and the reference that `oracle-route` follows)."""
        if self.target is not None:
            return self.target(row)
        ref = self.reference(row)
        first = ref[0] if isinstance(ref, list) and ref else ref
        if isinstance(first, dict) or first is None:
            raise FuselmError(f"task {self.name} has no reference text for row {row.get('id')}")
        sep = "" if str(first).startswith((" ", "\n")) or self.build_prompt("", row).endswith((" ", "\n")) else " "
        return f"{sep}{first}\n"

    def score(self, output: str, row: dict[str, Any]) -> dict[str, float]:
        """Every per-sample metric of an output."""
        answer = self.extract(output)
        return {name: fn(output, answer, row) for name, fn in self.metrics.items()}


@dataclass(frozen=True)
class TaskHook:
    """Code that a task file names (`fuselm: {hook: NAME}`) for what its YAML cannot say (HumanEval's
    execution, GSM8K's reference and target). Looked up by name in `tasks/hooks.py`'s registry: a
    file never names Python to import."""

    name: str
    description: str
    fields: tuple[str, ...] = ()  # the columns of its rows (their functions read): required of every row
    # per-sample metrics, named in the file's metric_list; a name here comes before a common metric's
    metrics: dict[str, SampleMetric] = field(default_factory=dict)
    reference: Callable[[str], str] | None = None  # a reference made of doc_to_target's text
    target: Callable[[dict[str, Any]], str] | None = None  # the text a model should write after the prompt
    data_files: Callable[[], dict[str, str]] | None = None  # split -> file, where the task file names none


DATA_ENV = "FUSELM_DATA"


def default_data_dir() -> Path:
    """Where benchmark files are looked for without --data-dir: `$FUSELM_DATA`, else ./data."""
    env = os.environ.get(DATA_ENV)
    return Path(env).expanduser() if env else Path.cwd() / "data"


# `--dev-data test`: the task's own test file, for tasks without a dev split (rows past those
# evaluated, with --offset). Recorded by that name, so a calibration made on HumanEval, whose file
# lies inside an installed package, names its rows the same way on every machine.
TEST_FILE = "test"


def data_path(task: Task, given: str, data_dir: Path) -> Path:
    """The data file that `given` names: `test` (the task's test file), a path, or a path under
    the data directory; an error naming both places when it is in neither."""
    if given == TEST_FILE:
        given = task.data_file or ""
    path = Path(given)
    if not path.is_file() and (data_dir / given).is_file():
        path = data_dir / given
    if not path.is_file():
        raise FuselmError(f"task {task.name}: data file not found: {given} (nor under {data_dir})")
    return path


def data_name(task: Task, path: Path, data_dir: Path) -> str:
    """How a data file is recorded (calibrations, controllers): relative to the data directory,
    `test` for the task's own test file outside it, else the absolute path."""
    try:
        return path.resolve().relative_to(data_dir.resolve()).as_posix()
    except ValueError:
        pass
    own = Path(task.data_file or "")
    if own.is_absolute() and own.is_file() and own.resolve() == path.resolve():
        return TEST_FILE
    return str(path.resolve())


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
            row.setdefault("id", row.get(task.row_id, lineno - 1))
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
