"""The base of engines that take text prompts and stream text without token ids (llama.cpp's
server): generation only. It has no `stream` of token ids and no `score`, so it offers rollouts
alone, and the methods that need more are refused before any request (`offers`)."""

from __future__ import annotations

from ..conventions import OFFERS_ROLLOUT
from .base import Engine, Sampling
from .stream import EngineStream, StreamToken

# The token id of a streamed token from an engine that does not say it.
TEXT_ONLY = -1


class TextEngine(Engine):
    """An engine on text: a subclass says how it streams a completion of a text (`text_stream`,
    `_stream_chunk`); each streamed token carries its text only."""

    offers = frozenset({OFFERS_ROLLOUT})

    async def text_stream(self, prompt: str, max_tokens: int, sampling: Sampling) -> EngineStream:
        """A completion of the text `prompt`, streamed: each token is a `StreamToken` with its
        text only (`token_id` TEXT_ONLY, no log-probs)."""
        raise NotImplementedError

    @staticmethod
    def _push_text(stream: EngineStream, text: str) -> None:
        """Add one streamed token, known by its text alone."""
        stream.room(1)
        stream.tokens.append(StreamToken(TEXT_ONLY, 0.0, {}, text))
