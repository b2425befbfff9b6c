"""`token-average`: models sharing one vocabulary; weighted average of next-token probabilities."""

from __future__ import annotations

import torch

from ..errors import FuselmError
from ..models.backend import same_vocabulary
from .base import Step, StepContext
from .ensemble import EnsembleMethod
from .registry import register


def mix(logprobs: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """log of the weighted average of the models' probabilities."""
    w = torch.tensor(weights, dtype=torch.float32) / sum(weights)
    stacked = torch.stack(logprobs) + torch.log(w)[:, None]
    return torch.logsumexp(stacked, 0)


@register("token-average")
class TokenAverage(EnsembleMethod):
    def __init__(self, models, generation, options=None):
        super().__init__(models, generation, options)
        first = models[0].backend
        for m in models[1:]:
            if not same_vocabulary(first, m.backend):
                raise FuselmError(
                    f"token-average needs models with one vocabulary; {first.info.name!r} and {m.name!r} differ "
                    "(use adafuse, unite or fixed-span across tokenizers)"
                )

    def step(self, ctx: StepContext) -> Step:
        sessions = ctx.sessions
        toks: list[int] = []
        text = ""
        first = [s.next_logprobs() for s in sessions]
        # one token, or a few when a token is half a UTF-8 character
        for _ in range(min(8, ctx.budget)):
            lps = [s.tail_logprobs(len(toks)) for s in sessions] if toks else first
            tok = self.sampler(mix(lps, self.weights))
            if sessions[0].is_eos(tok):
                return Step(text=text, new_tokens=max(len(toks), 1), source=0, finished=True)
            toks.append(tok)
            rolls = [s.replay(toks) for s in sessions]
            text = rolls[0].text
            if not text.endswith("\ufffd"):
                break
        # credit the model that gave the chosen token the highest probability
        source = max(range(len(sessions)), key=lambda m: (float(first[m][toks[0]]), -m))
        return Step(text=text, new_tokens=len(toks), source=source)
