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
from ..fusion.methods import METHODS, PATH_OPTIONS, method_options
from ..fusion.options import WORK, marked
from .config import Limits, Setup


class OptionRefused(ValueError):
    """A request's option that the server does not take; `param` names it."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def _methods_for(n_models: int) -> list[str]:
    """The methods a request may name on a setup of `n_models` models: those that run on that
    many, and never one for analysis only (it needs an evaluation's reference)."""
    out = []
    for name in METHODS.names():
        cls = METHODS.get(name)
        if cls.analysis_only:
            continue
        try:
            cls.validate_models(n_models)
        except FuselmError:  # a method that cannot run on this many models
            continue
        out.append(name)
    return out


@dataclass(frozen=True)
class MethodChoice:
    """A method and its options as a request chose them (options as given, the setup's own
    files added where the method is the setup's)."""

    name: str
    options: dict[str, Any]


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

    def resolve(
        self, setup: Setup, method: str | None, options: dict[str, Any] | None, model_names: list[str]
    ) -> MethodChoice | None:
        """The method and options a request runs with (None: the setup's own), or OptionRefused
        (or FuselmError for a method or options its method refuses). The options replace the
        setup's; the setup's files stay when the method does. Every work option is checked as
        the method will run it (given as a number or a string, or left at its default), and an
        `anchor` must be one of the models' names as the setup's traces show them (or an index)."""
        if method is None and options is None:
            return None
        name = method or setup.method
        if name not in self.methods:
            if name in METHODS and METHODS.get(name).analysis_only:
                raise OptionRefused("fuselm.method", f"method {name!r} is for analysis only: not served")
            METHODS.get(name)  # unknown: "did you mean"
        for option in options or {}:
            if option in PATH_OPTIONS:
                raise OptionRefused(
                    f"fuselm.options.{option}",
                    f"{option} names a file: a request cannot choose it (the server's operator configures it)",
                )
        if options is None:
            opts = dict(setup.method_options) if name == setup.method else {}
        else:
            opts = dict(options)
            if name == setup.method:  # the setup's own files stay
                opts.update({k: v for k, v in setup.method_options.items() if k in PATH_OPTIONS})
        anchor = (options or {}).get("anchor")
        if isinstance(anchor, str) and anchor not in model_names:
            raise OptionRefused(
                "fuselm.options.anchor", f"anchor must be one of {', '.join(model_names)} (or an index), not that"
            )
        checked = method_options(name, opts)  # the values as the method runs them
        for option, bound in self.option_max.items():
            value = getattr(checked, option, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > bound:
                given = "" if option in opts else " (the method's default: give a smaller one)"
                raise OptionRefused(
                    f"fuselm.options.{option}",
                    f"{option} is {value}{given}, at most {bound} on model {setup.id!r} here",
                )
        return MethodChoice(name, opts)
