"""The hooks that task files may name (`fuselm: {hook: NAME}`): the only Python behind a task file."""

from __future__ import annotations

from ...registry import Registry
from ..task import TaskHook
from . import gsm8k, humaneval

HOOKS: Registry[TaskHook] = Registry("task hook", [gsm8k.HOOK, humaneval.HOOK])
