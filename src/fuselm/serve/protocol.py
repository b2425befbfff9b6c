"""The OpenAI API as fuselm serves it: typed requests, responses and errors.

Field names and shapes follow the OpenAI API as vLLM and llama.cpp's server implement it.
Fields a client library sends by default with neutral values (penalties of 0, an empty
logit_bias, `logprobs: false`) are accepted; a non-neutral value of a feature fuselm does not
implement is a 400 naming the field. Unknown fields are ignored, as vLLM does.

The `fuselm` object of a request is fuselm's extension (plain clients never send it): another
method or other options for this request, and whether to return the fusion trace.

A request converts itself into what a generation takes (as vLLM's `to_sampling_params`): its
prompt (`prompt_input`) and its `GenerationConfig` over a setup's defaults
(`to_generation_config`); the server adds only what needs the setup's models and limits.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..config import SEED_MAX, SEED_MIN, GenerationConfig
from ..models.prompts import Prompt
from ..result import GenerationStats, TextSpan, TraceStep


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


class FuselmExtension(BaseModel):
    """Per-request fuselm settings, under the request's `fuselm` key."""

    model_config = ConfigDict(extra="forbid")

    method: str | None = Field(None, description="another decoding method over the setup's models")
    options: dict[str, Any] | None = Field(None, description="method options (replace the setup's)")
    trace: bool = Field(False, description="return the fusion trace and stats (as `generate --json`)")


class _Sampling(_Request):
    """What completions and chat completions share. None means: the setup's default."""

    prompt_param: ClassVar[str]  # the field that holds the prompt, as an error names it
    chat: ClassVar[Literal["raw", "chat"]]  # whether the prompt goes through the chat template

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Sent with neutral values by common clients; anything else is refused (see _neutral).
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    best_of: int | None = None
    fuselm: FuselmExtension | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        if len(stops) > 8:
            raise ValueError("at most 8 stop strings")
        return v

    def stop_list(self) -> list[str] | None:
        if self.stop is None:
            return None
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def prompt_input(self) -> Prompt:
        raise NotImplementedError

    @property
    def trace(self) -> bool:
        return bool(self.fuselm and self.fuselm.trace)

    @property
    def method_param(self) -> str:
        """What a refusal of the method this request asks for names: the method, or its options."""
        return "fuselm.method" if self.fuselm is not None and self.fuselm.method else "fuselm.options"

    def to_generation_config(self, defaults: GenerationConfig) -> GenerationConfig:
        """A setup's generation `defaults` with what this request sets (its stop strings added to
        the setup's); pydantic's ValidationError when the result is not a valid config."""
        update: dict[str, Any] = {"chat": self.chat}
        if self.max_tokens is not None:
            update["max_new_tokens"] = self.max_tokens
        for name in ("temperature", "top_p", "seed"):
            if getattr(self, name) is not None:
                update[name] = getattr(self, name)
        stops = self.stop_list()
        if stops is not None:
            update["stop"] = list(dict.fromkeys([*defaults.stop, *stops]))
        return GenerationConfig(**{**defaults.model_dump(), **update})

    def unsupported(self) -> tuple[str, str] | None:
        """(field, why) of the first field set to something fuselm does not implement."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                return name, f"{name} is not supported by fuselm"
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported by fuselm"
        if self.best_of not in (None, 1):
            return "best_of", "best_of is not supported by fuselm"
        return None


class CompletionRequest(_Sampling):
    """A completion's prompt is raw text (as in the OpenAI API)."""

    prompt_param: ClassVar[str] = "prompt"
    chat: ClassVar[Literal["raw", "chat"]] = "raw"

    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("fuselm takes one prompt per request")
        return v

    def prompt_input(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def unsupported(self) -> tuple[str, str] | None:
        if self.echo:
            return "echo", "echo is not supported by fuselm"
        if self.logprobs:
            return "logprobs", "logprobs are not supported by fuselm"
        if self.suffix:
            return "suffix", "suffix is not supported by fuselm"
        return super().unsupported()


class ContentPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    """A chat goes through each model's chat template."""

    prompt_param: ClassVar[str] = "messages"
    chat: ClassVar[Literal["raw", "chat"]] = "chat"

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_max(self) -> ChatCompletionRequest:
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise ValueError("max_tokens and max_completion_tokens differ; give one")
            self.max_tokens = self.max_completion_tokens
        return self

    def prompt_input(self) -> list[dict[str, str]]:
        # "developer" is the newer name of the system role
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]

    def unsupported(self) -> tuple[str, str] | None:
        if self.logprobs or self.top_logprobs:
            return "logprobs", "logprobs are not supported by fuselm"
        if self.tools:
            return "tools", "tool calls are not supported by fuselm"
        if self.tool_choice not in (None, "none", "auto"):
            return "tool_choice", "tool calls are not supported by fuselm"
        if self.response_format not in (None, {"type": "text"}):
            return "response_format", "only response_format {'type': 'text'} is supported by fuselm"
        return super().unsupported()


# --- responses -------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)  # fmt: skip


class FuselmStats(BaseModel):
    """A generation's stats as the server returns them: those of `generate --json` without what
    the shared prefix cache did (`cached_prompt_tokens`, `tokens_forwarded`), which would tell a
    client how much of its prompt the previous client's prompt shared."""

    new_tokens: int
    seconds: float
    tokens_per_second: float | None
    forward_passes: dict[str, int]
    prompt_tokens: dict[str, int]
    text_share: dict[str, float]
    rounds: int

    @classmethod
    def of(cls, stats: GenerationStats) -> FuselmStats:
        return cls(**stats.model_dump(exclude={"cached_prompt_tokens", "tokens_forwarded"}))


class FuselmInfo(BaseModel):
    """The `fuselm` object of a response: what `generate --json` shows (asked for with trace)."""

    method: str
    models: list[str]
    stats: FuselmStats
    trace: list[TraceStep]


class FuselmSpans(BaseModel):
    """The `fuselm` object of a streamed chunk (asked for with trace): the chunk's text, cut
    into pieces by the model that won each, so that a client can colour the stream as it comes."""

    spans: list[TextSpan]


FinishReason = Literal["stop", "length"]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None
    fuselm: FuselmInfo | FuselmSpans | None = None


class _Object(BaseModel):
    """What every completion object and chunk carries."""

    id: str
    created: int
    model: str


class CompletionResponse(_Object):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason
    fuselm: FuselmInfo | None = None


class ChatCompletionResponse(_Object):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: None = None
    finish_reason: FinishReason | None = None
    fuselm: FuselmInfo | FuselmSpans | None = None


class ChatCompletionChunk(_Object):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "fuselm"
    # fuselm's extension: what the model id stands for, and what a request may choose (serve.bounds)
    method: str
    models: list[str]
    request_methods: list[str] = Field(default_factory=list, description="methods the `fuselm` extension may name")
    option_max: dict[str, int] = Field(default_factory=dict, description="largest work option a request may give")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


GenerationRequest = CompletionRequest | ChatCompletionRequest
