"""`single`: one model decoding on its own (greedy or sampled)."""

from __future__ import annotations

from ..conventions import OFFERS_ROLLOUT
from .base import FusionMethod, Step, StepContext


def complete_text(roll) -> int | None:
    """Cut after any complete text: one token at a time, but never half a UTF-8 character."""
    return len(roll.text) if roll.text else None


class Single(FusionMethod):
    name = "single"
    description = "one model decoding on its own (greedy or sampled)"
    min_models = 1
    max_models = 1
    needs = frozenset({OFFERS_ROLLOUT})

    def step(self, ctx: StepContext) -> Step:
        roll = ctx.sessions[0].rollout(ctx.budget, until=complete_text, choose=ctx.sampler, margins=False)
        # counted by offsets: a text-only engine's rollout has no token ids (TextSession)
        return Step(text=roll.text, new_tokens=len(roll.token_offsets), source=0, finished=roll.finished)
