"""What an evaluation run stores, as types: its spec (config.json), one row per sample
(rows.jsonl) and its summary (summary.json). The runner writes them, the report reads them."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..config import GenerationConfig, ModelConfig
from ..errors import FuselmError
from ..files import content_digest
from ..fusion.methods import PATH_OPTIONS


def absolute_paths(options: dict[str, Any]) -> dict[str, Any]:
    """`options` with a controller file or router directory as an absolute path: a run is the
    same when it is resumed from another directory or with the path spelled otherwise."""
    return {
        k: str(Path(v).resolve()) if k in PATH_OPTIONS and isinstance(v, str) and Path(v).exists() else v
        for k, v in options.items()
    }


def option_files(options: dict[str, Any]) -> dict[str, str]:
    """The content digest of each file or directory an option names (a controller, a router):
    a run resumed after the file was trained again would mix rows of two setups."""
    return {
        k: content_digest(v)
        for k, v in sorted(options.items())
        if k in PATH_OPTIONS and isinstance(v, str) and Path(v).exists()
    }


class EvalSpec(BaseModel):
    """What a run is: the selection of rows and how each is generated."""

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

    @field_validator("method_options")
    @classmethod
    def _paths_absolute(cls, options: dict[str, Any]) -> dict[str, Any]:
        return absolute_paths(options)

    def select(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """This run's rows of the task's data."""
        rows = list(rows)
        if self.seed is not None:
            random.Random(self.seed).shuffle(rows)
        end = None if self.limit is None else self.offset + self.limit
        return rows[self.offset : end]


class EvalRow(BaseModel):
    """One sample of a run, as appended to rows.jsonl. (Unknown keys in rows written by other
    versions are ignored on reading.)"""

    id: int | str
    metrics: dict[str, float | None]
    prompt: str = ""
    output: str = ""
    answer: str = ""
    reference: Any = None
    seconds: float = 0.0
    # The process's CPU seconds for the row (all its threads), where every model runs in this
    # process: steadier than `seconds` on a busy machine (another job's load shows in wall time,
    # hardly in CPU time). None where a model is on an engine (its work is not this process's) or
    # a memo entry kept none. Written only when known.
    cpu_seconds: float | None = None
    new_tokens: int = 0
    forward_passes: dict[str, int] = Field(default_factory=dict)
    text_share: dict[str, float] = Field(default_factory=dict)
    finish_reason: str = ""
    # A multiple-choice row (eval/choice.py): per choice, its text, fused log-likelihood, each
    # member's own log-likelihood and tokens. Absent (None, not written) for generated rows.
    choices: list[dict[str, Any]] | None = None
    # Read from the memo of single-model work (eval/memo.py): no model ran for this row now, and
    # its seconds and forward passes are those measured when it ran. Written only when true.
    memo: bool = False

    def record(self) -> dict[str, Any]:
        """The row as rows.jsonl holds it."""
        data = self.model_dump(mode="json")
        if data.get("choices") is None:
            data.pop("choices", None)
        if not data.get("memo"):
            data.pop("memo", None)
        if data.get("cpu_seconds") is None:
            data.pop("cpu_seconds", None)
        return data


class EvalSummary(BaseModel):
    """A run's scores: per-metric means (corpus metrics over all its rows) and cost per sample."""

    task: str
    method: str
    models: list[str]
    metrics: dict[str, float | None]
    main_metric: str = ""
    n: int = 0
    complete: bool = True  # every selected row is done
    seconds_per_sample: float | None = None
    cpu_seconds_per_sample: float | None = None  # where every row has its CPU seconds
    tokens_per_sample: float | None = None
    memo_rows: int = 0  # rows read from the memo (their costs as measured when they ran)

    @property
    def main(self) -> float | None:
        return self.metrics.get(self.main_metric)

    @property
    def setup(self) -> str:
        return "+".join(self.models)


class RunSetup(NamedTuple):
    """What a run directory holds: its method, its models' names, its method options (equal to
    the plain tuple of the three, as scripts compare it)."""

    method: str | None
    models: list[str]
    options: dict[str, Any]


class Stopwatch:
    """Wall seconds, and the process's CPU seconds where `cpu` (every model in this process)."""

    def __init__(self, cpu: bool):
        self.wall0 = time.perf_counter()
        self.cpu0 = time.process_time() if cpu else None

    def wall(self) -> float:
        return time.perf_counter() - self.wall0

    def cpu(self) -> float | None:
        return None if self.cpu0 is None else time.process_time() - self.cpu0


def add_cpu(*parts: float | None) -> float | None:
    """CPU seconds summed, None if any part is unknown."""
    return None if any(p is None for p in parts) else round(sum(parts), 4)  # type: ignore[arg-type]


def check_concurrency(models: list[ModelConfig], concurrency: int) -> None:
    """Several generations in flight at once only where every model is on an engine (which
    batches them): an in-process model runs one at a time."""
    if concurrency < 1:
        raise FuselmError(f"concurrency must be >= 1, got {concurrency}")
    local = [m.name for m in models if m.in_process]
    if concurrency > 1 and local:
        raise FuselmError(
            f"concurrency {concurrency} needs every model on an engine; {', '.join(local)} run in this process,"
            " one generation at a time (use concurrency 1, or serve them with vLLM: docs/scale-out.md)"
        )
