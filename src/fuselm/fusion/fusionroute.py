"""FusionRoute (arXiv 2601.05106): a trained router picks an expert per token and adds its own
*complementary* logits to the expert's.

At each token the router (a causal LM over the experts' vocabulary with a routing head, see
:mod:`fuselm.router`) runs one forward pass; the expert with the highest routing weight runs
one; the next token comes from softmax(log p_router + log p_expert). Experts that were not
selected only record the committed text: their sessions catch up with one batched prefill
when they are next selected (the session re-syncs lazily), never token by token.

Methods:

* ``fusionroute``: routing plus complementary logits (the paper's method).
* ``expert-route``: routing only, the selected expert's own distribution (ablation).
* ``oracle-route``: for analysis, the expert that gives the *reference* next token the highest
  probability, decoding with that expert alone; needs ``reference`` (the eval harness passes
  each row's reference).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..errors import FuselmError
from ..models.backend import same_vocabulary
from ..models.session import DecodingSession
from ..router.losses import combine_logprobs
from .base import FusionMethod, Step, StepContext
from .registry import register


def _require_one_vocabulary(method: str, sessions_or_models) -> None:
    first = sessions_or_models[0].backend
    for m in sessions_or_models[1:]:
        if not same_vocabulary(first, m.backend):
            raise FuselmError(
                f"{method} needs experts with one vocabulary; {first.info.name!r} and {m.backend.info.name!r} differ"
            )


_ROUTERS: dict[tuple[str, float, str], object] = {}


def _load_router(path: Path, engine: str):
    """A loaded router, reused across generations (an evaluation constructs the method per row)."""
    from ..router.backend import load_router_backend

    weights = path / "router.safetensors"
    key = (str(path.resolve()), weights.stat().st_mtime if weights.is_file() else 0.0, engine)
    if key not in _ROUTERS:
        for old in _ROUTERS.values():  # one router at a time: each holds a whole backbone
            old.close()
        _ROUTERS.clear()
        _ROUTERS[key] = load_router_backend(path, engine)
    return _ROUTERS[key]


class FusionRouteOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    router: str = Field(..., description="directory of a router trained by `fuselm train-router`")
    router_backend: Literal["auto", "transformers", "llamacpp"] = Field(
        "auto",
        description="engine that runs the router: llama.cpp (LoRA router over a GGUF backbone, faster on CPU), "
        "transformers (float32, as trained), or auto (llama.cpp when it can)",
    )


def take_token(expert: DecodingSession, first_token: int, more, budget: int) -> tuple[str, int, bool]:
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


class _ExpertMethod(FusionMethod):
    """Per-token choice between experts that share one vocabulary."""

    min_models = 2

    def __init__(self, models, generation, options=None):
        super().__init__(models, generation, options)
        _require_one_vocabulary(self.name, models)
        self.names = [m.name for m in models]


@register("fusionroute")
class FusionRoute(_ExpertMethod):
    Options = FusionRouteOptions
    complementary = True

    def __init__(self, models, generation, options=None):
        super().__init__(models, generation, options)
        path = Path(self.options.router).expanduser()
        self.router = _load_router(path, self.options.router_backend)
        meta = self.router.meta
        names = [m.name for m in models]
        if self.router.n_experts != len(models):
            raise FuselmError(
                f"router {path} routes between {self.router.n_experts} experts, got {len(models)} models ({names})"
            )
        if list(meta.experts) != names:
            raise FuselmError(f"router {path} was trained for experts {list(meta.experts)}, got {names}")
        if not same_vocabulary(self.router, models[0].backend):
            raise FuselmError(f"router {path} and expert {names[0]!r} have different vocabularies")
        self._session: DecodingSession | None = None

    def _router_session(self, ctx: StepContext) -> DecodingSession:
        # The router reads the same prompt text as the experts (one tokenizer, one template) and
        # follows the committed text like any other session.
        if self._session is None:
            self._session = DecodingSession(self.router, ctx.sessions[0].prompt)
        s = self._session
        s.append(ctx.generated[len(s.text) :])
        return s

    def step(self, ctx: StepContext) -> Step:
        r = self._router_session(ctx)
        lp_r = r.next_logprobs()
        route = self.router.route_logits(r.cache, len(r.committed_ids()))
        weights = torch.softmax(route, dim=-1)
        e = int(torch.argmax(route))
        expert = ctx.sessions[e]
        lp_e = expert.next_logprobs()
        final = combine_logprobs(lp_r, lp_e) if self.complementary else lp_e
        tok = self.sampler(final)

        def more(toks: list[int]) -> int:
            r.replay(toks)
            expert.replay(toks)
            lp = expert.tail_logprobs(len(toks))
            return self.sampler(combine_logprobs(r.tail_logprobs(len(toks)), lp) if self.complementary else lp)

        text, used, eos = take_token(expert, tok, more, ctx.budget)
        own = int(torch.argmax(lp_e))
        trace = {
            "expert": self.names[e],
            "weights": {n: round(float(w), 4) for n, w in zip(self.names, weights)},
            "token": text,
            "expert_token": expert.continuation_text([own]) if not expert.is_eos(own) else "<eos>",
            "changed": own != tok,  # the complementary logits moved the choice off the expert's argmax
        }
        return Step(text=text, new_tokens=used, source=e, finished=eos, trace=trace)


@register("expert-route")
class ExpertRoute(FusionRoute):
    """FusionRoute's routing without the complementary logits (ablation)."""

    complementary = False


class OracleRouteOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reference: str | None = Field(
        None, description="the reference answer whose next token decides the expert (eval passes each row's)"
    )


@register("oracle-route")
class OracleRoute(_ExpertMethod):
    """Analysis only: per token, the expert that gives the reference's next token the highest
    probability (past the reference's end, the first expert); decoding with that expert alone."""

    Options = OracleRouteOptions
    needs_reference = True

    def __init__(self, models, generation, options=None):
        super().__init__(models, generation, options)
        if self.options.reference is None:
            raise FuselmError("oracle-route needs the reference answer: -O reference=TEXT (fuselm eval passes it)")
        self._ref_ids: list[int] | None = None
        self._tokens = 0

    def step(self, ctx: StepContext) -> Step:
        s0 = ctx.sessions[0]
        if self._ref_ids is None:
            prompt_ids = s0.backend.tokenize(s0.prompt)
            full = s0.backend.tokenize(s0.prompt + self.options.reference)
            self._ref_ids = full[len(prompt_ids) :]
        lps = [s.next_logprobs() for s in ctx.sessions]
        ref = self._ref_ids[self._tokens] if self._tokens < len(self._ref_ids) else None
        e = 0 if ref is None else max(range(len(lps)), key=lambda m: (float(lps[m][ref]), -m))
        expert = ctx.sessions[e]
        tok = self.sampler(lps[e])

        def more(toks: list[int]) -> int:
            expert.replay(toks)
            return self.sampler(expert.tail_logprobs(len(toks)))

        text, used, eos = take_token(expert, tok, more, ctx.budget)
        self._tokens += used
        trace = {"expert": self.names[e], "reference_token": None if ref is None else s0.backend.decode([ref])}
        return Step(text=text, new_tokens=used, source=e, finished=eos, trace=trace)
