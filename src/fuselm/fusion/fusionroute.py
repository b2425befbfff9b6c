"""FusionRoute (arXiv 2601.05106): a trained router picks an expert per token and adds its own
*complementary* logits to the expert's.

At each token the router (a causal LM over the experts' vocabulary with a routing head, see
:mod:`fuselm.router`) runs one forward pass; the expert with the highest routing weight runs
one; the next token comes from softmax(log p_router + log p_expert). Experts that were not
selected only record the committed text: their sessions catch up with one batched prefill
when they are next selected (the session re-syncs lazily), never token by token.

On an engine an expert gives its top-20, not its whole distribution: the router's log-probs are
then added to the top-20 with the rest of the expert's mass spread over the other tokens
(:meth:`NextTokens.dense`). Approximate, said when the method is built; `expert-route` stays
exact for greedy decoding (the argmax is in the top-k). The router itself runs in process.

Methods:

* ``fusionroute``: routing plus complementary logits (the paper's method).
* ``expert-route``: routing only, the selected expert's own distribution (ablation).
* ``oracle-route``: for analysis, the expert that gives the *reference* next token the highest
  probability, decoding with that expert alone; needs ``reference`` (the eval harness passes
  each row's reference).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..conventions import OFFERS_FULL, OFFERS_TOPK
from ..errors import FuselmError
from ..models.backend import Vocabulary, probe_fingerprint, require_one_vocabulary
from ..models.prefix import PrefixCache
from ..models.session import DecodingSession, NextTokens, Session
from ..result import StepDetail
from ..router.backend import load_router_backend
from ..router.losses import combine_logprobs
from .base import FusionMethod, Step, StepContext
from .options import path_option
from .token_average import TOP_K


class FusionRouteOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    router: str = path_option("directory of a router trained by `fuselm train-router`", default=...)
    router_backend: Literal["auto", "transformers", "llamacpp"] = Field(
        "auto",
        description="engine that runs the router: llama.cpp (LoRA router over a GGUF backbone, faster on CPU), "
        "transformers (float32, as trained), or auto (llama.cpp when it can)",
    )


def take_token(expert: Session, first_token: int, more, budget: int) -> tuple[str, int, bool]:
    """(text, tokens used, end of sequence) for `first_token`, continued by `more(tokens so far)`
    while the text is half a UTF-8 character (byte-level tokens)."""
    if expert.is_eos(first_token):
        return "", 1, True
    toks = [first_token]
    text = expert.continuation_text(toks)
    while text.endswith("\ufffd") and len(toks) < min(8, budget):
        tok = more(toks)
        if expert.is_eos(tok):
            break
        toks.append(tok)
        text = expert.continuation_text(toks)
    return text, len(toks), False


class RouteDetail(StepDetail):
    """A step of the expert-routing methods: which expert the router (or the reference) chose."""

    route: dict[str, float] | None = None  # routing weight per expert
    expert_token: str | None = None  # the selected expert's own argmax token
    changed: bool | None = None  # the router's logits moved the token off it
    reference_token: str | None = None  # oracle-route: the reference token that chose the expert

    def notes(self) -> list[str]:
        lines = []
        if self.route:
            lines.append("route: " + ", ".join(f"{k} {v:.2f}" for k, v in self.route.items()))
        if self.expert_token is not None:
            moved = " (moved by the router)" if self.changed else ""
            lines.append(f"expert's own token: {json.dumps(self.expert_token, ensure_ascii=False)}{moved}")
        if self.reference_token is not None:
            lines.append(f"reference token: {json.dumps(self.reference_token, ensure_ascii=False)}")
        return lines


class _ExpertMethod(FusionMethod):
    """Per-token choice between experts that share one vocabulary."""

    Detail = RouteDetail

    min_models = 2
    same_vocabulary = True


class FusionRoute(_ExpertMethod):
    name = "fusionroute"
    description = "a trained router picks an expert per token and adds its complementary logits"
    Options = FusionRouteOptions
    complementary = True
    needs = frozenset({OFFERS_TOPK})
    exact_needs = frozenset({OFFERS_FULL})  # the router's logits are added over the whole vocabulary

    def __init__(self, models, options=None):
        super().__init__(models, options)
        path = Path(self.options.router).expanduser()
        # The router is loaded once per method (a run), closed with it.
        self.router = load_router_backend(path, self.options.router_backend)
        try:
            self._check_router(path)
        except FuselmError:
            self.router.close()
            raise
        self._router_prefix = PrefixCache(self.router)

    def _check_router(self, path: Path) -> None:
        meta = self.router.meta
        if self.router.n_experts != len(self.models):
            raise FuselmError(
                f"router {path} routes between {self.router.n_experts} experts, "
                f"got {len(self.models)} models ({self.names})"
            )
        if list(meta.experts) != self.names:
            raise FuselmError(f"router {path} was trained for experts {list(meta.experts)}, got {self.names}")
        first = self.models[0]
        # an expert that tells no vocabulary size (on an engine) is compared by tokenizations alone
        if first.vocab_size is not None and meta.vocab_fingerprint.startswith("probe:"):
            if probe_fingerprint(first.vocab_size, first.tokenize) != meta.vocab_fingerprint:
                raise FuselmError(f"router {path} was trained on another vocabulary than {self.names[0]!r}'s")
        router = Vocabulary.of(self.router, f"router {path}")
        require_one_vocabulary(f"router {path} with its experts", [router, first])

    def open_sessions(self, prompt_texts: list[str]) -> list[Session]:
        # The router reads the experts' prompt text (one tokenizer, one template) and follows the
        # committed text like any other session: the last of the generation's sessions.
        router = DecodingSession(self.router, prompt_texts[0], self._router_prefix)
        return [*super().open_sessions(prompt_texts), router]

    def step(self, ctx: StepContext) -> Step:
        r = cast(DecodingSession, ctx.sessions[-1])  # the router's own, in process (open_sessions)
        lp_r = r.next_logprobs()
        route = self.router.route_logits(r.cache, len(r.committed_ids()))
        weights = torch.softmax(route, dim=-1)
        e = int(torch.argmax(route))
        expert = ctx.sessions[e]
        dist = expert.next_tokens(TOP_K)
        tok = ctx.sampler(self._final(lp_r, dist))

        def more(toks: list[int]) -> int:
            r.replay(toks)
            expert.replay(toks)
            return ctx.sampler(self._final(r.tail_logprobs(len(toks)), expert.tail_tokens(len(toks), TOP_K)))

        text, used, eos = take_token(expert, tok, more, ctx.budget)
        own = dist.best(1)[0]
        detail = self.Detail(
            route={n: round(float(w), 4) for n, w in zip(self.names, weights)},
            expert_token=expert.continuation_text([own]) if not expert.is_eos(own) else "<eos>",
            changed=own != tok,  # the complementary logits moved the choice off the expert's argmax
        )
        return Step(text=text, new_tokens=used, source=e, finished=eos, detail=detail)

    def _final(self, router: torch.Tensor, expert: NextTokens) -> torch.Tensor:
        """The distribution the next token is drawn from."""
        lp_e = expert.dense(router.shape[-1])
        return combine_logprobs(router, lp_e) if self.complementary else lp_e

    def close(self) -> None:
        self._router_prefix.clear()
        self.router.close()
        super().close()


class ExpertRoute(FusionRoute):
    """FusionRoute's routing without the complementary logits (ablation)."""

    name = "expert-route"
    description = "FusionRoute's routing alone, the selected expert's own distribution (ablation)"
    complementary = False


class OracleRouteOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reference: str | None = Field(
        None, description="the reference answer whose next token decides the expert (eval passes each row's)"
    )


@dataclass
class _OracleState:
    ref_ids: list[int]
    tokens: int = 0  # generated so far: the index of the reference token that picks the next expert


class OracleRoute(_ExpertMethod):
    """Analysis only: per token, the expert that gives the reference's next token the highest
    probability (past the reference's end, the first expert); decoding with that expert alone."""

    name = "oracle-route"
    description = "analysis: per token the expert most likely to write the reference's next token"
    analysis_only = True
    Options = OracleRouteOptions
    needs_reference = True

    def start(self, ctx: StepContext) -> _OracleState:
        """The reference's token ids after the prompt, and the tokens generated so far."""
        reference = ctx.reference if ctx.reference is not None else self.options.reference
        if reference is None:
            raise FuselmError("oracle-route needs the reference answer: -O reference=TEXT (fuselm eval passes it)")
        first, prompt = self.models[0], ctx.sessions[0].prompt
        return _OracleState(first.tokenize(prompt + reference)[len(first.tokenize(prompt)) :])

    def step(self, ctx: StepContext) -> Step:
        state: _OracleState = ctx.state
        lps = [s.next_logprobs() for s in ctx.sessions]
        ref = state.ref_ids[state.tokens] if state.tokens < len(state.ref_ids) else None
        e = 0 if ref is None else max(range(len(lps)), key=lambda m: (float(lps[m][ref]), -m))
        expert = ctx.sessions[e]
        tok = ctx.sampler(lps[e])

        def more(toks: list[int]) -> int:
            expert.replay(toks)
            return ctx.sampler(expert.tail_logprobs(len(toks)))

        text, used, eos = take_token(expert, tok, more, ctx.budget)
        state.tokens += used
        ref_text = None if ref is None else self.models[0].decode([ref])
        return Step(text=text, new_tokens=used, source=e, finished=eos, detail=self.Detail(reference_token=ref_text))
