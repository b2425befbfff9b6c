"""Configuration: pydantic schemas (loaded from YAML by the CLI, flags derived from the fields).

A pure schema: names (methods, models) are checked where a run is built, not here.

A config file looks like::

    models:
      - name: smollm2-135m
      - name: qwen2.5-coder-0.5b
        backend: transformers
    method: single
    generation:
      max_new_tokens: 64
      stop: ["\\n\\n"]
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# SmolLM2's own default system prompt makes the 135M model answer "What is the capital of
# France?" in broken French; this neutral one is what the bundled instruct models answer best with.
DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant."


class StrictModel(BaseModel):
    """Base of every config: unknown keys and wrong types are errors, also on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class GenerationConfig(StrictModel):
    max_new_tokens: int = Field(256, ge=1, le=1_000_000, description="maximum number of new tokens")
    temperature: float = Field(0.0, ge=0.0, le=100.0, description="sampling temperature; 0 is greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    top_k: int = Field(0, ge=0, description="sample among the k most likely tokens (0: all)")
    seed: int | None = Field(None, description="random seed for sampling")
    stop: list[str] = Field(default_factory=list, description="stop string (repeatable)")
    chat: Literal["auto", "chat", "raw"] = Field(
        "auto", description="chat template (chat), raw text (raw), or chat where the model has a template (auto)"
    )
    system: str | None = Field(DEFAULT_SYSTEM_PROMPT, description="system prompt in chat mode")

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, v: list[str]) -> list[str]:
        if any(s == "" for s in v):
            raise ValueError("stop strings must not be empty")
        return v


class ModelConfig(StrictModel):
    name: str = Field(description="bundled model name, transformers directory, or .gguf file")
    backend: Literal["auto", "transformers", "llamacpp"] = Field(
        "auto", description="inference engine (auto: llama.cpp for GGUF when installed)"
    )
    device: str = Field("cpu", description="torch device for the transformers backend (cpu, cuda, cuda:1)")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="transformers weights dtype")
    n_ctx: int = Field(4096, ge=64, description="context length for the llama.cpp backend")
    threads: int | None = Field(
        None, ge=1, le=1024, description="CPU threads for the llama.cpp backend (default: all usable)"
    )
    trust_remote_code: bool = Field(False, description="allow custom model code from a model directory")
    weight: float = Field(1.0, gt=0.0, description="model weight in ensemble scoring")


class RunConfig(StrictModel):
    models: list[ModelConfig] = Field(min_length=1)
    method: str = Field("single", description="decoding method (see `fuselm generate --help`)")
    method_options: dict[str, Any] = Field(default_factory=dict)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)


def validation_message(e: ValidationError, where: str = "") -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "config"
        parts.append(f"{loc}: {err['msg']}")
    prefix = f"{where}: " if where else ""
    return prefix + "; ".join(parts)
