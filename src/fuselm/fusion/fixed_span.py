"""`fixed-span`: fusion at a fixed granularity of n words, scored like AdaFuse (n = 1: word level)."""

from __future__ import annotations

from pydantic import Field

from .base import Step, StepContext
from .ensemble import Candidate, EnsembleMethod, add_candidate, candidate_trace, ensemble_decide, roll_words
from .options import EnsembleOptions
from .registry import register


class FixedSpanOptions(EnsembleOptions):
    n_words: int = Field(1, ge=1, description="words each model proposes per round")


@register("fixed-span")
class FixedSpan(EnsembleMethod):
    Options = FixedSpanOptions

    def step(self, ctx: StepContext) -> Step:
        o = self.options
        self.round += 1
        pool: list[Candidate] = []
        rolls = []
        for m, s in enumerate(ctx.sessions):
            r = roll_words(s, o.n_words, min(ctx.budget, o.n_words * o.max_word_tokens))
            rolls.append(r)
            add_candidate(
                pool,
                Candidate(r.text, eos=r.finished and not r.text, proposers=[m], tokens={m: max(r.text_tokens, 1)}),
            )
        decision = ensemble_decide(ctx.sessions, pool, self.weights, o.normalize) if len(pool) > 1 else None
        winner = decision.winner if decision else 0
        w = pool[winner]
        src = w.proposers[0]
        trace = {
            "round": self.round,
            "confident": decision is None,
            "candidates": candidate_trace(pool, self.names, decision),
            "winner": winner,
            "text": w.text,
            "source": self.names[src],
        }
        finished = w.eos or (rolls[src].finished and rolls[src].text == w.text)
        return Step(text=w.text, new_tokens=w.tokens[src], source=src, finished=finished, trace=trace)
