"""What a decoding method is: one step over the models' sessions, repeated by the shared loop."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from ..config import GenerationConfig
from ..errors import FuselmError
from ..models.loading import Model
from ..models.session import DecodingSession
from ..sampling import Sampler


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass
class Step:
    """What one step of a method decided."""

    text: str  # text to commit after the current text
    new_tokens: int  # tokens generated for it (counts against max_new_tokens)
    source: int | None = None  # index of the model whose proposal won
    finished: bool = False  # end of sequence chosen
    trace: dict[str, Any] | None = None


@dataclass
class StepContext:
    sessions: list[DecodingSession]
    budget: int  # tokens left
    generated: str  # text committed so far (after the prompt)
    extras: dict[str, Any] = field(default_factory=dict)


class FusionMethod(ABC):
    """A decoding method. Subclasses implement `step`; the loop in `fusion.loop` does the rest."""

    name: ClassVar[str] = "?"
    Options: ClassVar[type[BaseModel]] = NoOptions
    min_models: ClassVar[int] = 1
    max_models: ClassVar[int | None] = None

    def __init__(self, models: list[Model], generation: GenerationConfig, options: BaseModel | None = None):
        self.validate_models(len(models))
        self.models = models
        self.generation = generation
        self.options = options if options is not None else self.Options()
        self.sampler = Sampler(generation.temperature, generation.top_k, generation.top_p, generation.seed)

    @classmethod
    def validate_models(cls, n: int) -> None:
        if n < cls.min_models or (cls.max_models is not None and n > cls.max_models):
            want = str(cls.min_models) if cls.max_models == cls.min_models else f"at least {cls.min_models}"
            if cls.max_models is not None and cls.max_models != cls.min_models:
                want = f"{cls.min_models} to {cls.max_models}"
            raise FuselmError(f"method {cls.name!r} takes {want} model(s), got {n}")

    @abstractmethod
    def step(self, ctx: StepContext) -> Step:
        """Decide the next span of text."""
