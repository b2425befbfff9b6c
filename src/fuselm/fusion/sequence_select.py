"""`sequence-select`: each model answers in full; the answer with the best ensemble score wins."""

from __future__ import annotations

from ..text.words import earliest_stop
from .base import Step, StepContext
from .ensemble import Candidate, EnsembleMethod, add_candidate, candidate_trace, ensemble_decide
from .registry import register


@register("sequence-select")
class SequenceSelect(EnsembleMethod):
    def step(self, ctx: StepContext) -> Step:
        names = self.names
        stops = self.generation.stop

        def until(r):
            return earliest_stop(r.text, stops) if stops else None

        pool: list[Candidate] = []
        for m, s in enumerate(ctx.sessions):
            r = s.rollout(ctx.budget, until=until, choose=self.sampler, margins=False)
            add_candidate(pool, Candidate(r.text, eos=not r.text, proposers=[m], tokens={m: max(r.text_tokens, 1)}))
        decision = ensemble_decide(ctx.sessions, pool, self.weights, self.options.normalize) if len(pool) > 1 else None
        winner = decision.winner if decision else 0
        w = pool[winner]
        src = w.proposers[0]
        trace = {
            "round": 1,
            "confident": decision is None,
            "candidates": candidate_trace(pool, names, decision),
            "winner": winner,
            "text": w.text,
            "source": names[src],
        }
        return Step(text=w.text, new_tokens=w.tokens[src], source=src, finished=True, trace=trace)
