"""Shared pieces of the ensemble methods: candidates, word-level proposals, the ensemble decision."""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import FuselmError, UnknownNameError
from ..models.expert import Expert
from ..models.session import Rollout, Score, Session, top_margin
from ..result import CandidateTrace, StepDetail
from ..text.words import first_word_end, split_words, word_ends
from .base import EXACT_NEEDS, FusionMethod, Step, StepContext
from .experts import each
from .options import EnsembleOptions, TokenFusionOptions

NormUnit = Literal["token", "char", "byte"]


class AnchoredDetail(StepDetail):
    """A step of a word-level ensemble, which policy anchored may decide (`anchor_stands`)."""

    overridden: bool | None = None  # policy anchored: the others outvoted the anchor's proposal


class EnsembleMethod(FusionMethod):
    """Base of the methods that fuse several models: per-model weights (the `weights` option, else
    each model config's `weight`)."""

    Options = EnsembleOptions
    Detail = AnchoredDetail
    min_models = 1
    needs = EXACT_NEEDS  # candidates, rollouts and scores: exact on a serving engine too

    def __init__(self, models, options=None):
        super().__init__(models, options)
        self.weights = self.options.model_weights([m.config.weight for m in models])
        self._prompt_memos = [PromptPieceMemo() for _ in models]
        anchored = getattr(self.options, "policy", None) == "anchored"
        self.anchor = self.model_index(self.options.anchor, "anchor") if anchored else None

    def model_index(self, ref: str | int | None, what: str) -> int:
        """The model an option names (`anchor`): by name, by its entry's name (a path), or by index."""
        return resolve_model(self.names, ref, what, [m.config.name for m in self.models])

    def live_anchor(self, ctx: StepContext) -> int:
        """Policy anchored's anchor, or the first live model where it has dropped out."""
        return self.anchor if self.anchor in ctx.live else ctx.live[0]

    def anchor_top(self, ctx: StepContext, anchor: int, k: int = 2) -> tuple[list[tuple[int, float]], float]:
        """The anchor's top-`k` next tokens and its top-1/top-2 margin (asked of it alone)."""
        top = each(ctx, lambda m, s: s.next_top(k), [anchor])[anchor]
        return top, top_margin(top)

    def anchor_alone(self, anchor: int, text: str, finished: bool, tokens: int, margin: float | None, **detail) -> Step:
        """The step that commits the anchor's own text, no other candidate scored."""
        c = Candidate(text, eos=finished and not text, proposers=[anchor], tokens={anchor: max(tokens, 1)})
        margins = None if margin is None else {self.names[anchor]: round(margin, 5)}
        return decided_step(
            [c], 0, None, self.names, finished, confident=True, margins=margins, detail_type=self.Detail, **detail
        )

    def start(self, ctx: StepContext) -> Any:
        """With `prompt_weights`: this generation's weights, from each model's NLL of its prompt."""
        tau = getattr(self.options, "prompt_weights", None)
        if tau is None:
            return None
        nll = each(
            ctx,
            lambda m, s: prompt_nll(self.models[m], s.prompt, self._prompt_memos[m]),
            list(range(len(self.models))),
        )
        low = min(nll.values())
        raw = {m: self.weights[m] * math.exp(-(x - low) / tau) for m, x in nll.items()}
        total = sum(raw.values())
        return PromptWeights([raw.get(m, 0.0) / total * len(raw) for m in range(len(self.models))], nll)

    def decide(self, ctx: StepContext, candidates: list[Candidate]) -> Decision:
        """:func:`ensemble_decide` with this method's weights, normalisation and combination."""
        o = self.options
        return ensemble_decide(ctx, candidates, self.weights_for(ctx), o.normalize, o.combine)

    def weights_for(self, ctx: StepContext) -> list[float]:
        """The weights of this generation (the configured ones, or the prompt's)."""
        return ctx.state.weights if isinstance(ctx.state, PromptWeights) else self.weights


class TokenFusionMethod(EnsembleMethod):
    """Base of the methods that fuse one token per step. Policy anchored gates them as GaC does:
    while the anchor's top-1/top-2 margin is at least `theta` its token stands and no other
    model is asked; only where it is unsure do all the models decide."""

    Options = TokenFusionOptions

    def voters(self, ctx: StepContext, k: int) -> tuple[list[int], dict[str, float] | None]:
        """The models that choose this token (the anchor alone while it is sure, else all), and
        the anchor's margin for the trace (None without policy anchored). The margin is read
        off the anchor's top-`k`, which the step asks for next (one request on an engine)."""
        if self.anchor is None:
            return list(range(len(ctx.sessions))), None
        top = ctx.sessions[self.anchor].next_tokens(k)
        margin = top_margin({t: top.logprob(t) for t in top.best(2)})
        voters = [self.anchor] if margin >= self.options.theta else list(range(len(ctx.sessions)))
        return voters, {self.names[self.anchor]: round(margin, 5)}


@dataclass
class PromptWeights:
    """A generation's per-prompt weights (PackLLM) and the prompt NLLs they came from."""

    weights: list[float]
    nll: dict[int, float]


def prompt_nll(model: Expert, prompt: str, memo: PromptPieceMemo | None = None) -> float:
    """NLL per byte of `prompt` under `model` (per byte: models with different tokenizers
    compare; from its first word on: a model without BOS cannot score its first token).

    Scored in pieces of whole words, each committed once scored: a few-shot prompt can be longer
    than one candidate may be (512 tokens on llama.cpp). With a `memo` (one per model), the pieces
    an earlier prompt began with are not scored again: a few-shot evaluation repeats its shots
    before every row, so only the row's own text is, on a session that starts from the model's
    warm prefix (the shots) and leaves the whole prompt there for the generation's session."""
    end = first_word_end(prompt)
    if not end or end >= len(prompt):
        return 0.0
    pieces = _pieces(prompt[end:], PROMPT_PIECE_CHARS)
    keys, digest = [], hashlib.sha256(prompt[:end].encode())
    for piece in pieces:  # the text through each piece, with the cuts (a score depends on them)
        data = piece.encode()
        digest.update(len(data).to_bytes(8, "little") + data)
        keys.append(digest.copy().digest())
    done, logprob, n_bytes = 0, 0.0, 0
    for k in reversed(range(len(keys)) if memo is not None else ()):  # the longest piece run seen
        hit = memo.get(keys[k])
        if hit is not None:
            done, (logprob, n_bytes) = k + 1, hit
            break
    if done < len(pieces):
        with model.session(prompt[: end + sum(map(len, pieces[:done]))]) as s:
            for piece, key in zip(pieces[done:], keys[done:]):
                score = s.score([piece])[0]
                logprob, n_bytes = logprob + score.logprob, n_bytes + score.n_bytes
                s.append(piece)
                if memo is not None:
                    memo.put(key, (logprob, n_bytes))
            s.warm()  # the whole prompt stays warm for the generation's session
    return -logprob / n_bytes if n_bytes else math.inf


class PromptPieceMemo:
    """One model's log-likelihood of prompt text through the end of each piece scored so far
    (keyed by a digest of that text and its cuts), the oldest dropped beyond `capacity`."""

    def __init__(self, capacity: int = 4096):
        self.capacity = capacity
        self._scores: OrderedDict[bytes, tuple[float, int]] = OrderedDict()
        self._lock = threading.Lock()  # a server runs generations on one method side by side

    def __len__(self) -> int:
        return len(self._scores)

    def get(self, key: bytes) -> tuple[float, int] | None:
        with self._lock:
            hit = self._scores.get(key)
            if hit is not None:
                self._scores.move_to_end(key)
            return hit

    def put(self, key: bytes, value: tuple[float, int]) -> None:
        with self._lock:
            self._scores[key] = value
            self._scores.move_to_end(key)
            while len(self._scores) > self.capacity:
                self._scores.popitem(last=False)


PROMPT_PIECE_CHARS = 400  # under 512 tokens even at one token per character


def _pieces(text: str, size: int) -> list[str]:
    """`text` cut into runs of whole words of about `size` characters (a longer word alone), and
    at every blank line: few-shot prompts repeat their shots before each question, so the pieces
    of the shots are the same from row to row and only the question's need scoring."""
    out: list[str] = []
    words = [w[i : i + size] for w in split_words(text) for i in range(0, len(w), size)]
    for word in words:
        if out and len(out[-1]) + len(word) <= size and not word.lstrip(" \t").startswith("\n\n"):
            out[-1] += word
        else:
            out.append(word)
    return out


def resolve_model(names: list[str], ref: str | int | None, what: str, aliases: list[str] = ()) -> int:
    """The index of the model an option names (by name, by an alias such as the model entry's
    `name` (a path), or by index; None: the first model)."""
    if ref is None:
        return 0
    if isinstance(ref, str) and ref not in names and ref in aliases:
        return list(aliases).index(ref)
    if isinstance(ref, int):
        if not 0 <= ref < len(names):
            raise FuselmError(
                f"{what} {ref} is not a model index: the models are 0..{len(names) - 1} ({', '.join(names)})"
            )
        return ref
    if ref not in names:
        raise UnknownNameError(f"{what} model", ref, names)
    return names.index(ref)


@dataclass
class Candidate:
    """A continuation proposed by one or more models; `eos` means "end here"."""

    text: str
    eos: bool = False
    proposers: list[int] = field(default_factory=list)
    kind: str = "proposal"  # "proposal" or "branch"
    tokens: dict[int, int] = field(default_factory=dict)  # proposer -> tokens it generated

    @property
    def key(self) -> tuple[str, bool]:
        return (self.text, self.eos)


def add_candidate(pool: list[Candidate], cand: Candidate) -> None:
    """Deduplicate by text: a repeated candidate records its extra proposer."""
    for c in pool:
        if c.key == cand.key:
            for p in cand.proposers:
                if p not in c.proposers:
                    c.proposers.append(p)
            c.tokens.update(cand.tokens)
            return
    pool.append(cand)


def token_at(roll: Rollout, char: int) -> int:
    """Index of the rollout token whose text contains character offset `char`."""
    j = 0
    for i, off in enumerate(roll.token_offsets):
        if off <= char:
            j = i
        else:
            break
    return j


def roll_words(session: Session, n_words: int, max_tokens: int, first_token: int | None = None, choose=None) -> Rollout:
    """Greedy rollout of exactly `n_words` complete words (fewer at end of sequence or budget)."""

    def until(r: Rollout) -> int | None:
        ends = word_ends(r.text, n_words)
        return ends[-1] if len(ends) == n_words else None

    kwargs: dict[str, Any] = {"until": until, "first_token": first_token}
    if choose is not None:
        kwargs["choose"] = choose
    return session.rollout(max_tokens, **kwargs)


@dataclass
class Decision:
    winner: int
    nll: list[list[float]]  # [candidate][model] mean NLL (inf for a model dropped this round)
    combined: list[float]  # weighted average per candidate, over the live models


def combine_nlls(values: dict[int, float], weights: list[float], how: str = "mean") -> float:
    """One candidate's score from the live models' NLLs: weighted mean, weighted median, or the
    weighted mean without the highest and the lowest (3 models or more; else the mean)."""
    items = sorted(values.items(), key=lambda kv: kv[1])
    if how == "trimmed" and len(items) >= 3:
        items = items[1:-1]
    if how == "median":
        half = sum(weights[m] for m, _ in items) / 2
        seen = 0.0
        for m, x in items:
            seen += weights[m]
            if seen >= half:
                return x
    total = sum(weights[m] for m, _ in items)
    return sum(weights[m] * x for m, x in items) / total


def ensemble_decide(
    ctx: StepContext,
    candidates: list[Candidate],
    weights: list[float],
    unit: NormUnit = "token",
    combine: str = "mean",
) -> Decision:
    """Every live model scores every candidate under its own tokenization (one batched pass per
    model, all models at once); the lowest combined NLL wins (weighted mean, or `combine`); ties
    go to the earlier candidate (proposal order)."""
    texts = [c.text for c in candidates if not c.eos]
    wants_eos = any(c.eos for c in candidates)

    def score(m: int, s) -> tuple[list[Score], Score | None]:
        return (s.score(texts) if texts else []), (s.eos_score() if wants_eos else None)

    scored = each(ctx, score)
    n_models = len(ctx.sessions)
    nll = [[math.inf] * n_models for _ in candidates]
    for m, (scores, eos) in scored.items():
        it = iter(scores)
        for ci, c in enumerate(candidates):
            sc = eos if c.eos else next(it)
            nll[ci][m] = sc.mean_nll("token" if c.eos else unit)
    live = list(scored)
    combined = [combine_nlls({m: row[m] for m in live}, weights, combine) for row in nll]
    winner = min(range(len(candidates)), key=lambda i: (combined[i], i))
    return Decision(winner, nll, combined)


def anchor_stands(pool: list[Candidate], decision: Decision, anchor: int, override_margin: float) -> tuple[int, bool]:
    """Policy anchored's winner of a scored round, and whether the anchor was overridden: its own
    proposal, unless another candidate's combined NLL is lower by more than `override_margin`
    (the others override the anchor, they do not average it away)."""
    own = next(i for i, c in enumerate(pool) if anchor in c.proposers and c.kind == "proposal")
    winner = decision.winner
    if decision.combined[winner] + override_margin >= decision.combined[own]:
        winner = own
    return winner, winner != own


def candidate_trace(candidates: list[Candidate], names: list[str], decision: Decision | None) -> list[CandidateTrace]:
    return [
        CandidateTrace(
            text=c.text,
            eos=c.eos,
            kind=c.kind,
            proposers=[names[p] for p in c.proposers],
            nll={n: _round(x) for n, x in zip(names, decision.nll[i])} if decision is not None else None,
            score=_round(decision.combined[i]) if decision is not None else None,
        )
        for i, c in enumerate(candidates)
    ]


def decided_step(
    pool: list[Candidate],
    winner: int,
    decision: Decision | None,
    names: list[str],
    finished: bool,
    detail_type: type[StepDetail] = StepDetail,
    **detail,
) -> Step:
    """The step that commits candidate `winner` of `pool`, with the round's candidates as its
    trace (`detail_type`: the method's own, for fields of its own in `detail`)."""
    w = pool[winner]
    src = w.proposers[0]
    trace = detail_type(candidates=candidate_trace(pool, names, decision), winner=winner, **detail)
    return Step(text=w.text, new_tokens=w.tokens.get(src, 1), source=src, finished=finished, detail=trace)


def _round(x: float) -> float | None:
    return None if math.isinf(x) or math.isnan(x) else round(x, 5)
