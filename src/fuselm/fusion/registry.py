"""One registry of decoding methods, filled by a decorator."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import UnknownNameError

if TYPE_CHECKING:
    from .base import FusionMethod

METHODS: dict[str, type["FusionMethod"]] = {}


def register(name: str):
    """Class decorator: make a :class:`FusionMethod` available as `--method NAME`."""

    def wrap(cls):
        if name in METHODS:
            raise ValueError(f"method {name!r} registered twice")
        cls.name = name
        METHODS[name] = cls
        return cls

    return wrap


def get_method(name: str) -> type["FusionMethod"]:
    _load_builtin()
    try:
        return METHODS[name]
    except KeyError:
        raise UnknownNameError("method", name, METHODS) from None


def method_names() -> list[str]:
    _load_builtin()
    return sorted(METHODS)


def _load_builtin() -> None:
    from . import adafuse, fixed_span, fusionroute, sequence_select, single, token_average, unite  # noqa: F401,I001
