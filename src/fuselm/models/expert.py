"""Expert: a model as the decoding methods use it, whatever runs it. `load_model` returns one:
a `Model` (in this process), a `DeferredModel` (in this process, loaded at its first use) or a
`RemoteModel` (on a serving engine). Its sessions are :class:`fuselm.models.session.Session`.

What differs between them is said by each as a capability, never asked as "where does it run":
`offers` (what its sessions can do, matched against a method's `needs`), `works_in_process`,
`vocab_size` (None where it is not told)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from ..config import GenerationConfig, ModelConfig
from .prompts import Prompt
from .session import Session


class Expert(ABC):
    """A model: its sessions, its tokenizer, its prompt rendering, what it offers."""

    config: ModelConfig
    offers: frozenset[str]  # what its sessions can do (fuselm.conventions.OFFERS_*)
    # Its forward passes run in this process: they are this process's CPU time (what a
    # Stopwatch measures) and take one generation at a time. An engine batches any number.
    works_in_process: ClassVar[bool]

    @property
    @abstractmethod
    def name(self) -> str: ...

    @property
    def where(self) -> str:
        """Where it runs, as an error names it."""
        return "this process"

    @property
    @abstractmethod
    def vocab_size(self) -> int | None:
        """The size of its vocabulary; None where it is not told (an engine's)."""

    @abstractmethod
    def prompt_text(self, prompt: Prompt, gen: GenerationConfig | None = None) -> str:
        """The text the model is conditioned on: chat-templated or raw, per `gen.chat`."""

    @abstractmethod
    def tokenize(self, text: str) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: list[int]) -> str: ...

    @abstractmethod
    def session(self, prompt_text: str) -> Session:
        """A new session of one generation on `prompt_text`."""

    @abstractmethod
    def with_config(self, config: ModelConfig) -> Expert:
        """The same model under another config (another ensemble weight), sharing what is loaded
        or connected."""

    @abstractmethod
    def close(self) -> None: ...
