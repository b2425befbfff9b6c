"""What a request may choose through the `fuselm` extension, and how far.

A request may pick another method over a setup's models and other method options, but:
- never an option that names a file or directory (a controller, a router: the options each
  method marks as paths): the server reads only what its operator configured. A request that
  keeps the setup's method keeps the setup's own path options;
- every option that sets how much a step computes (the options each method marks as work:
  branches, top_k, max_words, max_word_tokens, n_words, draft_words) up to a bound: the
  operator's `limits.option_max` for that option, else `limits.option_factor` times the setup's
  own value (its method default when the setup does not set it; at least 1).

The bounds are per setup, listed on its `/v1/models` card and in the OpenAPI document.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import FuselmError
from ..fusion.methods import METHODS
from ..fusion.options import PATH, WORK, marked
from .config import Limits, Setup


class OptionRefused(ValueError):
    """A request's option that the server does not take; `param` names it."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def _methods_for(n_models: int) -> list[str]:
    out = []
    for name in METHODS.names():
        try:
            METHODS.get(name).validate_models(n_models)
        except FuselmError:  # a method that cannot run on this many models
            continue
        out.append(name)
    return out


PATH_OPTIONS = frozenset(name for cls in METHODS.values() for name in marked(cls.Options, PATH))


@dataclass(frozen=True)
class RequestBounds:
    """One setup's bounds on what a request may choose."""

    methods: tuple[str, ...]  # the methods a request may name (those that run on this many models)
    option_max: dict[str, int]  # work option -> largest value a request may give

    @classmethod
    def of(cls, setup: Setup, limits: Limits) -> RequestBounds:
        methods = _methods_for(len(setup.models))
        defaults: dict[str, int] = {}
        for name in methods:
            for option, default in marked(METHODS.get(name).Options, WORK).items():
                defaults[option] = max(defaults.get(option, 0), int(default))
        own = marked(METHODS.get(setup.method).Options, WORK)
        option_max = {}
        for option, default in sorted(defaults.items()):
            base = setup.method_options.get(option, own.get(option, default))
            given = limits.option_max.get(option)
            option_max[option] = given if given is not None else math.ceil(limits.option_factor * max(int(base), 1))
        return cls(tuple(methods), option_max)

    def check(self, setup: Setup, method: str | None, options: dict[str, Any] | None) -> dict[str, Any] | None:
        """The options a request's method runs with (None: the setup's own), or OptionRefused.
        The method's name and option values are checked by the method itself afterwards."""
        if options is None:
            return None
        for option in options:
            if option in PATH_OPTIONS:
                raise OptionRefused(
                    f"fuselm.options.{option}",
                    f"{option} names a file: a request cannot choose it (the server's operator configures it)",
                )
        for option, value in options.items():
            bound = self.option_max.get(option)
            if bound is not None and isinstance(value, int | float) and not isinstance(value, bool) and value > bound:
                raise OptionRefused(
                    f"fuselm.options.{option}", f"{option} is {value}, at most {bound} on model {setup.id!r} here"
                )
        if method in (None, setup.method):  # the setup's own files stay
            kept = {k: v for k, v in setup.method_options.items() if k in PATH_OPTIONS}
            return {**options, **kept}
        return dict(options)
