"""What engines answer, as small pydantic models (strict types, checked values), validated by
`Engine.parse` before use. Token ids are checked against the engine's vocabulary bound
(`max_id` in the validation context); log-probs are finite and at most 0 (or -inf). A
vendor's own shapes live in its module, built from the types here."""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    StrictInt,
    StrictStr,
    ValidationInfo,
    model_validator,
)

# The bound of a token id where the vocabulary's size is not known here (above any vocabulary).
MAX_TOKEN_ID = 1 << 24
# A log-prob above 0 by more than float rounding is not one.
LOGPROB_SLACK = 1e-3

_ID_KEY = re.compile(r"token_id:(-?[0-9]{1,18})", re.ASCII)
_PLAIN_ID = re.compile(r"-?[0-9]{1,18}", re.ASCII)


def _check_id(v: int, info: ValidationInfo) -> int:
    limit = (info.context or {}).get("max_id", MAX_TOKEN_ID)
    if not 0 <= v < limit:
        raise ValueError(f"token id {v} is outside the vocabulary (0 to {limit - 1})")
    return v


def _id_key(v: Any) -> Any:
    """A log-prob key of `return_tokens_as_token_ids` ("token_id:7042")."""
    m = _ID_KEY.fullmatch(v) if isinstance(v, str) else None
    if m is None:
        raise ValueError("expected a token id key (token_id:N)")
    return int(m.group(1))


def _plain_id(v: Any) -> Any:
    """A token id written as a JSON object's key ("7042")."""
    m = _PLAIN_ID.fullmatch(v) if isinstance(v, str) else None
    if m is None:
        raise ValueError("expected a token id key")
    return int(m.group(0))


def _check_logprob(v: float) -> float:
    if math.isnan(v) or v > LOGPROB_SLACK:
        raise ValueError(f"{v} is not a log-prob")
    return v


TokenId = Annotated[StrictInt, AfterValidator(_check_id)]
IdKey = Annotated[int, BeforeValidator(_id_key), AfterValidator(_check_id)]
PlainIdKey = Annotated[int, BeforeValidator(_plain_id), AfterValidator(_check_id)]
LogProb = Annotated[float, AfterValidator(_check_logprob)]


class Answer(BaseModel):
    """The base of every answer: strict types, fields fuselm does not read ignored."""

    model_config = ConfigDict(extra="ignore", strict=True)


class ServedModel(Answer):
    id: StrictStr
    max_model_len: StrictInt | None = None

    @model_validator(mode="after")
    def _positive(self) -> ServedModel:
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len {self.max_model_len} is not a length")
        return self


class ModelList(Answer):
    data: list[ServedModel]


class Tokens(Answer):
    tokens: list[TokenId]
    token_strs: list[StrictStr | None] | None = None
