"""Typed results: what a generation made, what it cost and how each step was decided.

The same types are what `generate --json` prints, what the eval runner stores per row, what the
HTML view renders and what the server returns, so a field read anywhere is a field defined here.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

FinishReason = Literal["eos", "stop", "length", "stalled"]


def unique_names(names: list[str]) -> list[str]:
    """Model names made unique for per-model entries (a model used twice becomes NAME#2)."""
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}#{seen[n]}")
    return out


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CandidateTrace(_Record):
    """One candidate of a round, as the ensemble methods saw it."""

    text: str
    eos: bool = False
    kind: Literal["proposal", "branch", "token"] = "proposal"
    proposers: list[str] = Field(default_factory=list)
    nll: dict[str, float | None] | None = None  # each model's mean NLL (when scored)
    score: float | None = None  # the combined score (lower wins)
    p: float | None = None  # unite: the weighted average probability (higher wins)


class StepDetail(_Record):
    """What any method may say about one of its steps beyond the text (every field optional:
    each method fills what it knows). A method with more to say owns a subclass beside its code
    (its `Detail`: adafuse's override, token-average's probabilities, FusionRoute's routes), with
    `notes()` for how its own fields read in the trace view; no shared file lists them."""

    confident: bool | None = None  # committed without cross-model scoring
    margins: dict[str, float] | None = None  # each model's top-1 minus top-2 probability
    candidates: list[CandidateTrace] = Field(default_factory=list)
    winner: int | None = None  # index into candidates

    def notes(self) -> list[str]:
        """Lines about the method's own fields, for the trace view (none here)."""
        return []


class _StepCore(_Record):
    round: int  # 1-based
    text: str  # the text the step proposed (a stop string may cut what was committed)
    source: str | None  # the model whose proposal won
    new_tokens: int
    dropped: dict[str, str] | None = None  # experts that failed in this step and were dropped, and why


class TextSpan(_Record):
    """A piece of committed text and the model whose proposal it came from (None: no one model)."""

    text: str
    source: str | None = None


class TraceStep(StepDetail, _StepCore):
    """One step of the decoding loop: what every step has (round, text, source, tokens), then
    the method's detail. A method's own detail fields ride along flat, as its `Detail` type
    validated them when the step was made (`detail_of` reads them back typed)."""

    model_config = ConfigDict(extra="allow")

    def detail_of(self, detail_type: type[StepDetail]) -> StepDetail:
        """This step's detail as the method's own type (unknown fields refused)."""
        core = set(_StepCore.model_fields)
        return detail_type.model_validate({k: v for k, v in self.model_dump().items() if k not in core})


class GenerationStats(_Record):
    """Per generation; per-model entries are keyed by model name (a name used twice gets #2),
    and include every session the method ran (a FusionRoute router among them)."""

    new_tokens: int
    seconds: float
    tokens_per_second: float | None
    forward_passes: dict[str, int]
    tokens_forwarded: dict[str, int]
    prompt_tokens: dict[str, int]
    cached_prompt_tokens: dict[str, int]
    text_share: dict[str, float]
    rounds: int


class GenerationResult(_Record):
    text: str
    models: list[str]
    method: str
    finish_reason: FinishReason
    stats: GenerationStats
    trace: list[TraceStep] = Field(default_factory=list)

    def to_dict(self, with_trace: bool = True) -> dict[str, Any]:
        """As JSON data (`generate --json`); detail fields a method did not fill are left out."""
        return self.model_dump(mode="json", exclude=None if with_trace else {"trace"}, exclude_none=True)
