"""What a decoding method is: built once per run over its models, then one `step` at a time over
a generation's sessions, repeated by the shared loop (`fusion.loop`).

A method object holds only what a run fixes (models, options, a loaded router): many
generations may use one method object, one after another or at once, so everything that belongs
to one generation (sessions, sampler, round counter, the method's own per-generation state)
comes in the :class:`StepContext`.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from ..config import GenerationConfig, ModelConfig
from ..conventions import OFFER_WORDS, OFFERS_FULL, OFFERS_ROLLOUT, OFFERS_SCORE, OFFERS_TOPK
from ..errors import FuselmError
from ..models.backend import require_one_vocabulary
from ..models.expert import Expert
from ..models.session import Session
from ..result import StepDetail, unique_names
from ..sampling import Sampler
from .pool import ExpertPool

log = logging.getLogger("fuselm")


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass
class Step:
    """What one step of a method decided."""

    text: str  # text to commit after the current text
    new_tokens: int  # tokens generated for it (counts against max_new_tokens)
    source: int | None = None  # index of the model whose proposal won
    finished: bool = False  # end of sequence chosen
    detail: StepDetail | None = None  # how it was decided (the trace adds text, source, round)


@dataclass
class StepContext:
    """One generation as a method's step sees it."""

    sessions: list[Session]  # one per model, then any the method opened (see open_sessions)
    budget: int  # tokens left
    generated: str  # text committed so far (after the prompt)
    round: int  # 1-based number of this step
    generation: GenerationConfig
    sampler: Sampler
    reference: str | None = None  # the row's reference text, for methods that follow one
    state: Any = None  # what the method's `start` returned for this generation
    dropped: dict[int, str] = field(default_factory=dict)  # experts dropped after a failure, and why
    # threads for the expert calls that run side by side (fusion.experts.each): the method's
    # (decode passes it); a context made without a method gets one of its own
    pool: ExpertPool = field(default_factory=ExpertPool)

    @property
    def live(self) -> list[int]:
        """The sessions still in the generation (all, unless an expert was dropped)."""
        return [m for m in range(len(self.sessions)) if m not in self.dropped]


@dataclass(frozen=True)
class GridContext:
    """What a calibration knows when it asks each method which setups to try on its dev rows
    (`FusionMethod.calibration_setups`)."""

    members: list[ModelConfig]  # every model given, in order
    kept: list[ModelConfig]  # those within the gap of the best dev score: the equal-vote setups' members
    kept_weights: list[float]  # quality weights of the kept members (the best reference NLL over each one's)
    weights: list[float]  # quality weights of every member
    ranked: list[str]  # member names, best first on the dev rows
    anchor: str  # the member every setup is measured against
    thetas: list[float]  # anchored setups: the anchor's confidence thresholds to try
    margins: list[float]  # anchored setups: the others' override margins to try
    one_vocabulary: bool  # the members share one vocabulary (token-level mixing works)
    controller: str | None = None  # a learned controller for these members, trained on other rows


@dataclass(frozen=True)
class GridSetup:
    """One setup a method offers a calibration: a label, its models, its options."""

    label: str
    models: list[ModelConfig]
    options: dict[str, Any] = field(default_factory=dict)


class FusionMethod(ABC):
    """A decoding method. Subclasses implement `step`; the loop in `fusion.loop` does the rest."""

    name: ClassVar[str] = "?"
    description: ClassVar[str] = ""
    analysis_only: ClassVar[bool] = False  # needs what only an evaluation knows (a reference): never served
    Options: ClassVar[type[BaseModel]] = NoOptions
    min_models: ClassVar[int] = 1
    max_models: ClassVar[int | None] = None
    same_vocabulary: ClassVar[bool] = False  # the method mixes token ids across models
    Detail: ClassVar[type[StepDetail]] = StepDetail  # what its steps record (a subclass: its own fields)
    # What the method asks of each model's sessions (fuselm.conventions.OFFERS_*), checked against
    # what each model offers when the method is built, before any request to an engine.
    needs: ClassVar[frozenset[str]] = frozenset({OFFERS_FULL})
    # What it needs beyond `needs` to be exact; a model without it (one on an engine) is read
    # approximately, and the method says so once, when it is built (`approximate` names them).
    exact_needs: ClassVar[frozenset[str]] = frozenset()
    needs_reference: ClassVar[bool] = False  # the method follows each prompt's reference text

    def __init__(self, models: list[Expert], options: BaseModel | None = None):
        self.validate_models(len(models))
        self.check_offers(models)
        if self.same_vocabulary:
            require_one_vocabulary(self.name, models)
        self.approximate = [m.name for m in models if self.exact_needs - m.offers]
        if self.approximate:
            log.warning(
                "%s is approximate on %s: %s give top-k log-probs, not whole distributions (docs/scale-out.md)",
                self.name, ", ".join(self.approximate), "they" if len(self.approximate) > 1 else "it",
            )  # fmt: skip
        self.models = models
        self.names = unique_names([m.name for m in models])  # as the trace names them: a twin is 'name#2'
        self.options = options if options is not None else self.Options()
        self.pool = ExpertPool()  # the threads its rounds' expert calls run on (fusion.experts.each)

    @classmethod
    def calibration_setups(cls, grid: GridContext) -> list[GridSetup]:
        """The setups of this method a calibration tries (none unless the method says so)."""
        return []

    @classmethod
    def validate_models(cls, n: int) -> None:
        if n < cls.min_models or (cls.max_models is not None and n > cls.max_models):
            want = str(cls.min_models) if cls.max_models == cls.min_models else f"at least {cls.min_models}"
            if cls.max_models is not None and cls.max_models != cls.min_models:
                want = f"{cls.min_models} to {cls.max_models}"
            raise FuselmError(f"method {cls.name!r} takes {want} model(s), got {n}")

    @classmethod
    def check_offers(cls, models: list[Expert], alternatives: list[str] | None = None) -> None:
        """Fail (before any request) when a model cannot give what the method needs."""
        for m in models:
            missing = cls.needs - m.offers
            if missing:
                others = f" (methods that run on it: {', '.join(alternatives)})" if alternatives else ""
                raise FuselmError(
                    f"method {cls.name!r} needs {describe_offers(missing)}; {m.name!r} on"
                    f" {m.where} gives {describe_offers(m.offers)}{others}"
                )

    def open_sessions(self, prompt_texts: list[str]) -> list[Session]:
        """The generation's sessions: one per model (each on its own prompt rendering), in model
        order; a method that runs a model of its own (FusionRoute's router) appends its session."""
        return [m.session(text) for m, text in zip(self.models, prompt_texts)]

    def start(self, ctx: StepContext) -> Any:
        """Per-generation state, made before the first step (stored as `ctx.state`)."""
        return None

    @abstractmethod
    def step(self, ctx: StepContext) -> Step:
        """Decide the next span of text."""

    def close(self) -> None:
        """Release what the method loaded itself and its expert threads (the models belong to
        the caller); a subclass that loads more releases it and calls this."""
        self.pool.close()


# What the methods that are exact on an engine ask: AdaFuse all three (margins and branches from
# the top-k), fixed-span and sequence-select rollouts and scores, single only rollouts.
EXACT_NEEDS = frozenset({OFFERS_TOPK, OFFERS_ROLLOUT, OFFERS_SCORE})


def describe_offers(offers: frozenset[str]) -> str:
    return ", ".join(OFFER_WORDS[o] for o in sorted(offers))
