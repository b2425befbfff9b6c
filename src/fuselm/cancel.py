"""Stopping a generation from inside a step, between model calls.

A caller (the server: a client that went away, a request's deadline) hands `decode` a check;
`decode` installs it for the generation with :func:`cancel_scope`, and every model call asks
:func:`raise_if_cancelled` before it runs (a forward pass, a scoring pass, an engine request),
so a step of many calls (AdaFuse's branches, UniTE's top-k) stops at its next call, not at
the end of the step. The check lives in a context variable: the expert pool's threads run
each call in a copy of the caller's context (`fusion.experts`), so they see it too.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class GenerationCancelled(Exception):
    """A generation stopped by its caller's `cancel` (a client that went away, a deadline)."""


_CHECK: contextvars.ContextVar[Callable[[], bool] | None] = contextvars.ContextVar("fuselm_cancel", default=None)


@contextmanager
def cancel_scope(check: Callable[[], bool] | None) -> Iterator[None]:
    """Model calls made inside the block (in this context) ask `check` before they run."""
    token = _CHECK.set(check)
    try:
        yield
    finally:
        _CHECK.reset(token)


def cancelled() -> bool:
    """Whether the current generation's caller asked it to stop."""
    check = _CHECK.get()
    return check is not None and check()


def raise_if_cancelled() -> None:
    if cancelled():
        raise GenerationCancelled("cancelled by the caller")
