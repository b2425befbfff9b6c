"""A model on a serving engine, and one generation's session on it.

A :class:`RemoteSession` has the session operations that the exact methods use (`next_top`,
`rollout`, `rollout_branches`, `score`, `eos_score`), answered by the engine from token ids it
tokenized itself. It keeps no KV state (the engine's prefix cache does that job); what it keeps
is the **open stream**: a rollout (or a look at the next token's top-k) starts a streamed
completion from the committed tokens, read only as far as the caller needs. When the committed
text grows by what the stream produced (the model's own proposal won), the next rollout, the
next top-k and the scoring of that proposal read on in the same stream, like the speculative
tail of an in-process session; anything else closes it (the engine aborts it) and opens a new
one. A single model's generation is thus one request, and an AdaFuse round whose winner was
this model's proposal costs it only the scoring of the other candidates.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import math
import os
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

from ..cancel import GenerationCancelled, cancelled
from ..config import GenerationConfig, ModelConfig
from ..engines import Engine, EngineStream, Sampling, StreamToken, TextEngine, TokenEngine, engine_for
from ..errors import EngineError, FuselmError
from ..sampling import Sampler
from .backend import ModelInfo
from .expert import Expert
from .prompts import Prompt, chat_messages
from .session import NextTokens, Rollout, Score, Session, SessionStats, common_prefix_len, greedy, top_margin

# top-k asked of every stream (the engine clamps it to what it gives): the margin needs 2,
# AdaFuse's default branches 3; the rest is kept for scoring other models' candidates without
# a request (AdaFuse over the default pair on vLLM: scoring requests per token 1.0 -> 0.65)
TOP_K = 20

# How often a thread that waits for an engine call asks whether its generation was cancelled.
CANCEL_POLL_S = 0.05

T = TypeVar("T")


class RemoteModel(Expert):
    """A model served by an engine in another process. Making one sends nothing: what the engine
    is asked (its model id, BOS, end-of-sequence ids, context) is asked at the first use."""

    works_in_process = False

    def __init__(self, engine: Engine, config: ModelConfig):
        self.engine = engine
        self.config = config

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> RemoteModel:
        key = None
        if cfg.api_key_env:
            key = os.environ.get(cfg.api_key_env)
            if not key:
                raise FuselmError(f"model {cfg.name!r}: environment variable {cfg.api_key_env} is not set")
        assert cfg.engine is not None and cfg.url is not None
        engine = engine_for(cfg.engine, cfg.url, model=cfg.model, timeout_s=cfg.timeout_s, api_key=key,
                            tokenizer=cfg.tokenizer)  # fmt: skip
        return cls(engine, cfg)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def offers(self) -> frozenset[str]:
        return self.engine.offers

    @property
    def where(self) -> str:
        return self.engine.where

    @property
    def vocab_size(self) -> None:
        return None  # an engine does not tell it (its /tokenize answers ids, not their number)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Wait for an engine call; its faults name this model. The generation's cancel check
        (`fuselm.cancel`, seen in this thread's context) is asked before the call starts and
        every CANCEL_POLL_S while it runs: when it says yes, the call is cancelled on the engine
        loop (its connection closed, so the engine drops the request) and this raises
        GenerationCancelled."""
        if cancelled():
            coro.close()
            raise GenerationCancelled("cancelled by the caller")
        future = self.engine.submit(coro)
        try:
            while True:
                done, _ = concurrent.futures.wait([future], timeout=CANCEL_POLL_S)
                if done:
                    return future.result()
                if cancelled():
                    future.cancel()
                    raise GenerationCancelled("cancelled by the caller")
        except EngineError as e:
            raise EngineError(f"expert {self.name!r}: {e}") from None
        except concurrent.futures.CancelledError:  # not by this caller: the engine was closed under it
            raise EngineError(f"expert {self.name!r}: {self.where}: closed while a call ran") from None
        except BaseException:
            future.cancel()  # interrupted here (KeyboardInterrupt): leave nothing running there
            raise

    @property
    def info(self) -> ModelInfo:
        f = self.run(self.engine.facts())
        return ModelInfo(
            name=self.name, backend=self.engine.kind, architecture="?", vocab_size=0, context_length=f.context_length,
            eos_token_ids=frozenset(f.eos_token_ids), bos_token_id=f.bos_token_id,
            has_chat_template=f.has_chat_template, source=f"{self.engine.where} ({f.model})",
        )  # fmt: skip

    def prompt_text(self, prompt: Prompt, gen: GenerationConfig | None = None) -> str:
        """Raw, or rendered with the chat template on the engine (then detokenized, without the
        BOS that tokenizing adds again)."""
        facts = self.run(self.engine.facts())
        messages = chat_messages(prompt, gen or GenerationConfig(), facts.has_chat_template)
        if messages is None:
            return prompt  # type: ignore[return-value]
        if not facts.has_chat_template:
            raise FuselmError(
                f"model {self.name!r} on {self.where} has no chat template here; give a raw prompt"
                " (--raw; /v1/completions when served)"
            )
        ids = self.run(self.engine.chat_ids(messages))
        if facts.bos_token_id is not None and ids[:1] == [facts.bos_token_id]:
            ids = ids[1:]
        return self.run(self.engine.detokenize(ids))

    def tokenize(self, text: str) -> list[int]:
        return self.run(self.engine.tokenize(text))

    def decode(self, ids: list[int]) -> str:
        return self.run(self.engine.detokenize(ids))

    def session(self, prompt_text: str) -> RemoteSession | TextSession:
        if isinstance(self.engine, TextEngine):  # text in, text out: rollouts only
            return TextSession(self, prompt_text)
        return RemoteSession(self, prompt_text)

    def with_config(self, config: ModelConfig) -> RemoteModel:
        return RemoteModel(self.engine, config)

    def close(self) -> None:
        self.engine.close()

    def __repr__(self) -> str:
        return f"RemoteModel({self.name!r}, {self.engine.where!r})"


class _EngineSession(Session):
    """What the sessions on an engine share: the committed text, the open stream, closing."""

    calls_wait_on_io = True  # the engine computes; a call here waits for its answer

    def __init__(self, model: RemoteModel, prompt: str):
        self.model = model
        self.engine = model.engine
        self.prompt = prompt
        self.text = ""
        self.stats = SessionStats()
        self._closed = False
        self._stream: EngineStream | None = None
        self._sampling = Sampling()
        self._samplings: dict[int, Sampling] = {}  # per sampler: its seed is drawn once per generation

    @property
    def name(self) -> str:
        return self.model.name

    def append(self, text: str) -> None:
        self.text += text

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._stream is not None:
            stream, self._stream = self._stream, None
            try:
                self.engine.run(stream.aclose())
            except Exception:  # closing a dead connection: nothing to give back
                pass

    def _sampling_of(self, choose: Any) -> Sampling:
        if id(choose) not in self._samplings:
            self._samplings[id(choose)] = _sampling(choose, self.name)
        return self._samplings[id(choose)]


class RemoteSession(_EngineSession):
    """One model's view of one generation's text, on an engine (see the module docstring)."""

    engine: TokenEngine  # RemoteModel.session: a session on token ids is on a TokenEngine

    def __init__(self, model: RemoteModel, prompt: str):
        super().__init__(model, prompt)
        self._ids: dict[str, list[int]] = {}  # the engine's tokenizations, by text
        self._base: list[int] = []  # the ids the open stream continues
        self._top_of: tuple[list[int], dict[int, float]] | None = None  # the last top-k asked, and after what
        self._replayed: list[int] = []  # the tokens of the last `replay`
        # log p(token | prefix) that streams brought (each streamed token's own and its top-k):
        # `score` asks the engine only for the pairs not in here
        self._known: dict[tuple[int, ...], dict[int, float]] = {}
        self._n_committed = 0

    # --- the session's face --------------------------------------------------------------------
    def is_eos(self, token_id: int) -> bool:
        return token_id in self.model.run(self.engine.facts()).eos_token_ids

    def committed_ids(self) -> list[int]:
        return self.model.run(self._committed())

    def next_top(self, k: int) -> list[tuple[int, float]]:
        """The k most likely next tokens after the committed text (most likely first), with log-probs."""
        return self.model.run(self._next_top(k))

    def rollout(
        self,
        max_tokens: int,
        *,
        until: Callable[[Rollout], int | None] | None = None,
        first_token: int | None = None,
        choose: Callable[..., int] = greedy,
        margins: bool = True,
    ) -> Rollout:
        if max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        return self.model.run(self._rollout(max_tokens, until, first_token, self._sampling_of(choose), margins))

    def rollout_branches(
        self,
        first_tokens: Sequence[int],
        max_tokens: int,
        *,
        until: Callable[[Rollout], int | None] | None = None,
        choose: Callable[..., int] = greedy,
    ) -> list[Rollout]:
        """One rollout per forced first token, all at once (the branch of the greedy first token
        reads the session's own stream, the others a stream each)."""
        if max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        return self.model.run(self._branches(list(first_tokens), max_tokens, until, self._sampling_of(choose)))

    def score(self, candidates: Sequence[str]) -> list[Score]:
        return self.model.run(self._score(list(candidates)))

    def eos_score(self) -> Score:
        return self.model.run(self._eos_score())

    def next_logprobs(self):
        raise FuselmError(f"{self.name!r} on {self.model.where} gives top-k log-probs, not full distributions")

    def follow(self, text: str):
        raise FuselmError(f"{self.name!r} on {self.model.where} does not read a given text in one pass (draft_words)")

    # --- what the token-level methods read (approximately: top-k, not whole distributions) ---------
    @property
    def eos_ids(self) -> list[int]:
        return sorted(self.model.run(self.engine.facts()).eos_token_ids)

    def tokenize(self, text: str) -> list[int]:
        return self.model.run(self._tokenize_all([text]))[0]

    def next_tokens(self, k: int) -> NextTokens:
        """The engine's top-k after the committed text (as many as it gives, at least `k`)."""
        return self.tail_tokens(0, k)

    def tail_tokens(self, n_tokens: int, k: int) -> NextTokens:
        """The top-k after the committed text plus the first `n_tokens` of the last replay."""
        return self.model.run(self._tail_tokens(self._replayed[:n_tokens], k))

    def continuation_text(self, token_ids: Sequence[int]) -> str:
        """Text that `token_ids` add after the committed text, by the engine's detokenizer."""
        return self.model.run(self._continuation_text(list(token_ids)))

    def replay(self, token_ids: Sequence[int]) -> Rollout:
        """`token_ids` after the committed text, as a rollout (text only: the engine is asked
        about them when `tail_tokens` looks past them)."""
        self._replayed = list(token_ids)
        text = self.continuation_text(self._replayed)
        return Rollout(text, list(self._replayed), [], [], [0] * len(self._replayed))

    # --- internals (on the engine loop) ---------------------------------------------------------
    async def _tail_tokens(self, tokens: list[int], k: int) -> NextTokens:
        ids = await self._committed()
        top = await self._top_at(ids + tokens, max(k, self.engine.max_top_k))
        return NextTokens(top=dict(top))

    async def _continuation_text(self, tokens: list[int]) -> str:
        return await self._text_after(await self._committed(), tokens)

    async def _text_after(self, ids: list[int], tokens: list[int]) -> str:
        """The text `tokens` add after `ids`, decoded in the context of the last id (a lone
        SentencePiece token would lose its space)."""
        anchor = ids[-1:]
        text, head = await asyncio.gather(self.engine.detokenize(anchor + tokens), self.engine.detokenize(anchor))
        return text[len(head) :]

    async def _tokenize_all(self, texts: Sequence[str]) -> list[list[int]]:
        missing = [t for t in dict.fromkeys(texts) if t not in self._ids]
        if missing:
            got = await asyncio.gather(*(self.engine.tokenize(t) for t in missing))
            self.stats.tokenizations += len(missing)
            if len(self._ids) > 256:  # keep the cache small: only this text's future matters
                self._ids = {t: v for t, v in self._ids.items() if t.startswith(self.prompt + self.text)}
            self._ids.update(zip(missing, got))
        return [self._ids[t] for t in texts]

    async def _committed(self) -> list[int]:
        if self._closed:
            raise FuselmError(f"the session on {self.name!r} is closed")
        ids = (await self._tokenize_all([self.prompt + self.text]))[0]
        if not ids:
            raise FuselmError("the prompt is empty and the model has no BOS token; give a prompt")
        facts = await self.engine.facts()
        if len(ids) >= facts.context_length:
            raise FuselmError(
                f"prompt is longer than the context of {self.name!r}: {len(ids)} tokens >= {facts.context_length}"
            )
        if self.stats.prompt_tokens == 0:
            self.stats.prompt_tokens = len(ids)
        self._n_committed = len(ids)
        return ids

    def _learn(self, prefix: Sequence[int], tok: StreamToken) -> None:
        """Keep what a streamed token tells about the distribution after `prefix`."""
        if len(self._known) > 512:  # only prefixes at or after the committed text can be scored again
            self._known = {p: v for p, v in self._known.items() if len(p) >= self._n_committed - 1}
        known = self._known.setdefault(tuple(prefix), {})
        known.update(tok.top)
        known[tok.token_id] = tok.logprob

    def _tail_index(self, ids: list[int]) -> int | None:
        """Where `ids` ends in the open stream's tokens, if the stream continues `ids`."""
        s = self._stream
        b = len(self._base)
        if s is None or len(ids) < b or ids[:b] != self._base:
            return None
        rest = ids[b:]
        got = [t.token_id for t in s.tokens[: len(rest)]]
        if got != rest[: len(got)] or (len(got) < len(rest) and s.done):
            return None
        return len(rest)

    async def _seek(
        self, ids: list[int], lookahead: int, sampling: Sampling, k: int = TOP_K
    ) -> tuple[EngineStream, int]:
        """A stream that continues `ids` (with at least the top-`k`) and the index of the token
        after them in it: the open one when it does, else a new one (the old one is closed: the
        engine stops it)."""
        fits = sampling == self._sampling and self._stream is not None and self._stream.k >= k
        j = self._tail_index(ids) if fits else None
        if j is not None and self._stream is not None:
            if len(self._stream.tokens) < j:
                await self._stream.read(j)
                j = self._tail_index(ids)
            if j is not None and (j < len(self._stream.tokens) or not self._stream.done):
                return self._stream, j
        if self._stream is not None:
            await self._stream.aclose()
        facts = await self.engine.facts()
        room = facts.context_length - len(ids)
        if room < 1:
            raise FuselmError(f"{self.name!r}: the text has reached its context of {facts.context_length} tokens")
        self._stream = await self.engine.stream(ids, min(lookahead, room), max(k, TOP_K), sampling)
        self._base, self._sampling = list(ids), sampling
        self.stats.forward_passes += 1
        return self._stream, 0

    async def _token(self, ids: list[int], lookahead: int, sampling: Sampling, k: int = TOP_K) -> StreamToken:
        stream, j = await self._seek(ids, lookahead, sampling, k)
        before = len(stream.tokens)
        await stream.read(j + 1)
        self.stats.tokens_forwarded += len(stream.tokens) - before
        if j >= len(stream.tokens):
            # the stream ended at its max_tokens just before: a new one goes on from here
            stream, j = await self._seek(ids, lookahead, sampling, k)
            await stream.read(j + 1)
            if j >= len(stream.tokens):
                raise EngineError(f"{self.engine.where} ended a stream without a token")
        if sampling == Sampling():  # a sampled stream's log-probs may be of the tempered distribution
            self._learn(ids, stream.tokens[j])
        return stream.tokens[j]

    async def _top_at(self, ids: list[int], k: int = TOP_K) -> dict[int, float]:
        """The top-k after `ids` (the greedy stream's token there; kept for the round)."""
        if self._top_of is None or self._top_of[0] != ids or len(self._top_of[1]) < k:
            tok = await self._token(ids, 16, Sampling(), k)
            self._top_of = (list(ids), tok.top)
        return self._top_of[1]

    async def _next_top(self, k: int) -> list[tuple[int, float]]:
        if k > self.engine.max_top_k:
            raise FuselmError(f"{self.name!r} on {self.model.where} gives at most the top {self.engine.max_top_k}")
        top = await self._top_at(await self._committed(), k)
        return sorted(top.items(), key=lambda kv: -kv[1])[:k]

    async def _rollout(
        self, max_tokens: int, until, first_token: int | None, sampling: Sampling, margins: bool
    ) -> Rollout:
        ids = await self._committed()
        roll = Rollout("", [], [], [], [])
        if first_token is not None:
            return await self._forced(ids, first_token, max_tokens, until, sampling, margins)
        pos = list(ids)
        while len(roll.token_ids) < max_tokens:
            tok = await self._token(pos, max_tokens - len(roll.token_ids), sampling)
            if not _push(roll, tok, margins) or _done(roll, until):
                break
            pos.append(tok.token_id)
        if not roll.token_ids and not roll.finished:
            raise EngineError(f"{self.engine.where} gave no token")
        return roll

    async def _forced(self, ids, first: int, max_tokens: int, until, sampling: Sampling, margins: bool) -> Rollout:
        """A rollout whose first token is given: its log-prob from the top-k after `ids`, its text
        from the engine's detokenizer, the rest from a stream of its own (closed when done)."""
        top = await self._top_at(ids)  # asked before any branch runs: no stream is read here
        roll = Rollout("", [], [], [], [])
        if margins:
            roll.margins.append(top_margin(top))
        facts = await self.engine.facts()
        if first in facts.eos_token_ids:
            roll.finished = True
            return roll
        if first not in top:
            lp = (await self.engine.score([ids + [first]], [len(ids)]))[0][0]
        else:
            lp = top[first]
        roll.token_ids.append(first)
        roll.token_logprobs.append(lp)
        roll.token_offsets.append(0)
        roll.text = await self._text_after(ids, [first])
        if max_tokens == 1 or _done(roll, until):
            return roll
        stream = await self.engine.stream(ids + [first], max_tokens - 1, TOP_K if margins else 1, sampling)
        self.stats.forward_passes += 1
        try:
            while len(roll.token_ids) < max_tokens:
                await stream.read(len(roll.token_ids))
                if len(stream.tokens) < len(roll.token_ids):
                    break
                tok = stream.tokens[len(roll.token_ids) - 1]
                self.stats.tokens_forwarded += 1
                if sampling == Sampling():
                    self._learn(ids + roll.token_ids, tok)
                if not _push(roll, tok, margins) or _done(roll, until):
                    break
        finally:
            await stream.aclose()
        return roll

    async def _branches(self, firsts: list[int], max_tokens: int, until, sampling: Sampling) -> list[Rollout]:
        ids = await self._committed()
        top = await self._top_at(ids)
        greedy_first = max(top, key=lambda t: top[t]) if top else None

        async def one(first: int) -> Rollout:
            if sampling == Sampling() and first == greedy_first:
                return await self._rollout(max_tokens, until, None, sampling, False)
            return await self._forced(ids, first, max_tokens, until, sampling, False)

        return list(await asyncio.gather(*(one(f) for f in firsts)))

    async def _score(self, candidates: list[str]) -> list[Score]:
        ids = await self._committed()
        n = len(ids)
        prefix = self.prompt + self.text
        texts = [c for c in candidates if c]
        fulls = dict(zip(texts, await self._tokenize_all([prefix + c for c in texts])))
        results: dict[int, Score] = {}
        pending: list[tuple[int, list[int], int]] = []
        j = self._tail_index(ids)
        tail = self._stream.tokens[j:] if (j is not None and self._stream is not None) else []
        for i, cand in enumerate(candidates):
            nbytes = len(cand.encode("utf-8"))
            if not cand:
                results[i] = Score(0.0, 0, 0, 0)
                continue
            full = fulls[cand]
            k = common_prefix_len(ids, full)
            toks = full[k:]
            # this model's own continuation: its log-probs came with the stream
            if k == n and len(toks) <= len(tail) and [t.token_id for t in tail[: len(toks)]] == toks:
                results[i] = Score(sum(t.logprob for t in tail[: len(toks)]), len(toks), len(cand), nbytes)
                self.stats.reused_tokens += len(toks)
            else:
                pending.append((i, full, max(k, 1)))
        if pending:
            # each candidate's positions: from what streams brought, else asked, in runs of
            # consecutive positions (one scored sequence each), all in one call
            lps: list[list[float | None]] = []
            runs: list[tuple[int, int, int]] = []  # (pending index, first position, end)
            for r, (_, full, start) in enumerate(pending):
                row = [self._known.get(tuple(full[:p]), {}).get(full[p]) for p in range(start, len(full))]
                lps.append(row)
                p = 0
                while p < len(row):
                    if row[p] is None:
                        end = p
                        while end < len(row) and row[end] is None:
                            end += 1
                        runs.append((r, start + p, start + end))
                        p = end
                    else:
                        self.stats.reused_tokens += 1
                        p += 1
            if runs:
                asked = await self.engine.score([pending[r][1][:end] for r, _, end in runs], [a for _, a, _ in runs])
                self.stats.forward_passes += 1
                self.stats.tokens_forwarded += sum(len(x) for x in asked)
                for (r, a, _), got in zip(runs, asked):
                    start = pending[r][2]
                    lps[r][a - start : a - start + len(got)] = got
            for (i, full, start), row in zip(pending, lps):
                cand = candidates[i]
                results[i] = Score(float(sum(row)), len(full) - start, len(cand), len(cand.encode("utf-8")))  # type: ignore[arg-type]
        return [results[i] for i in range(len(candidates))]

    async def _eos_score(self) -> Score:
        ids = await self._committed()
        eos = sorted((await self.engine.facts()).eos_token_ids)
        if not eos:
            raise EngineError(f"{self.engine.where}: its end-of-sequence token is unknown; give eos_token_ids")
        rows = await self.engine.score([ids + [e] for e in eos], [len(ids)] * len(eos))
        self.stats.forward_passes += 1
        lps = [r[0] for r in rows]
        top = max(lps)
        return Score(top + math.log(sum(math.exp(x - top) for x in lps)), 1, 0, 0)


class TextSession(_EngineSession):
    """A generation's session on an engine that takes text prompts and streams text without
    token ids (llama-cpp-python's server): rollouts only, which is what `single` needs; the
    methods that need more are refused before they get here (its `offers`). Like
    `RemoteSession` it keeps the open stream, opened on the prompt plus the committed text with
    the rest of the budget: while the committed text grows by what the stream produced, the next
    rollout reads on in it, so a generation is one request. A stream the engine ended early (it
    serves one request at a time and a new one interrupts it) is opened again from there."""

    engine: TextEngine

    def __init__(self, model: RemoteModel, prompt: str):
        super().__init__(model, prompt)
        self._base = ""  # the text the open stream continues
        self._matched: tuple[int, str] = (0, "")  # its tokens the committed text covered at the last seek

    def rollout(
        self,
        max_tokens: int,
        *,
        until: Callable[[Rollout], int | None] | None = None,
        first_token: int | None = None,
        choose: Callable[..., int] = greedy,
        margins: bool = True,
    ) -> Rollout:
        """Up to `max_tokens` tokens after the committed text: their text and count (no ids, no
        log-probs: the engine does not give them reliably)."""
        if max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if first_token is not None:
            raise FuselmError(f"{self.name!r} on {self.model.where} takes text: no forced first token")
        return self.model.run(self._rollout(max_tokens, until, self._sampling_of(choose)))

    async def _rollout(self, max_tokens: int, until, sampling: Sampling) -> Rollout:
        if self._closed:
            raise FuselmError(f"the session on {self.name!r} is closed")
        roll = Rollout("", [], [], [], [])
        stream, j = await self._seek(self.prompt + self.text, max_tokens, sampling)
        while len(roll.token_offsets) < max_tokens:
            await stream.read(j + 1)
            if j >= len(stream.tokens):
                if stream.finished:
                    roll.finished = True
                    break
                # ended at its max_tokens, or interrupted by another request: go on from here
                rest = max_tokens - len(roll.token_offsets)
                stream, j = await self._open(self.prompt + self.text + roll.text, rest, sampling), 0
                await stream.read(1)
                if not stream.tokens and not stream.finished:
                    raise EngineError(f"{self.engine.where} ended a stream without a token")
                continue
            tok = stream.tokens[j]
            j += 1
            self.stats.tokens_forwarded += 1
            roll.token_offsets.append(len(roll.text))
            roll.text += tok.text
            if _done(roll, until):
                break
        return roll

    async def _seek(self, full: str, max_tokens: int, sampling: Sampling) -> tuple[EngineStream, int]:
        """The open stream and the index of its token after `full`, when it continues `full`;
        else a new stream on `full`."""
        s = self._stream
        if s is not None and sampling == self._sampling and full.startswith(self._base):
            rest = full[len(self._base) :]
            # go on from where the last seek matched (a generation commits token by token)
            j, seen = self._matched if rest.startswith(self._matched[1]) else (0, "")
            while len(seen) < len(rest):
                await s.read(j + 1)
                if j >= len(s.tokens):
                    break
                seen += s.tokens[j].text
                j += 1
            if seen == rest and (j < len(s.tokens) or not s.done or s.finished):
                self._matched = (j, seen)
                return s, j
        return await self._open(full, max_tokens, sampling), 0

    async def _open(self, full: str, max_tokens: int, sampling: Sampling) -> EngineStream:
        if self._stream is not None:
            await self._stream.aclose()
        if self.stats.prompt_tokens == 0:  # asked first: any request interrupts a running stream there
            self.stats.prompt_tokens = len(await self.engine.tokenize(full))
        self._stream = await self.engine.text_stream(full, max_tokens, sampling)
        self._base, self._sampling, self._matched = full, sampling, (0, "")
        self.stats.forward_passes += 1
        return self._stream


def _push(roll: Rollout, tok: StreamToken, margins: bool) -> bool:
    """Add a streamed token to a rollout; False at end of sequence (not part of the text)."""
    if margins:
        roll.margins.append(top_margin(tok.top))
    if tok.eos:
        roll.finished = True
        return False
    roll.token_logprobs.append(tok.logprob)
    roll.token_offsets.append(len(roll.text))
    roll.token_ids.append(tok.token_id)
    roll.text += tok.text
    return True


def _done(roll: Rollout, until) -> bool:
    if until is None or not roll.text:
        return False
    cut = until(roll)
    if cut is None:
        return False
    roll.text = roll.text[:cut]
    return True


def _sampling(choose: Any, name: str) -> Sampling:
    """How the engine should choose tokens for a session's `choose`."""
    if choose is greedy:
        return Sampling()
    if isinstance(choose, Sampler):
        if choose.greedy:
            return Sampling()
        # The engine's seed: from the generation's seed and the model (experts sample at once, on
        # their own threads, so drawing from one shared generator would depend on who came first).
        seed = None
        if choose.seed is not None:
            seed = int.from_bytes(hashlib.sha256(f"{choose.seed}:{name}".encode()).digest()[:4], "big") >> 1
        return Sampling(choose.temperature, choose.top_p, choose.top_k, seed)
    raise FuselmError("an expert on an engine chooses its tokens there: greedy or sampled, no custom chooser")
