"""/v1/completions' answers: a `text_completion` and its stream's chunks (the same object, with
the text so far cut into pieces)."""

from __future__ import annotations

from typing import Any

from ..result import GenerationResult
from .protocol import CompletionChoice, CompletionResponse, Usage
from .serving import FINISH, Responses


class CompletionResponses(Responses):
    endpoint = "completions"
    id_prefix = "cmpl"

    def response(self, results: list[GenerationResult], usage: Usage) -> CompletionResponse:
        choices = [
            CompletionChoice(index=i, text=r.text, finish_reason=FINISH[r.finish_reason], fuselm=self.info(r))
            for i, r in enumerate(results)
        ]
        return self._object(choices, usage)

    def chunk(self, index: int, text: str | None, finish: str | None = None, extra: Any = None) -> CompletionResponse:
        return self._object([CompletionChoice(index=index, text=text or "", finish_reason=finish, fuselm=extra)])

    def usage_chunk(self, usage: Usage) -> CompletionResponse:
        return self._object([], usage)

    def _object(self, choices: list[CompletionChoice], usage: Usage | None = None) -> CompletionResponse:
        return CompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)
