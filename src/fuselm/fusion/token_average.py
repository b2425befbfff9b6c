"""`token-average`: models sharing one vocabulary; weighted average of next-token probabilities.

In process the average is over whole distributions. A model on an engine gives its top-k (20 on
vLLM and SGLang): the average is then over the union of the models' top-k, a token outside a
model's top-k counting as probability 0 for it (approximate; exact for the greedy choice
whenever the winner is in every model's top-k, or the others' missing mass cannot overturn it).
"""

from __future__ import annotations

import math

import torch

from ..conventions import OFFERS_FULL, OFFERS_TOPK
from ..models.session import NextTokens
from ..result import CandidateTrace, StepDetail
from .base import GridContext, GridSetup, Step, StepContext
from .ensemble import TokenFusionMethod

TOP_K = 20  # tokens asked of a model on an engine, and taken from a whole distribution beside one


def mix(logprobs: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """log of the weighted average of the models' probabilities."""
    w = torch.tensor(weights, dtype=torch.float32) / sum(weights)
    stacked = torch.stack(logprobs) + torch.log(w)[:, None]
    return torch.logsumexp(stacked, 0)


def mix_tokens(dists: list[NextTokens], weights: list[float]) -> torch.Tensor:
    """:func:`mix` of whole distributions, or, when any is a top-k only, over the union of the
    known tokens (every other token at -inf)."""
    if all(d.exact for d in dists):
        return mix([d.full for d in dists], weights)  # type: ignore[misc]
    ids = sorted({t for d in dists for t in d.best(TOP_K)})
    total = sum(weights)
    out = torch.full((ids[-1] + 1,), -math.inf)
    for t in ids:
        p = sum(w * math.exp(d.logprob(t)) for w, d in zip(weights, dists)) / total
        out[t] = math.log(p) if p > 0 else -math.inf
    return out


class TokenAverageDetail(StepDetail):
    token_probs: dict[str, float] | None = None  # each model's probability of the chosen token

    def notes(self) -> list[str]:
        return (
            ["p(token): " + ", ".join(f"{k} {v:.2f}" for k, v in self.token_probs.items())] if self.token_probs else []
        )


class TokenAverage(TokenFusionMethod):
    needs = frozenset({OFFERS_TOPK})
    exact_needs = frozenset({OFFERS_FULL})  # it averages whole distributions
    name = "token-average"
    description = "weighted average of next-token probabilities (models sharing one vocabulary)"
    Detail = TokenAverageDetail

    @classmethod
    def calibration_setups(cls, grid: GridContext) -> list[GridSetup]:
        if not grid.one_vocabulary:
            return []
        # over every member, as anchored AdaFuse: an average of next-token probabilities is a
        # soft vote (a member sure of its token outweighs an unsure one), and over Qwen 1.5B +
        # 0.5B, 8.5 EM apart on TriviaQA's test rows, it is the one setup above the 1.5B there (+4.5)
        every = grid.members
        return [
            GridSetup("token-average", every),
            GridSetup(f"token-average weights={grid.weights}", every, {"weights": grid.weights}),
            # gated (GaC): the anchor's token while it is sure, the average where it is not
            *(GridSetup(f"token-average anchored theta={theta:g}", every,
                        {"policy": "anchored", "anchor": grid.anchor, "theta": theta})
              for theta in grid.thetas),
        ]  # fmt: skip

    same_vocabulary = True

    def step(self, ctx: StepContext) -> Step:
        voters, margins = self.voters(ctx, TOP_K)
        sessions = [ctx.sessions[m] for m in voters]
        all_weights = self.weights_for(ctx)
        weights = [all_weights[m] for m in voters]
        toks: list[int] = []
        text = ""
        first = [s.next_tokens(TOP_K) for s in sessions]
        # one token, or a few when a token is half a UTF-8 character
        for _ in range(min(8, ctx.budget)):
            dists = [s.tail_tokens(len(toks), TOP_K) for s in sessions] if toks else first
            tok = ctx.sampler(mix_tokens(dists, weights))
            if sessions[0].is_eos(tok):
                return Step(text=text, new_tokens=max(len(toks), 1), source=voters[0], finished=True)
            toks.append(tok)
            rolls = [s.replay(toks) for s in sessions]
            text = rolls[0].text
            if not text.endswith("\ufffd"):
                break
        # credit the model that gave the chosen token the highest probability
        source = voters[max(range(len(sessions)), key=lambda i: (first[i].logprob(toks[0]), -i))]
        detail = self.Detail(
            confident=None if margins is None else len(voters) == 1,
            margins=margins,
            candidates=[CandidateTrace(text=text, kind="token", proposers=[self.names[source]])],
            winner=0,
            token_probs={self.names[m]: round(math.exp(d.logprob(toks[0])), 5) for m, d in zip(voters, first)},
        )
        return Step(text=text, new_tokens=len(toks), source=source, detail=detail)
