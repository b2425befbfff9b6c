"""The result of a generation: text, who made it, what it cost, and how it was decided."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class GenerationResult:
    text: str
    models: list[str]
    method: str
    finish_reason: str  # "eos", "stop", "length" or "stalled"
    stats: dict[str, Any]
    trace: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self, with_trace: bool = True) -> dict[str, Any]:
        d = asdict(self)
        if not with_trace:
            d.pop("trace")
        return d
