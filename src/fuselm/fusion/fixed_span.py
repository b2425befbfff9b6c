"""`fixed-span`: fusion at a fixed granularity of n words, scored like AdaFuse (n = 1: word level)."""

from __future__ import annotations

from pydantic import Field

from ..models.backend import OFFERS_ROLLOUT, OFFERS_SCORE
from .base import Step, StepContext
from .ensemble import Candidate, EnsembleMethod, add_candidate, decided_step, roll_words
from .experts import each
from .options import EnsembleOptions


class FixedSpanOptions(EnsembleOptions):
    n_words: int = Field(1, ge=1, description="words each model proposes per round")


class FixedSpan(EnsembleMethod):
    name = "fixed-span"
    description = "fusion at a fixed span of n words per round, ensemble-scored"
    Options = FixedSpanOptions
    needs = frozenset({OFFERS_ROLLOUT, OFFERS_SCORE})

    def step(self, ctx: StepContext) -> Step:
        o = self.options
        pool: list[Candidate] = []
        rolls = each(ctx, lambda m, s: roll_words(s, o.n_words, min(ctx.budget, o.n_words * o.max_word_tokens)))
        for m, r in rolls.items():
            add_candidate(
                pool,
                Candidate(r.text, eos=r.finished and not r.text, proposers=[m], tokens={m: max(r.text_tokens, 1)}),
            )
        decision = self.decide(ctx, pool) if len(pool) > 1 else None
        winner = decision.winner if decision else 0
        w = pool[winner]
        src = w.proposers[0]
        finished = w.eos or (rolls[src].finished and rolls[src].text == w.text)
        return decided_step(pool, winner, decision, self.names, finished, confident=decision is None)
