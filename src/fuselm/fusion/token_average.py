"""`token-average`: models sharing one vocabulary; weighted average of next-token probabilities."""

from __future__ import annotations

import torch

from ..models.backend import OFFERS_FULL
from ..result import CandidateTrace, StepDetail
from .base import Step, StepContext
from .ensemble import EnsembleMethod


def mix(logprobs: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """log of the weighted average of the models' probabilities."""
    w = torch.tensor(weights, dtype=torch.float32) / sum(weights)
    stacked = torch.stack(logprobs) + torch.log(w)[:, None]
    return torch.logsumexp(stacked, 0)


class TokenAverage(EnsembleMethod):
    needs = frozenset({OFFERS_FULL})  # it averages whole distributions
    name = "token-average"
    description = "weighted average of next-token probabilities (models sharing one vocabulary)"
    same_vocabulary = True

    def step(self, ctx: StepContext) -> Step:
        sessions = ctx.sessions
        toks: list[int] = []
        text = ""
        first = [s.next_logprobs() for s in sessions]
        # one token, or a few when a token is half a UTF-8 character
        for _ in range(min(8, ctx.budget)):
            lps = [s.tail_logprobs(len(toks)) for s in sessions] if toks else first
            tok = ctx.sampler(mix(lps, self.weights))
            if sessions[0].is_eos(tok):
                return Step(text=text, new_tokens=max(len(toks), 1), source=0, finished=True)
            toks.append(tok)
            rolls = [s.replay(toks) for s in sessions]
            text = rolls[0].text
            if not text.endswith("\ufffd"):
                break
        # credit the model that gave the chosen token the highest probability
        source = max(range(len(sessions)), key=lambda m: (float(first[m][toks[0]]), -m))
        detail = StepDetail(
            candidates=[CandidateTrace(text=text, kind="token", proposers=[self.names[source]])],
            winner=0,
            token_probs={n: round(float(lp[toks[0]].exp()), 5) for n, lp in zip(self.names, first)},
        )
        return Step(text=text, new_tokens=len(toks), source=source, detail=detail)
