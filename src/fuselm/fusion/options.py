"""Option models shared by the ensemble methods."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import FuselmError

# A weight's ratio to another is what counts; beyond these, sums of weights overflow or underflow
# (float32 averages of probabilities) and the average is NaN.
MIN_WEIGHT, MAX_WEIGHT = 1e-6, 1e6

# Marks on option fields, read by whoever must treat such options apart: a server bounds the
# work options per request and refuses the path options (`serve.bounds`); a run records the
# digest of the file a path option names (`eval.records`).
WORK = "fuselm_work"  # how much a step computes (candidates, branches, tokens per word)
PATH = "fuselm_path"  # names a file or directory on this machine


def work_option(default: int, description: str, ge: int = 1) -> Any:
    """An integer option that sets how much a step computes."""
    return Field(default, ge=ge, description=description, json_schema_extra={WORK: True})


def path_option(description: str, default: Any = None) -> Any:
    """An option that names a file or directory (a controller, a router)."""
    return Field(default, description=description, json_schema_extra={PATH: True})


def marked(options: type[BaseModel], mark: str) -> dict[str, Any]:
    """The fields of an options model that carry `mark`, with their defaults."""
    return {
        name: f.default
        for name, f in options.model_fields.items()
        if isinstance(f.json_schema_extra, dict) and f.json_schema_extra.get(mark)
    }


class EnsembleOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # a NaN weight would decide nothing

    weights: list[Annotated[float, Field(ge=MIN_WEIGHT, le=MAX_WEIGHT)]] | None = Field(
        None, description="per-model weights in the ensemble score (default: each model's `weight`, 1)"
    )
    normalize: Literal["token", "char", "byte"] = Field(
        "token", description="mean negative log-likelihood per token (paper), per character or per byte"
    )
    max_word_tokens: int = work_option(16, "longest rollout for one word, in tokens")
    combine: Literal["mean", "median", "trimmed"] = Field(
        "mean",
        description="how the models' NLLs of a candidate combine: weighted mean (paper), weighted median, or"
        " trimmed (the mean without each candidate's highest and lowest, with 3 models or more)",
    )
    prompt_weights: float | None = Field(
        None,
        gt=0.0,
        description="per-prompt weights (PackLLM): softmax(-each model's NLL per byte of the prompt / this temperature),"
        " times its weight",
    )

    def model_weights(self, defaults: list[float]) -> list[float]:
        """The `weights` option, checked against the models; without it, `defaults` (the models'
        configured weights)."""
        n = len(defaults)
        if self.weights is None:
            return list(defaults)
        if len(self.weights) != n or any(w <= 0 for w in self.weights):
            raise FuselmError(f"weights must be {n} positive numbers, one per model; got {self.weights}")
        return list(self.weights)


class AnchoredOptions(EnsembleOptions):
    """Options of the methods with a policy "anchored": one trusted model, the anchor (calibration
    picks the best member on dev rows), decides alone while its top-1/top-2 margin is at least
    `theta`. Each method names its policies (`policy` is narrowed there)."""

    policy: str = "anchored"
    anchor: str | int | None = Field(
        None, description="policy anchored: the trusted model, by name or index (default: the first model)"
    )
    theta: float = Field(0.7, ge=0.0, le=1.0, description="policy anchored: the anchor's margin to decide alone")

    @model_validator(mode="after")
    def _anchor_is_anchored(self) -> AnchoredOptions:
        if self.anchor is not None and self.policy != "anchored":
            raise ValueError("anchor needs policy anchored (-O policy=anchored)")
        return self


class OverridableOptions(AnchoredOptions):
    """Anchored methods that score candidates: where the anchor is unsure, another model's
    candidate overrides its proposal only when clearly better."""

    override_margin: float = Field(
        0.0, ge=0.0, description="policy anchored: how much lower another candidate's combined NLL must be"
    )


class TokenFusionOptions(AnchoredOptions):
    """Options of the methods that fuse one token per step (`token-average`, `unite`)."""

    policy: Literal["average", "anchored"] = Field(
        "average",
        description="average: every token by the weighted average; anchored (GaC's gate): the anchor's own token"
        " while its top-1/top-2 margin is >= theta, no other model asked, and the average only where it is unsure",
    )
