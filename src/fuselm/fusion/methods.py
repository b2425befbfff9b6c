"""The registry of decoding methods, and building a method for a run."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from ..config import validation_message
from ..errors import FuselmError
from ..models.expert import Expert
from ..registry import Registry
from .adafuse import AdaFuse
from .base import FusionMethod
from .fixed_span import FixedSpan
from .fusionroute import ExpertRoute, FusionRoute, OracleRoute
from .options import PATH, marked
from .sequence_select import SequenceSelect
from .single import Single
from .token_average import TokenAverage
from .unite import Unite

METHODS: Registry[type[FusionMethod]] = Registry(
    "method", [Single, AdaFuse, FixedSpan, SequenceSelect, TokenAverage, Unite, FusionRoute, ExpertRoute, OracleRoute]
)
# The method options that name a file or a directory (a controller, a router), as each method's
# options mark them (fusion/options.py: path_option): made absolute where they are recorded,
# resolved beside a calibration file, refused in a served request.
PATH_OPTIONS: frozenset[str] = frozenset(name for cls in METHODS.values() for name in marked(cls.Options, PATH))


def method_options(name: str, options: dict[str, Any] | BaseModel | None) -> BaseModel:
    """The method's validated options (one-line error naming the method otherwise)."""
    cls = METHODS.get(name)
    if isinstance(options, cls.Options):
        return options
    try:
        return cls.Options(**(options or {}))
    except ValidationError as e:
        raise FuselmError(validation_message(e, f"options of method {name!r}", cls.Options)) from None


def check_method(name: str, n_models: int, options: dict[str, Any] | None) -> None:
    """What can be checked before any model is loaded: the name, the model count, the options."""
    METHODS.get(name).validate_models(n_models)
    method_options(name, options)


def build_method(name: str, models: list[Expert], options: dict[str, Any] | BaseModel | None = None) -> FusionMethod:
    """The method `name` over `models`, built once for a run (it validates its models, loads what it
    runs itself) and used for any number of prompts."""
    cls = METHODS.get(name)
    cls.validate_models(len(models))
    for m in models:
        if cls.needs - m.offers:
            cls.check_offers([m], [n for n in METHODS.names() if METHODS.get(n).needs <= m.offers])
    return cls(models, method_options(name, options))
