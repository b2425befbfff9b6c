"""Session, what every generation's session on a model is (declared here, with what its
operations return), and DecodingSession: one in-process model's incremental state over a shared,
growing text.

Fusion methods drive several models over one committed text. The text is the source of
truth; each session keeps its own token ids and KV cache in step with it:

* ``append(text)`` only records the text. On the next query the session re-tokenizes
  prompt + committed text, keeps the longest common token prefix with what is in its cache,
  drops the cache beyond it and forwards only the new tokens. Tokens that a rollout already
  ran (and whose log-probs are kept) are reused, so committing a model's own proposal costs it
  no forward pass. The prompt is never run twice.
* ``rollout`` generates greedily (or with a sampler) up to k tokens or until a caller-given
  text condition holds (e.g. a word boundary), reporting per-token log-probs and top-1/top-2
  margins. The rolled tokens stay in the cache as a speculative tail.
* ``score`` scores several candidate continuations in one batched forward pass against the
  cached prefix. A candidate's tokens are those of tokenize(prefix + candidate) after their
  common prefix with tokenize(prefix), which is right for tokenizers that merge across the
  boundary or carry a leading space.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NoReturn

import torch

from ..cancel import raise_if_cancelled
from ..conventions import OFFER_WORDS, OFFERS_FOLLOW, OFFERS_FULL, OFFERS_SCORE, OFFERS_TOPK
from ..errors import EngineError, FuselmError
from ..text.words import first_word_end
from .backend import Backend, Forks
from .prefix import PrefixCache

TokenChooser = Callable[[torch.Tensor], int]


def greedy(logprobs: torch.Tensor) -> int:
    return int(torch.argmax(logprobs))


def top2_margin(logprobs: torch.Tensor) -> float:
    """p(top-1) - p(top-2) of a next-token distribution given as log-probs."""
    top = torch.topk(logprobs, 2).values.exp()
    return float(top[0] - top[1])


def top_margin(top: Sequence[tuple[int, float]] | dict[int, float]) -> float:
    """p(top-1) - p(top-2) from the top-k of a next-token distribution (log-probs, any order)."""
    values = top.values() if isinstance(top, dict) else [lp for _, lp in top]
    best = sorted(values, reverse=True)[:2]
    if not best:
        return 0.0
    return math.exp(best[0]) - (math.exp(best[1]) if len(best) > 1 else 0.0)


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class Rollout:
    """Tokens a session generated after the committed text (not committed by itself)."""

    text: str
    token_ids: list[int]
    token_logprobs: list[float]
    margins: list[float]  # top-1 minus top-2 probability before each token (and before the EOS)
    token_offsets: list[int]  # start of each token's text within `text` (before any cut)
    finished: bool = False  # ended on an end-of-sequence token (not part of the text)

    @property
    def logprob(self) -> float:
        return float(sum(self.token_logprobs))

    @property
    def text_tokens(self) -> int:
        """Tokens whose text starts inside `text`: what the rollout's text costs. A rollout cut at
        a word end has run one token past it (the token that starts the next word) to see it."""
        return sum(1 for start in self.token_offsets if start < len(self.text))


@dataclass
class Followed:
    """A given text read through in one pass after the committed text (`DecodingSession.follow`):
    the model's tokens of it and, before each token and after the last, its own greedy token."""

    text: str
    token_ids: list[int]
    offsets: list[int]  # where each token's text starts in `text`
    own: list[int]  # own[i]: the greedy token before token i; own[len(token_ids)]: after the last
    own_texts: dict[int, str]  # the text of own[i] where it is not token i (and after the last)
    eos_ids: frozenset[int]
    aligned: bool  # the text's tokens start at the committed end (no token merges across it)

    def greedy_word(self, start: int) -> str | None:
        """What a greedy rollout of this model from `text[:start]` proposes as its next word (the
        text to its first word end, or to its end of sequence), read off the pass: None where the
        pass cannot tell (no token starts at `start`, or the model leaves the text mid-word)."""
        if not self.aligned or start not in self.offsets:
            return None
        ends = [*self.offsets[1:], len(self.text)]
        acc = ""
        for q in range(self.offsets.index(start), len(self.token_ids) + 1):
            tok = self.own[q]
            if tok in self.eos_ids:
                return acc
            on_text = q < len(self.token_ids) and tok == self.token_ids[q]
            acc += self.text[self.offsets[q] : ends[q]] if on_text else self.own_texts[q]
            end = first_word_end(acc)
            if end is not None:
                return acc[:end]
            if not on_text:
                return None
        return None


@dataclass(frozen=True)
class Score:
    """Log-likelihood of a candidate continuation under one model."""

    logprob: float
    n_tokens: int
    n_chars: int
    n_bytes: int

    def mean_nll(self, unit: str = "token") -> float:
        denom = {"token": self.n_tokens, "char": self.n_chars, "byte": self.n_bytes}[unit]
        return -self.logprob / denom if denom else math.inf


@dataclass(frozen=True)
class NextTokens:
    """A next-token distribution as the token-level methods read it: whole (`full`, in process),
    or only the top-k an engine gives (`top`), where every other token counts as probability 0.
    The second is what makes token-average and UniTE approximate on engines (docs/scale-out.md)."""

    full: torch.Tensor | None = None
    top: dict[int, float] | None = None

    @property
    def exact(self) -> bool:
        return self.full is not None

    def logprob(self, token_id: int) -> float:
        if self.full is not None:
            return float(self.full[token_id])
        assert self.top is not None
        return self.top.get(token_id, -math.inf)

    def prob(self, token_ids: Sequence[int]) -> float:
        """Probability of any of `token_ids`."""
        return sum(math.exp(self.logprob(t)) for t in token_ids)

    def dense(self, size: int) -> torch.Tensor:
        """Log-probs over `size` token ids: the whole distribution, or the top-k with the mass it
        leaves spread evenly over the other tokens, none of them above the k-th (how FusionRoute
        reads an engine's top-k, docs/scale-out.md)."""
        if self.full is not None:
            return self.full
        assert self.top is not None
        outside = [t for t in self.top if not 0 <= t < size]
        if outside:  # an engine's id past the vocabulary it is read against (a router's)
            raise EngineError(f"token id {outside[0]} is outside the vocabulary of {size} tokens it is read against")
        ids = torch.tensor(list(self.top), dtype=torch.long)
        values = torch.tensor(list(self.top.values()), dtype=torch.float32)
        rest = max(1.0 - float(values.exp().sum()), 1e-12)
        fill = min(math.log(rest / max(size - len(ids), 1)), float(values.min()))
        out = torch.full((size,), fill)
        out[ids] = values
        return out

    def best(self, k: int) -> list[int]:
        """The k most likely token ids (fewer when only a shorter top-k is known)."""
        if self.full is not None:
            return torch.topk(self.full, k).indices.tolist()
        assert self.top is not None
        return sorted(self.top, key=lambda t: -self.top[t])[:k]  # type: ignore[index]


@dataclass
class SessionStats:
    forward_passes: int = 0
    tokens_forwarded: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens found in a warm cache (not run again)
    reused_tokens: int = 0
    adopted_tokens: int = 0  # committed tokens whose key/values came from a scoring pass
    tokenizations: int = 0


class Session(ABC):
    """One model's view of one generation's text, whatever runs the model (this process, an
    engine): what a decoding method calls (`fusion.base.StepContext.sessions`). Every session
    rolls out; each other operation comes with a capability that its model offers
    (`Expert.offers`, fuselm.conventions.OFFERS_*), checked against a method's `needs` before
    any call: a session whose model lacks it refuses the operation (these defaults)."""

    prompt: str  # the prompt text it is conditioned on
    text: str  # the text committed after it
    stats: SessionStats
    # Its calls wait on another process (an engine): they may run on threads beside any other
    # session's (fusion.experts.each). A session whose calls compute here runs beside others
    # only where their backends can (models.backend.side_by_side).
    calls_wait_on_io: ClassVar[bool] = False

    @property
    @abstractmethod
    def name(self) -> str: ...

    @abstractmethod
    def append(self, text: str) -> None:
        """Commit `text` after the current text."""

    @abstractmethod
    def close(self) -> None:
        """End the session (idempotent)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @abstractmethod
    def rollout(
        self,
        max_tokens: int,
        *,
        until: Callable[[Rollout], int | None] | None = None,
        first_token: int | None = None,
        choose: Callable[..., int] = greedy,
        margins: bool = True,
    ) -> Rollout:
        """Up to `max_tokens` tokens after the committed text (see DecodingSession.rollout)."""

    def warm(self) -> None:
        """Run what is committed and not yet run, so that the model's next session starts with
        all of it warm (in process: its key/values; an engine's prefix cache does this itself)."""

    def _refuse(self, capability: str) -> NoReturn:
        raise FuselmError(f"{self.name!r} gives no {OFFER_WORDS[capability]}")

    # --- with OFFERS_TOPK: token ids and the top of next-token distributions -----------------------
    def committed_ids(self) -> list[int]:
        self._refuse(OFFERS_TOPK)

    def is_eos(self, token_id: int) -> bool:
        self._refuse(OFFERS_TOPK)

    @property
    def eos_ids(self) -> list[int]:
        self._refuse(OFFERS_TOPK)

    def tokenize(self, text: str) -> list[int]:
        self._refuse(OFFERS_TOPK)

    def next_top(self, k: int) -> list[tuple[int, float]]:
        self._refuse(OFFERS_TOPK)

    def next_tokens(self, k: int) -> NextTokens:
        self._refuse(OFFERS_TOPK)

    def tail_tokens(self, n_tokens: int, k: int) -> NextTokens:
        self._refuse(OFFERS_TOPK)

    def replay(self, token_ids: Sequence[int]) -> Rollout:
        self._refuse(OFFERS_TOPK)

    def continuation_text(self, token_ids: Sequence[int]) -> str:
        self._refuse(OFFERS_TOPK)

    def rollout_branches(
        self,
        first_tokens: Sequence[int],
        max_tokens: int,
        *,
        until: Callable[[Rollout], int | None] | None = None,
        choose: Callable[..., int] = greedy,
    ) -> list[Rollout]:
        self._refuse(OFFERS_TOPK)

    # --- with OFFERS_SCORE ---------------------------------------------------------------------------
    def score(self, candidates: Sequence[str]) -> list[Score]:
        self._refuse(OFFERS_SCORE)

    def eos_score(self) -> Score:
        self._refuse(OFFERS_SCORE)

    # --- with OFFERS_FULL and OFFERS_FOLLOW (in process) -----------------------------------------------
    def next_logprobs(self) -> torch.Tensor:
        self._refuse(OFFERS_FULL)

    def tail_logprobs(self, n_tokens: int) -> torch.Tensor:
        self._refuse(OFFERS_FULL)

    def follow(self, text: str) -> Followed:
        self._refuse(OFFERS_FOLLOW)


@dataclass
class DecodingSession(Session):
    """One model's state over one generation's text. It owns its KV cache: with a `prefix_cache`
    it starts from the cache that the last finished session on the backend left there, and
    gives its own back on :meth:`close`; without one it starts empty and frees it on close."""

    backend: Backend
    prompt: str
    prefix_cache: PrefixCache | None = None
    stats: SessionStats = field(default_factory=SessionStats)

    def __post_init__(self) -> None:
        self.text = ""
        self._cache: Any = None  # taken on first use: see _take_cache
        self._closed = False
        # Tokens in the cache: committed prefix + speculative tail. A warm cache starts with an
        # earlier session's tokens; _sync keeps their common prefix with the prompt.
        self._ids: list[int] = []
        self._logprobs: dict[int, torch.Tensor] = {}  # n -> next-token log-probs after _ids[:n]
        self._target: list[int] | None = None  # tokenize(prompt + text), cached until append
        self._synced = False
        self._forks: tuple[Forks, list[list[int]]] | None = None  # last scoring pass's candidate states

    def close(self) -> None:
        """End the session: its cache goes to the prefix cache (or is freed). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._forks = None
        if self._cache is None:
            return
        if self.prefix_cache is not None:
            self.prefix_cache.give(self._cache)
        else:
            self.backend.release(self._cache)

    # --- committed text -------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.backend.info.name

    @property
    def cache(self):
        """The backend's cache object (for backends that keep side outputs per position)."""
        self._take_cache()
        return self._cache

    def append(self, text: str) -> None:
        """Commit `text` after the current text (lazily: nothing runs until the next query)."""
        if text:
            self.text += text
            self._target = None
            self._synced = False

    def committed_ids(self) -> list[int]:
        if self._target is None:
            self._target = self._tokenize(self.prompt + self.text)
        return self._target

    def next_logprobs(self) -> torch.Tensor:
        """Full-vocabulary next-token log-probs after the committed text."""
        self._sync()
        return self._logprobs[len(self.committed_ids())]

    def warm(self) -> None:
        self.next_logprobs()  # the last scored piece's key/values adopted: the whole text stays warm

    def is_eos(self, token_id: int) -> bool:
        return token_id in self.backend.info.eos_token_ids

    @property
    def eos_ids(self) -> list[int]:
        return sorted(self.backend.info.eos_token_ids)

    def tokenize(self, text: str) -> list[int]:
        """The model's tokenization of `text` (with its BOS, as a prompt is tokenized)."""
        return self.backend.tokenize(text)

    def next_tokens(self, k: int) -> NextTokens:
        """The next-token distribution after the committed text (in process: all of it; `k` is
        what an engine would be asked for)."""
        return NextTokens(full=self.next_logprobs())

    def tail_tokens(self, n_tokens: int, k: int) -> NextTokens:
        """The distribution after the committed text plus the first `n_tokens` of the last replay."""
        return NextTokens(full=self.tail_logprobs(n_tokens))

    def next_top(self, k: int) -> list[tuple[int, float]]:
        """The k most likely next tokens after the committed text (most likely first), with log-probs."""
        top = torch.topk(self.next_logprobs(), k)
        return list(zip(top.indices.tolist(), top.values.tolist()))

    def eos_score(self) -> Score:
        """Log-probability of ending here (any end-of-sequence token)."""
        lp = self.next_logprobs()
        ids = torch.tensor(sorted(self.backend.info.eos_token_ids))
        return Score(float(torch.logsumexp(lp[ids], 0)), 1, 0, 0)

    # --- generation -----------------------------------------------------------------------------
    def rollout(
        self,
        max_tokens: int,
        *,
        until: Callable[[Rollout], int | None] | None = None,
        first_token: int | None = None,
        choose: TokenChooser = greedy,
        margins: bool = True,
    ) -> Rollout:
        """Generate up to `max_tokens` tokens after the committed text.

        After each token whose text is complete (not half a UTF-8 character), `until(rollout)`
        may return a cut index into the text so far; the rollout then stops and its text is cut
        there (tokens are kept whole). `first_token` forces the first token (used to branch on
        a model's top-B alternatives). End of sequence is detected on token ids and is not part
        of the text. `margins=False` skips the top-2 margins.
        """
        if max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        self._sync()
        base = len(self.committed_ids())
        grow = _RolloutBuilder(self, until, margins)
        roll = grow.new()
        while len(roll.token_ids) < max_tokens:
            pos = base + len(roll.token_ids)
            lp = self._logprobs[pos]
            tok = first_token if (first_token is not None and not roll.token_ids) else choose(lp)
            if not grow.push(roll, tok, lp):
                break
            self._advance(pos, tok)
            if grow.done(roll):
                break
        return roll

    def rollout_branches(
        self,
        first_tokens: Sequence[int],
        max_tokens: int,
        *,
        until: Callable[[Rollout], int | None] | None = None,
        choose: TokenChooser = greedy,
    ) -> list[Rollout]:
        """One rollout per forced first token, all advanced together: one batched forward pass per
        step for all branches still running, on copies of the cached prefix (the session's own
        cache and speculative tail are left as they were). Used for diversity branching."""
        if max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        self._sync()
        n = len(self.committed_ids())
        grow = _RolloutBuilder(self, until, margins=False)
        rolls = [grow.new() for _ in first_tokens]
        first_lp = self._logprobs[n]
        active = [
            j for j, (r, t) in enumerate(zip(rolls, first_tokens)) if grow.push(r, t, first_lp) and not grow.done(r)
        ]
        batch = None  # the branches' key/values between steps: this call's own
        while active:
            active = [j for j in active if len(rolls[j].token_ids) < max_tokens]
            if not active:
                break
            branches = [rolls[j].token_ids for j in active]
            raise_if_cancelled()  # a step of many passes stops between them
            lps, batch = self.backend.branch_next_logprobs(self._cache, n, branches, batch)
            self.stats.forward_passes += 1
            # Both backends keep the branches' states between steps: one new token per branch.
            self.stats.tokens_forwarded += len(branches)
            active = [
                j for j, lp in zip(active, lps) if grow.push(rolls[j], choose(lp), lp) and not grow.done(rolls[j])
            ]
        return rolls

    def continuation_text(self, token_ids: Sequence[int]) -> str:
        """Text that `token_ids` would add after the committed text (decoding only, no forward)."""
        anchor = self.committed_ids()[-1:]
        return self.backend.decode(anchor + list(token_ids))[len(self.backend.decode(anchor)) if anchor else 0 :]

    def replay(self, token_ids: Sequence[int]) -> Rollout:
        """Put `token_ids` after the committed text (reusing any cached tail) and return their rollout."""
        rest = iter(list(token_ids)[1:])
        return self.rollout(len(token_ids), first_token=token_ids[0], choose=lambda _lp: next(rest), margins=False)

    def tail_logprobs(self, n_tokens: int) -> torch.Tensor:
        """Next-token log-probs after the committed text plus the first `n_tokens` of the last rollout."""
        return self._logprobs[len(self.committed_ids()) + n_tokens]

    def follow(self, text: str) -> Followed:
        """Put `text` after the committed text in one batched pass (its tokens stay as the
        speculative tail, reusing what is cached) and read the model's greedy choice before each
        of its tokens: how another model's draft is checked (AdaFuse, anchored with a draft)."""
        self._sync()
        n = len(self.committed_ids())
        full = self._tokenize(self.prompt + self.text + text)
        aligned = common_prefix_len(self.committed_ids(), full) == n
        tail = full[n:] if aligned else []
        c = 0  # cached tail tokens that are these
        while c < len(tail) and n + c < len(self._ids) and self._ids[n + c] == tail[c] and n + c + 1 in self._logprobs:
            c += 1
        self.stats.reused_tokens += c
        if c < len(tail):
            self._truncate(n + c)
            raise_if_cancelled()  # a step of many passes stops between them
            rows = self.backend.extend(self._cache, tail[c:], all_logits=True)
            self._ids.extend(tail[c:])
            for i, row in enumerate(rows):
                self._logprobs[n + c + 1 + i] = row
            self.stats.forward_passes += 1
            self.stats.tokens_forwarded += len(tail) - c
        offsets = [len(self.continuation_text(tail[:i])) for i in range(len(tail))]
        # the tokens must spell the text piece by piece (a token that splits a character does not)
        aligned = aligned and self.continuation_text(tail) == text and offsets == sorted(offsets)
        own = [greedy(self._logprobs[n + i]) for i in range(len(tail) + 1)] if aligned else []
        own_texts = {
            i: self.continuation_text(tail[:i] + [g])[offsets[i] if i < len(tail) else len(text) :]
            for i, g in enumerate(own)
            if i == len(tail) or g != tail[i]
        }
        return Followed(text, tail, offsets, own, own_texts, frozenset(self.backend.info.eos_token_ids), aligned)

    def _advance(self, pos: int, tok: int) -> None:
        """Make `tok` the token at `pos`, reusing the cached tail when it already is."""
        if pos < len(self._ids) and self._ids[pos] == tok and (pos + 1) in self._logprobs:
            self.stats.reused_tokens += 1
            return
        self._truncate(pos)
        raise_if_cancelled()  # a step of many passes stops between them
        self._logprobs[pos + 1] = self.backend.extend(self._cache, [tok])
        self._ids.append(tok)
        self.stats.forward_passes += 1
        self.stats.tokens_forwarded += 1

    # --- scoring --------------------------------------------------------------------------------
    def score(self, candidates: Sequence[str]) -> list[Score]:
        """Log-likelihood of each candidate as a continuation of the committed text.

        Candidates whose tokens are already in the cache (this model's own rollout) are read
        from the kept log-probs; the rest go through one batched forward pass.
        """
        self._sync()
        target = self.committed_ids()
        n = len(target)
        prefix_text = self.prompt + self.text
        results: list[Score | None] = [None] * len(candidates)
        pending: list[tuple[int, list[int], int]] = []  # (index, full ids, common prefix)
        for j, cand in enumerate(candidates):
            nbytes = len(cand.encode("utf-8"))
            if not cand:
                results[j] = Score(0.0, 0, 0, 0)
                continue
            full = self._tokenize(prefix_text + cand)
            k = common_prefix_len(target, full)
            toks = full[k:]
            # Known without a forward pass: each token's log-prob was kept for the position before
            # it (the first from the committed end, later ones from this model's own rollout tail).
            if (
                k == n
                and self._ids[n : n + len(toks) - 1] == toks[:-1]
                and all(n + i in self._logprobs for i in range(len(toks)))
            ):
                lp = sum(float(self._logprobs[n + i][t]) for i, t in enumerate(toks))
                self.stats.reused_tokens += len(toks)
                results[j] = Score(lp, len(toks), len(cand), nbytes)
            else:
                pending.append((j, full, k))
        if pending:
            p = min(k for _, _, k in pending)
            keep = n if p == n else max(p - 1, 0)
            # The candidates' states are kept: if one of them is committed next, the session adopts
            # its key/values instead of running its tokens again. (Candidates scored from kept
            # log-probs are not added to the pass: on this CPU a pass costs nearly in proportion
            # to its tokens, and adding them was measured slower.)
            fulls = [full for _, full, _ in pending]
            branches = [full[keep:] for full in fulls]
            raise_if_cancelled()  # a step of many passes stops between them
            outs, forks = self.backend.fork_branches(self._cache, keep, branches)
            self._forks = (forks, fulls)
            self.stats.forward_passes += 1
            self.stats.tokens_forwarded += sum(len(b) for b in branches)
            for (j, full, k), out in zip(pending, outs):
                lp = 0.0
                start = max(k, 1) if keep == 0 else k
                for t in range(start, len(full)):
                    lp += float(self._logprobs[n][full[t]]) if t == keep else float(out[t - keep - 1])
                results[j] = Score(lp, len(full) - start, len(candidates[j]), len(candidates[j].encode("utf-8")))
        return [r for r in results if r is not None]

    # --- internals ------------------------------------------------------------------------------
    def _tokenize(self, text: str) -> list[int]:
        self.stats.tokenizations += 1
        return self.backend.tokenize(text)

    def _truncate(self, length: int) -> None:
        if length < len(self._ids):
            self.backend.truncate(self._cache, length)
            del self._ids[length:]
            for key in [key for key in self._logprobs if key > length]:
                del self._logprobs[key]

    def _sync(self) -> None:
        if self._synced:
            return
        if self._closed:
            raise FuselmError(f"the session on {self.name!r} is closed")
        self._take_cache()
        target = self.committed_ids()
        n = len(target)
        if n == 0:
            raise FuselmError("the prompt is empty and the model has no BOS token; give a prompt")
        limit = self.backend.info.context_length
        if n > limit:
            raise FuselmError(f"prompt is longer than the context of {self.name!r}: {n} tokens > {limit}")
        forks, self._forks = self._forks, None
        k = common_prefix_len(self._ids, target)
        if not (k == n and n in self._logprobs) and forks is not None:
            self._adopt(forks, target)
            k = common_prefix_len(self._ids, target)
        if not (k == n and n in self._logprobs):
            if k == n:  # target is a strict prefix of the cache, logits at n not kept: redo one token
                k = n - 1
            self._truncate(k)
            if self.stats.prompt_tokens == 0:  # first sync: the prompt
                self.stats.prompt_tokens = n
                self.stats.cached_prompt_tokens = k
            raise_if_cancelled()  # a step of many passes stops between them
            self._logprobs[n] = self.backend.extend(self._cache, target[k:])
            self._ids = list(target)
            self.stats.forward_passes += 1
            self.stats.tokens_forwarded += n - k
        # Log-probs before the committed end are never needed again.
        for key in [key for key in self._logprobs if key < n]:
            del self._logprobs[key]
        self._synced = True

    def _take_cache(self) -> None:
        """Take the cache on first use, not when the session opens: a session that runs between
        the generation's opening and its first step (the prompt's NLL, for per-prompt weights)
        then starts from the warm prefix, and leaves it warmer for the generation."""
        if self._cache is None:
            self._cache = self.prefix_cache.take() if self.prefix_cache is not None else self.backend.new_cache()
            self._ids = self.backend.cached_ids(self._cache)

    def _adopt(self, forks: tuple[Forks, list[list[int]]], target: list[int]) -> bool:
        """Take the committed text's key/values from the last scoring pass, if it scored exactly it."""
        state, fulls = forks
        for j, full in enumerate(fulls):
            if full == target and state.available(j):
                self._truncate(state.keep)
                after = self.backend.adopt(self._cache, state, j)
                if after is None:
                    return False
                self._ids = list(target)
                self._logprobs[len(target)] = after
                self.stats.adopted_tokens += len(target) - state.keep
                return True
        return False


class _RolloutBuilder:
    """Bookkeeping shared by `rollout` and `rollout_branches`: token text after the committed
    text (decoded with the last committed token as anchor, so leading spaces survive), EOS on
    ids, and the caller's cut condition."""

    def __init__(self, session: DecodingSession, until, margins: bool):
        self.session = session
        self.until = until
        self.margins = margins
        self.anchor = session.committed_ids()[-1:]
        self.anchor_len = len(session.backend.decode(self.anchor)) if self.anchor else 0

    @staticmethod
    def new() -> Rollout:
        return Rollout("", [], [], [], [])

    def push(self, roll: Rollout, tok: int, lp: torch.Tensor) -> bool:
        """Add `tok` (chosen from `lp`); False when it is end of sequence."""
        if self.margins:
            roll.margins.append(top2_margin(lp))
        if self.session.is_eos(tok):
            roll.finished = True
            return False
        roll.token_logprobs.append(float(lp[tok]))
        roll.token_offsets.append(len(roll.text))
        roll.token_ids.append(tok)
        roll.text = self.session.backend.decode(self.anchor + roll.token_ids)[self.anchor_len :]
        return True

    def done(self, roll: Rollout) -> bool:
        """Whether the cut condition holds (never on half a UTF-8 character); cuts the text if so."""
        if self.until is None or roll.text.endswith("\ufffd"):
            return False
        cut = self.until(roll)
        if cut is None:
            return False
        roll.text = roll.text[:cut]
        return True
