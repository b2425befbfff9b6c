"""One generic registry: name -> class or factory, with "did you mean" and a listing.

Methods, tasks, bundled models and engine kinds each have one; served setups can use the same.
A registry is filled explicitly by the package that owns the entries (no import side effects).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

from .errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries of one kind by name; `kind` names them in errors ("unknown method 'adafsue'")."""

    def __init__(self, kind: str, entries: Iterable[T] = (), name_of: Callable[[T], str] | None = None):
        self.kind = kind
        self._name_of = name_of or (lambda e: e.name)  # type: ignore[attr-defined]
        self._entries: dict[str, T] = {}
        for e in entries:
            self.add(e)

    def add(self, entry: T, name: str | None = None) -> T:
        key = name or self._name_of(entry)
        if key in self._entries:
            raise ValueError(f"{self.kind} {key!r} registered twice")
        self._entries[key] = entry
        return entry

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(self.kind, name, self._entries) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def describe(self, describe: Callable[[T], str]) -> list[tuple[str, str]]:
        """(name, one-line description) for every entry, sorted: for --help and listings."""
        return [(n, describe(self._entries[n])) for n in self.names()]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def values(self) -> list[T]:
        return list(self._entries.values())

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())
