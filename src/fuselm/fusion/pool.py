"""The threads on which a built method runs a round's expert calls side by side (`each`, in
fusion/experts.py): owned by the method, started at the first call that needs one, at most
`size` at once, closed with the method."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

# Calls in flight at once on one method's pool: its live experts times the generations that run
# on it at once (an eval's `concurrency`, a served replica's `max_concurrent`). Threads start
# only as calls need them.
EXPERT_THREADS = 64


class ExpertPool:
    """A thread pool made at its first `submit` and shut down by `close` (a later `submit`
    makes a fresh one)."""

    def __init__(self, size: int = EXPERT_THREADS):
        if size < 1:
            raise ValueError("an expert pool needs at least one thread")
        self.size = size
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=self.size, thread_name_prefix="fuselm-expert")
            return self._executor.submit(fn, *args)

    def close(self) -> None:
        """Wait for the calls in flight (each() waits for its own anyway) and end the threads."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)
