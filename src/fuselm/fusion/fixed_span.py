"""`fixed-span`: fusion at a fixed granularity of n words, scored like AdaFuse (n = 1: word level).

Policy "anchored", as AdaFuse's: while the anchor's margin at the span's first token is at least
`theta`, it commits its span alone and no other model is asked; where it is unsure, every model
proposes a span and all score them, and another model's span wins only if its combined NLL is
lower than the anchor's by `override_margin`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..conventions import OFFERS_ROLLOUT, OFFERS_SCORE
from .base import Step, StepContext
from .ensemble import Candidate, EnsembleMethod, add_candidate, anchor_stands, decided_step, roll_words
from .experts import each
from .options import OverridableOptions, work_option


class FixedSpanOptions(OverridableOptions):
    n_words: int = work_option(1, "words each model proposes per round")
    policy: Literal["vote", "anchored"] = Field(
        "vote",
        description="vote: every round scored by all models; anchored: the anchor's span while its margin is"
        " >= theta, the others override it only by override_margin where it is unsure",
    )


class FixedSpan(EnsembleMethod):
    name = "fixed-span"
    description = "fusion at a fixed span of n words per round, ensemble-scored"
    Options = FixedSpanOptions
    needs = frozenset({OFFERS_ROLLOUT, OFFERS_SCORE})

    def step(self, ctx: StepContext) -> Step:
        o = self.options
        max_tokens = min(ctx.budget, o.n_words * o.max_word_tokens)
        anchor = margins = None
        if self.anchor is not None:
            anchor = self.live_anchor(ctx)
            _, margin = self.anchor_top(ctx, anchor)
            if margin >= o.theta:  # sure: its span stands, no other model asked
                r = roll_words(ctx.sessions[anchor], o.n_words, max_tokens)
                return self.anchor_alone(anchor, r.text, r.finished, r.text_tokens, margin)
            margins = {self.names[anchor]: round(margin, 5)}
        pool: list[Candidate] = []
        rolls = each(ctx, lambda m, s: roll_words(s, o.n_words, max_tokens))
        for m, r in rolls.items():
            add_candidate(
                pool,
                Candidate(r.text, eos=r.finished and not r.text, proposers=[m], tokens={m: max(r.text_tokens, 1)}),
            )
        decision = self.decide(ctx, pool) if len(pool) > 1 else None
        winner, overridden = (decision.winner if decision else 0), None
        if anchor is not None and decision is not None:
            winner, overridden = anchor_stands(pool, decision, anchor, o.override_margin)
        w = pool[winner]
        src = w.proposers[0]
        finished = w.eos or (rolls[src].finished and rolls[src].text == w.text)
        return decided_step(
            pool, winner, decision, self.names, finished, confident=decision is None, margins=margins,
            detail_type=self.Detail, overridden=overridden,
        )  # fmt: skip
