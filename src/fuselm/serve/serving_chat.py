"""/v1/chat/completions' answers: a `chat.completion`, and its stream's `chat.completion.chunk`s
(each choice opens with the assistant's role, then its text as deltas)."""

from __future__ import annotations

from typing import Any

from ..result import GenerationResult
from .protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    Delta,
    Usage,
)
from .serving import FINISH, Responses


class ChatResponses(Responses):
    endpoint = "chat"
    id_prefix = "chatcmpl"

    def response(self, results: list[GenerationResult], usage: Usage) -> ChatCompletionResponse:
        choices = [
            ChatChoice(
                index=i,
                message=AssistantMessage(content=r.text),
                finish_reason=FINISH[r.finish_reason],
                fuselm=self.info(r),
            )
            for i, r in enumerate(results)
        ]
        return ChatCompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)

    def opening(self, index: int) -> ChatCompletionChunk:
        return self._chunk([ChatChunkChoice(index=index, delta=Delta(role="assistant", content=""))])

    def chunk(self, index: int, text: str | None, finish: str | None = None, extra: Any = None) -> ChatCompletionChunk:
        return self._chunk(
            [ChatChunkChoice(index=index, delta=Delta(content=text), finish_reason=finish, fuselm=extra)]
        )

    def usage_chunk(self, usage: Usage) -> ChatCompletionChunk:
        return self._chunk([], usage)

    def _chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)
