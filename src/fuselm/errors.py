"""User-facing errors: one line that says what is wrong and what to do."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class FuselmError(Exception):
    """An error caused by input or environment, shown to users as one line (no traceback)."""


class UnknownNameError(FuselmError, KeyError):
    """A name that is not in a registry; the message carries a "did you mean"."""

    def __init__(self, kind: str, name: str, known: Iterable[str]):
        known = sorted(known)
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        super().__init__(f"unknown {kind} {name!r}.{hint} Known: {', '.join(known)}.")
        self.name = name
        self.kind = kind
        self.suggestion = close[0] if close else None

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class EngineError(FuselmError):
    """A serving engine (an expert in another process) that did not answer, or answered
    something fuselm cannot use; the message names the expert and the engine."""
