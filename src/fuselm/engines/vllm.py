"""vLLM's OpenAI-compatible server (`vllm serve MODEL`), checked against vLLM 0.32.0 (CPU build:
`/v1/completions`, `/tokenize`, `/detokenize`, `/v1/models`)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from pydantic import StrictInt, StrictStr

from ..errors import EngineError
from .answers import Answer, IdKey, LogProb, PlainIdKey, Tokens
from .base import Sampling
from .stream import EngineStream
from .token_engine import TokenEngine
from .transport import MAX_REPLY_BYTES, REPLY_BYTES_PER_TOKEN

# How vLLM writes -inf in JSON, and the value of the placeholders in a mangled top-k (see _top).
_PLACEHOLDER = -9999.0


def _mangled(top: dict[int, float], k: int) -> bool:
    """A top-k that is not one: fewer entries than asked, or placeholders among them."""
    return len(top) < k or any(v <= _PLACEHOLDER for v in top.values())


class _Logprobs(Answer):
    tokens: list[IdKey] = []
    token_logprobs: list[LogProb] = []
    top_logprobs: list[dict[IdKey, LogProb] | None] = []


class _PromptLogprob(Answer):
    logprob: LogProb
    rank: StrictInt


class _Choice(Answer):
    text: StrictStr | None = None
    logprobs: _Logprobs | None = None
    finish_reason: StrictStr | None = None
    prompt_logprobs: list[dict[PlainIdKey, _PromptLogprob] | None] | None = None


class _Completion(Answer):
    choices: list[_Choice]


class VLLMEngine(TokenEngine):
    """vLLM's OpenAI-compatible server (`vllm serve MODEL`)."""

    kind = "vllm"
    max_top_k = 20  # vLLM's default --max-logprobs

    _detokenized_key = "prompt"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.forced_scores = 0  # scored (prefix, token) pairs asked one by one (score)
        self.mangled_tops = 0  # top-k answers that came back mangled and were asked again (_top)

    async def _told_eos_ids(self) -> frozenset[int]:
        try:  # only where the server enables it (--enable-tokenizer-info-endpoint)
            info = await self.transport.request("GET", "/tokenizer_info")
        except EngineError:
            return frozenset()
        if not isinstance(info, dict):
            raise self.transport.bad("/tokenizer_info", "an unexpected answer (not an object)")
        tok = info.get("eos_token")
        tok = tok.get("content") if isinstance(tok, dict) else tok
        return frozenset(await self._single_token(tok)) if isinstance(tok, str) else frozenset()

    async def _single_token(self, text: str) -> list[int]:
        body = {"model": self.model_id, "prompt": text, "add_special_tokens": False, "return_token_strs": True}
        out = self._parse(Tokens, await self.transport.request("POST", "/tokenize", body), "/tokenize")
        strs = out.token_strs or []
        return out.tokens if len(out.tokens) == 1 and strs and strs[0] == text else []

    async def stream(self, ids: Sequence[int], max_tokens: int, k: int, sampling: Sampling) -> EngineStream:
        await self.facts()
        k = min(max(k, 1), self.max_top_k)
        body = {"model": self.model_id, "prompt": list(ids), "max_tokens": max_tokens, "stream": True,
                "logprobs": k, "return_tokens_as_token_ids": True, "skip_special_tokens": True,
                **sampling.body()}  # fmt: skip
        return await self._open_stream("/v1/completions", body, max_tokens, k, list(ids))

    async def _stream_chunk(self, stream: EngineStream, chunk: Any) -> None:
        for choice in self._completion_choices(chunk, stream.path, _Completion):
            lp = choice.logprobs or _Logprobs()
            ids = lp.tokens
            stream.room(len(ids))  # before any top-k is asked again for them
            tops = []
            for i, top in enumerate(lp.top_logprobs):
                top = top or {}
                if _mangled(top, stream.k) and i < len(ids):  # see _top: asked again on its own
                    self.mangled_tops += 1
                    top = await self._top(stream.prompt + [t.token_id for t in stream.tokens] + ids[:i], stream.k)
                tops.append(top)
            await self._push_tokens(stream, ids, lp.token_logprobs, tops, choice.text or "")
            if choice.finish_reason is not None:
                await self._end_stream(stream, choice.finish_reason == "stop")

    async def _choice(self, body: dict[str, Any], limit: int = MAX_REPLY_BYTES) -> _Choice:
        """The one choice of a completion that is not streamed."""
        path = "/v1/completions"
        choices = self._parse(_Completion, await self.transport.request("POST", path, body, limit), path).choices
        if len(choices) != 1:
            raise self.transport.bad(path, f"{len(choices)} choices (1 asked)")
        return choices[0]

    async def score(self, sequences: Sequence[Sequence[int]], starts: Sequence[int]) -> list[list[float]]:
        """Each scored (prefix, token) is a one-token completion of its prefix restricted to that
        token (`allowed_token_ids`), all at once: vLLM reports the raw log-prob, before the
        restriction (exact, checked against `prompt_logprobs` for a token of rank 12,636), batches
        them and reads every prefix from its prefix cache. Not `prompt_logprobs`, which is exact
        too but recomputes the whole prefix (vLLM skips the prefix cache for such requests:
        measured 31 s per NQ row with AdaFuse when every score went that way), nor a top-20 with
        a second request for a token outside it (two waves per round). Not `logprob_token_ids`:
        in vLLM 0.32 one such request replaces the top-k of every other request in its batch by
        placeholders (see _top); `allowed_token_ids` leaves them alone (pinned by a test)."""
        if any(s < 1 for s in starts):
            raise ValueError("start must be >= 1: the first token has no context to be scored in")
        pairs = list(dict.fromkeys((tuple(seq[:i]), seq[i]) for seq, start in zip(sequences, starts)
                                   for i in range(start, len(seq))))  # fmt: skip
        if not pairs:
            return [[] for _ in sequences]
        await self.facts()
        found = await asyncio.gather(*(self._forced_logprob(list(p), t) for p, t in pairs))
        known = dict(zip(pairs, found))
        return [
            [known[tuple(seq[:i]), seq[i]] for i in range(start, len(seq))] for seq, start in zip(sequences, starts)
        ]

    async def _forced_logprob(self, prefix: list[int], token: int) -> float:
        """log p(token | prefix): a one-token completion that may only choose `token`."""
        body = {"model": self.model_id, "prompt": prefix, "max_tokens": 1, "temperature": 0, "logprobs": 1,
                "allowed_token_ids": [token], "return_tokens_as_token_ids": True}  # fmt: skip
        lp = (await self._choice(body)).logprobs
        if lp is None or not lp.tokens or not lp.token_logprobs:
            raise self.transport.bad("/v1/completions", f"a completion without the log-prob of token {token}")
        got, value = lp.tokens[0], lp.token_logprobs[0]
        if got != token:
            raise EngineError(f"{self.where} was asked for token {token} only and answered token {got}")
        self.forced_scores += 1
        return value

    async def _top(self, prefix: list[int], k: int) -> dict[int, float]:
        """The top-`k` next tokens after `prefix` (one-token completion), checked: vLLM 0.32 gives
        every request in a batch the `logprob_token_ids` shape as soon as one request in it asks
        for them (sampler.py prefers them for the whole batch), so a top-k can come back as the
        sampled token plus placeholder entries (id 0 at -9999). Another client of the same engine
        can cause it. Such an answer is asked again, and then through `prompt_logprobs`, which
        that bug does not reach (exact, but it recomputes the prefix)."""
        body = {"model": self.model_id, "prompt": prefix, "max_tokens": 1, "temperature": 0, "logprobs": k,
                "return_tokens_as_token_ids": True}  # fmt: skip
        for _ in range(2):
            lp = (await self._choice(body)).logprobs
            top = lp.top_logprobs[0] if lp is not None and lp.top_logprobs else None
            if top is None:
                raise self.transport.bad("/v1/completions", f"a completion without its top-{k} log-probs")
            if len(top) > k + 1:
                raise self.transport.bad("/v1/completions", f"a top-k of more than {k + 1} entries ({k} asked)")
            if not _mangled(top, k):
                return top
            self.mangled_tops += 1
        _, top = await self._prompt_logprobs(prefix + [0], k)  # any token after the prefix
        if _mangled(top, k):
            raise EngineError(f"{self.where} answered the top-{k} after {len(prefix)} tokens with placeholders")
        return top

    async def _prompt_logprobs(self, seq: list[int], k: int = 0) -> tuple[float, dict[int, float]]:
        """Through `prompt_logprobs` (exact, uncached): log p(last token | the tokens before it),
        and the top-`k` there."""
        body = {"model": self.model_id, "prompt": seq, "max_tokens": 1, "temperature": 0, "prompt_logprobs": k}
        choice = await self._choice(body, MAX_REPLY_BYTES + REPLY_BYTES_PER_TOKEN * len(seq))
        last = choice.prompt_logprobs[-1] if choice.prompt_logprobs else None
        if last is None or seq[-1] not in last:
            raise self.transport.bad("/v1/completions", f"prompt_logprobs without the log-probs of {seq[-1]}")
        top = {t: e.logprob for t, e in last.items() if e.rank <= k}
        return last[seq[-1]].logprob, top
