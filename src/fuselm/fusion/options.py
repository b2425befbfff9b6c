"""Option models shared by the ensemble methods."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class EnsembleOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    weights: list[float] | None = Field(None, description="per-model weights in the ensemble score (default: equal)")
    normalize: Literal["token", "char", "byte"] = Field(
        "token", description="mean negative log-likelihood per token (paper), per character or per byte"
    )
    max_word_tokens: int = Field(16, ge=1, description="longest rollout for one word, in tokens")

    def model_weights(self, n: int) -> list[float]:
        from ..errors import FuselmError

        if self.weights is None:
            return [1.0] * n
        if len(self.weights) != n or any(w <= 0 for w in self.weights):
            raise FuselmError(f"weights must be {n} positive numbers, one per model; got {self.weights}")
        return list(self.weights)
