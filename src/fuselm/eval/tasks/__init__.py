"""The built-in tasks: task files packaged here (`NAME.yaml`, one task each), read by the same
loader as any task file (`eval/taskfile.py`), with their files under the data directory
(`files_relative_to: data_dir`); the Python that some of them need beside them (`hooks.py`). A task
may also be a user's task file, named by its path."""

from __future__ import annotations

from pathlib import Path

from ...registry import Registry
from ..task import Task
from ..taskfile import is_task_file, load_task_file

TASK_DIR = Path(__file__).resolve().parent  # what `fuselm tasks` shows: copy a file to start your own

TASKS: Registry[Task] = Registry("task", [load_task_file(p, builtin=True) for p in sorted(TASK_DIR.glob("*.yaml"))])


def get_task(name: str) -> Task:
    """A built-in task by name, or the task of a task file (`path/to/task.yaml`), whose
    `name` is then its absolute path: the name runs and calibrations record."""
    if name in TASKS:
        return TASKS.get(name)
    if name.startswith("lm-eval:"):  # a task that lm-eval itself runs
        from ..lm_eval_task import load_lm_eval_task

        return load_lm_eval_task(name)
    if is_task_file(name):
        return load_task_file(name)
    return TASKS.get(name)  # unknown: "did you mean"


def task_names() -> list[str]:
    return TASKS.names()
