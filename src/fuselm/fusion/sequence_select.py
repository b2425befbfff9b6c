"""`sequence-select`: each model answers in full; the answer with the best ensemble score wins."""

from __future__ import annotations

from ..conventions import OFFERS_ROLLOUT, OFFERS_SCORE
from ..text.words import earliest_stop
from .base import Step, StepContext
from .ensemble import Candidate, EnsembleMethod, add_candidate, decided_step
from .experts import each


class SequenceSelect(EnsembleMethod):
    name = "sequence-select"
    description = "each model answers in full; the answer with the best ensemble score wins"
    needs = frozenset({OFFERS_ROLLOUT, OFFERS_SCORE})

    def step(self, ctx: StepContext) -> Step:
        stops = ctx.generation.stop

        def until(r):
            return earliest_stop(r.text, stops) if stops else None

        pool: list[Candidate] = []
        rolls = each(ctx, lambda m, s: s.rollout(ctx.budget, until=until, choose=ctx.sampler, margins=False))
        for m, r in rolls.items():
            add_candidate(pool, Candidate(r.text, eos=not r.text, proposers=[m], tokens={m: max(r.text_tokens, 1)}))
        decision = self.decide(ctx, pool) if len(pool) > 1 else None
        return decided_step(
            pool, decision.winner if decision else 0, decision, self.names, True, confident=decision is None
        )
