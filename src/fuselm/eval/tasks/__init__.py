"""The built-in tasks: each module defines its task(s); this registry lists them. A task may
also be a task file (an lm-evaluation-harness task YAML, `eval/taskfile.py`), named by its path."""

from __future__ import annotations

from ...registry import Registry
from ..task import Task
from . import flores, gsm8k, humaneval, qa

TASKS: Registry[Task] = Registry("task", [*qa.TASKS, *gsm8k.TASKS, *flores.TASKS, *humaneval.TASKS])


def get_task(name: str) -> Task:
    """A built-in task by name, or the task of a task file (`path/to/task.yaml`), whose
    `name` is then its absolute path: the name runs and calibrations record."""
    if name in TASKS:
        return TASKS.get(name)
    if name.startswith("lm-eval:"):  # a task that lm-eval itself runs
        from ..lm_eval_task import load_lm_eval_task

        return load_lm_eval_task(name)
    from ..taskfile import is_task_file, load_task_file  # here: taskfile reads the built-in tasks' rules

    if is_task_file(name):
        return load_task_file(name)
    return TASKS.get(name)  # unknown: "did you mean"


def task_names() -> list[str]:
    return TASKS.names()
