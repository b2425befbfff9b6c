"""`unite`: union of each model's top-k tokens, mapped across vocabularies through their text (UniTE).

Each model's top-k next tokens are turned into text in context. For every text in the union,
each model's probability is that of the first token of its own tokenization of the text (exact
when the text is one token of that model, UniTE's approximation otherwise). The text with the
highest weighted average probability is committed.

A model on an engine gives its top-k (20 on vLLM and SGLang) instead of its whole distribution:
a text whose first token is outside that top-k counts as probability 0 for it (approximate).
"""

from __future__ import annotations

import math

import torch

from ..conventions import OFFERS_FULL, OFFERS_TOPK
from ..models.session import NextTokens, common_prefix_len
from ..result import CandidateTrace, StepDetail
from .base import Step, StepContext
from .ensemble import TokenFusionMethod
from .options import TokenFusionOptions, work_option


class UniteOptions(TokenFusionOptions):
    top_k: int = work_option(10, "tokens taken from each model's distribution")


class UniteDetail(StepDetail):
    p_eos: float | None = None  # the ensemble's end-of-sequence probability

    def notes(self) -> list[str]:
        return [] if self.p_eos is None else [f"p(end): {self.p_eos:.3f}"]


class Unite(TokenFusionMethod):
    needs = frozenset({OFFERS_TOPK})
    exact_needs = frozenset({OFFERS_FULL})  # it reads each model's probability of the others' tokens
    name = "unite"
    description = "union of each model's top-k tokens, mapped across vocabularies by their text (UniTE)"
    Detail = UniteDetail
    Options = UniteOptions

    def _prob_of_text(self, s, dist: NextTokens, text: str) -> float:
        target = s.committed_ids()
        full = s.tokenize(s.prompt + s.text + text)
        k = common_prefix_len(target, full)
        if k != len(target) or k >= len(full):
            return 0.0  # the text re-tokenizes the boundary: no single next token stands for it
        return math.exp(dist.logprob(full[k]))

    def step(self, ctx: StepContext) -> Step:
        k = self.options.top_k
        voters, margins = self.voters(ctx, k)
        sessions = [ctx.sessions[m] for m in voters]
        lps = [s.next_tokens(k) for s in sessions]
        union: dict[str, list[int]] = {}
        eos_votes = 0.0
        all_weights = self.weights_for(ctx)
        weights = [all_weights[m] for m in voters]
        total_w = sum(weights)
        for m, w, s, lp in zip(voters, weights, sessions, lps):
            eos_votes += w * lp.prob(s.eos_ids) / total_w
            for tok in lp.best(k):
                if s.is_eos(tok):
                    continue
                t = s.continuation_text([tok])
                if t and "\ufffd" not in t:
                    union.setdefault(t, []).append(m)
        scored = []
        for text, proposers in union.items():
            p = sum(w * self._prob_of_text(s, lp, text) for w, s, lp in zip(weights, sessions, lps)) / total_w
            scored.append((p, text, proposers))
        scored.sort(key=lambda x: (-x[0], x[1]))
        candidates = [
            CandidateTrace(text=t, kind="token", p=round(p, 5), proposers=[self.names[i] for i in pr])
            for p, t, pr in scored[:8]
        ]
        confident = None if margins is None else len(voters) == 1
        if not scored or eos_votes > scored[0][0]:
            detail = self.Detail(confident=confident, margins=margins, candidates=candidates, p_eos=round(eos_votes, 5))
            return Step(text="", new_tokens=1, source=voters[0], finished=True, detail=detail)
        i = 0
        if not ctx.sampler.greedy:
            probs = torch.tensor([x[0] for x in scored])
            i = int(torch.multinomial(probs / probs.sum(), 1, generator=ctx.sampler.generator))
        p, text, proposers = scored[i]
        detail = self.Detail(
            confident=confident,
            margins=margins,
            candidates=candidates,
            winner=i if i < len(candidates) else None,
            p_eos=round(eos_votes, 5),
        )
        return Step(text=text, new_tokens=1, source=proposers[0], detail=detail)
