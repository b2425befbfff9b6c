"""The built-in tasks: each module defines its task(s); this registry lists them."""

from __future__ import annotations

from ...registry import Registry
from ..task import Task
from . import flores, gsm8k, humaneval, qa

TASKS: Registry[Task] = Registry("task", [*qa.TASKS, *gsm8k.TASKS, *flores.TASKS, *humaneval.TASKS])


def get_task(name: str) -> Task:
    return TASKS.get(name)


def task_names() -> list[str]:
    return TASKS.names()
