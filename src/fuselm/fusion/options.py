"""Option models shared by the ensemble methods."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..errors import FuselmError


class EnsembleOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    weights: list[float] | None = Field(
        None, description="per-model weights in the ensemble score (default: each model's `weight`, 1)"
    )
    normalize: Literal["token", "char", "byte"] = Field(
        "token", description="mean negative log-likelihood per token (paper), per character or per byte"
    )
    max_word_tokens: int = Field(16, ge=1, description="longest rollout for one word, in tokens")
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
