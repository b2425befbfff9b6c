"""SGLang's server, checked against SGLang 0.5.23 (its CPU path: `/generate`, `/tokenize`,
`/detokenize`, `/v1/models`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

from pydantic import BeforeValidator, StrictStr

from .answers import Answer, LogProb, TokenId
from .base import Sampling
from .stream import EngineStream
from .token_engine import TokenEngine
from .transport import MAX_REPLY_BYTES, REPLY_BYTES_PER_TOKEN


def _first_two(v: Any) -> Any:
    """SGLang's [log-prob, token id, text] as (log-prob, token id)."""
    return tuple(v[:2]) if isinstance(v, list) else v


class _Meta(Answer):
    output_token_logprobs: list[Annotated[tuple[LogProb, TokenId], BeforeValidator(_first_two)]]
    output_top_logprobs: list[list[Annotated[tuple[LogProb, TokenId], BeforeValidator(_first_two)]]]
    finish_reason: dict[str, Any] | StrictStr | None = None


class _Chunk(Answer):
    text: StrictStr | None = None
    meta_info: _Meta


class _ScoreMeta(Answer):
    input_token_logprobs: list[Annotated[tuple[LogProb | None, TokenId], BeforeValidator(_first_two)]]


class _Score(Answer):
    meta_info: _ScoreMeta


class SGLangEngine(TokenEngine):
    """SGLang's server (`python -m sglang.launch_server --model-path MODEL`): its native
    `/generate` on `input_ids`, which streams the answer so far (ids, text, log-probs and top-k)
    and scores several sequences in one request (`logprob_start_len`), from its radix cache."""

    kind = "sglang"
    _detokenize_options = {"skip_special_tokens": False}  # a rendered chat prompt keeps its markers

    async def stream(self, ids: Sequence[int], max_tokens: int, k: int, sampling: Sampling) -> EngineStream:
        await self.facts()
        k = min(max(k, 1), self.max_top_k)
        params: dict[str, Any] = {"max_new_tokens": max_tokens, "temperature": sampling.temperature,
                                  "skip_special_tokens": True}  # fmt: skip
        if sampling.temperature > 0:
            params.update(top_p=sampling.top_p, top_k=sampling.top_k or -1)
            if sampling.seed is not None:
                params["sampling_seed"] = sampling.seed
        body = {"input_ids": list(ids), "sampling_params": params, "stream": True, "return_logprob": True,
                "top_logprobs_num": k, "logprob_start_len": -1}  # fmt: skip
        return await self._open_stream("/generate", body, max_tokens, k, list(ids))

    async def _stream_chunk(self, stream: EngineStream, chunk: Any) -> None:
        self._chunk_error(chunk, stream.path)
        answer = self._parse(_Chunk, chunk, stream.path)
        meta = answer.meta_info
        seen = len(stream.tokens)
        # each chunk carries everything so far: take what is new
        lps = [lp for lp, _ in meta.output_token_logprobs[seen:]]
        ids = [t for _, t in meta.output_token_logprobs[seen:]]
        tops = [{t: v for v, t in top} for top in meta.output_top_logprobs[seen:]]
        text = answer.text or ""
        new_text = text[len(stream.text) :] if text.startswith(stream.text) else ""
        stream.text = text
        await self._push_tokens(stream, ids, lps, tops, new_text)
        finish = meta.finish_reason
        if finish is not None:
            await self._end_stream(stream, isinstance(finish, dict) and finish.get("type") == "stop")

    async def score(self, sequences: Sequence[Sequence[int]], starts: Sequence[int]) -> list[list[float]]:
        """All sequences in one `/generate` request that generates nothing: the log-probs of the
        input tokens from `start` on (SGLang gives the first asked position none, hence
        `start - 1`), the shared prefix read from the radix cache."""
        if any(s < 1 for s in starts):
            raise ValueError("start must be >= 1: the first token has no context to be scored in")
        todo = [i for i, (seq, start) in enumerate(zip(sequences, starts)) if start < len(seq)]
        out: list[list[float]] = [[] for _ in sequences]
        if not todo:
            return out
        await self.facts()
        body = {"input_ids": [list(sequences[i]) for i in todo], "logprob_start_len": [starts[i] - 1 for i in todo],
                "return_logprob": True, "sampling_params": {"max_new_tokens": 0, "temperature": 0}}  # fmt: skip
        limit = MAX_REPLY_BYTES + REPLY_BYTES_PER_TOKEN * sum(len(sequences[i]) for i in todo)
        answers = await self.transport.request("POST", "/generate", body, limit)
        answers = answers if isinstance(answers, list) else [answers]
        if len(answers) != len(todo):
            raise self.transport.bad("/generate", f"{len(answers)} answers to {len(todo)} sequences")
        for i, answer in zip(todo, answers):
            entries = self._parse(_Score, answer, "/generate").meta_info.input_token_logprobs[1:]
            got = [lp for lp, _ in entries]
            if len(got) != len(sequences[i]) - starts[i]:
                raise self.transport.bad("/generate", f"{len(got)} scored tokens, not {len(sequences[i]) - starts[i]}")
            if any(lp is None for lp in got):
                raise self.transport.bad("/generate", "a score without input log-probs")
            out[i] = got  # type: ignore[assignment]
        return out
