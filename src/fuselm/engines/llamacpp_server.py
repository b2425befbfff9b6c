"""llama-cpp-python's server, checked against 0.3.36 (`/v1/completions` on text,
`/extras/tokenize`, `/extras/detokenize`, `/v1/models`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import StrictStr

from .answers import Answer
from .base import EngineFacts, Sampling
from .stream import EngineStream
from .text_engine import TextEngine

# The context length of an engine that does not say it (its own error then tells).
UNKNOWN_CONTEXT = 1 << 30


class _TextChoice(Answer):
    text: StrictStr | None = None
    finish_reason: StrictStr | None = None


class _TextChunk(Answer):
    choices: list[_TextChoice] = []


class LlamaCppServerEngine(TextEngine):
    """llama-cpp-python's server (`python -m llama_cpp.server --model FILE.gguf`), for
    generation only. It takes text prompts (no token ids), keys its top-k by token text, and its
    `echo` log-probs are shifted by one position on models without BOS (measured with 0.3.36:
    -8.45 for " Paris" after "The capital of France is", the log-prob of " Paris" after " Paris";
    the right value, -0.26, sits in the previous position's top-k; pinned by a test), so fuselm
    neither scores candidates nor reads a top-k through it (a text engine: it has no `stream` of
    token ids and no `score`): `single` runs on it, every other method is refused before any
    request. Its streamed chunks carry text, one chunk per token (a character that spans tokens
    comes as one chunk): a rollout on it has its text and a token count, no token ids. It serves
    one request at a time (a new one interrupts a running stream, which is then asked again from
    where it stopped), keeps its own prefix cache, renders no chat template for a client
    (prompts go raw) and does not say its context length (a prompt too long for it is its
    error). It tokenizes what it is sent itself; fuselm only counts with its `/extras/tokenize`."""

    kind = "llamacpp-server"

    async def _ask_facts(self) -> EngineFacts:
        await self._served_model()
        empty = await self._tokenize("")  # [BOS] where the model adds one, else []
        return EngineFacts(str(self.model_id), UNKNOWN_CONTEXT, empty[0] if empty else None, frozenset(), False)

    async def _tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = await self._token_ids("/extras/tokenize", {"model": self.model_id, "input": text})
        if not add_special_tokens and self._facts is not None and self._facts.bos_token_id is not None:
            ids = ids[1:] if ids[:1] == [self._facts.bos_token_id] else ids
        return ids

    async def _detokenize(self, ids: Sequence[int]) -> str:
        return await self._text_of("/extras/detokenize", {"model": self.model_id, "tokens": list(ids)}, "text")

    async def text_stream(self, prompt: str, max_tokens: int, sampling: Sampling) -> EngineStream:
        await self.facts()
        body = {"model": self.model_id, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
                # its request defaults differ from greedy/plain sampling: no penalty, no min-p cut
                "repeat_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0, "min_p": 0.0,
                "typical_p": 1.0, "top_k": sampling.top_k, "top_p": sampling.top_p,
                "temperature": sampling.temperature}  # fmt: skip
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        return await self._open_stream("/v1/completions", body, max_tokens, 0, [])

    async def _stream_chunk(self, stream: EngineStream, chunk: Any) -> None:
        for choice in self._completion_choices(chunk, stream.path, _TextChunk):
            text = choice.text or ""
            finish = choice.finish_reason
            if text or finish is None:
                self._push_text(stream, text)
            if finish is not None:
                # "stop" is the end of sequence (fuselm sends no stop strings), "length" max_tokens
                stream.finished = finish == "stop"
                await stream.aclose()
