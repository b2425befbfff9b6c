"""The warm prompt prefix, as an object that owns it.

A few-shot evaluation runs the same long prefix (the shots) before every row. When a session on
a backend finishes, its cache (key/values and token ids) is given to the backend's
:class:`PrefixCache`; the next session opened with that prefix cache takes it, keeps the common
token prefix with its own prompt and runs only the rest (5.7x per NQ sample, see
docs/benchmarks.md). A session takes the cache when it first runs, not when it opens. Taking is
exclusive: two sessions running at once on one backend never share a cache (the second starts
empty), so they cannot disturb each other.
"""

from __future__ import annotations

import threading
from typing import Any

from .backend import Backend


class PrefixCache:
    """The cache of the last finished session on one backend, for the next session to start from."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self._held: Any = None
        self._lock = threading.Lock()

    def take(self) -> Any:
        """A cache for a new session: the kept one when it can be reused, else an empty one."""
        with self._lock:
            held, self._held = self._held, None
        if held is not None:
            if self.backend.revive(held):
                return held
            self.backend.release(held)
        return self.backend.new_cache()

    def give(self, cache: Any) -> None:
        """Keep a finished session's cache (only the last one: an older kept cache is released)."""
        with self._lock:
            old, self._held = self._held, None
        if old is not None:
            self.backend.release(old)
        if not self.backend.can_keep(cache):
            self.backend.release(cache)
            return
        with self._lock:
            old, self._held = self._held, cache
        if old is not None:  # another session finished in between
            self.backend.release(old)

    def clear(self) -> None:
        with self._lock:
            held, self._held = self._held, None
        if held is not None:
            self.backend.release(held)
