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

import difflib
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .engines import ENGINES

# SmolLM2's own default system prompt makes the 135M model answer "What is the capital of
# France?" in broken French; this neutral one is what the bundled instruct models answer best with.
DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant."


# A seed is a 64-bit signed integer (what torch's generators take; larger ones overflow there).
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1

# The engine kinds a model entry may name: those of the engines' registry (one module per
# engine in fuselm/engines/, which sits below this module for that reason), in its order.
ENGINE_KINDS: tuple[str, ...] = tuple(ENGINES)
EngineKind = Literal[ENGINE_KINDS]  # type: ignore[valid-type]


def _one_of(names: tuple[str, ...]) -> str:
    return " or ".join(filter(None, [", ".join(names[:-1]), names[-1]]))


class StrictModel(BaseModel):
    """Base of every config: unknown keys and wrong types are errors, also on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class GenerationConfig(StrictModel):
    max_new_tokens: int = Field(256, ge=1, le=1_000_000, description="maximum number of new tokens")
    temperature: float = Field(0.0, ge=0.0, le=100.0, description="sampling temperature; 0 is greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    top_k: int = Field(0, ge=0, description="sample among the k most likely tokens (0: all)")
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX, description="random seed for sampling")
    stop: list[str] = Field(default_factory=list, description="stop string (repeatable)")
    chat: Literal["auto", "chat", "raw"] = Field(
        "auto", description="chat template (chat), raw text (raw), or chat where the model has a template (auto)"
    )
    system: str | None = Field(DEFAULT_SYSTEM_PROMPT, description="system prompt in chat mode")
    on_expert_failure: Literal["fail", "drop"] = Field(
        "fail", description="an expert on an engine fails: end with its error (fail) or go on without it (drop)"
    )

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
    weight: float = Field(1.0, ge=1e-6, le=1e6, description="model weight in ensemble scoring")
    # A model served by an engine in another process (docs/scale-out.md): `name` is then only
    # what traces and results call it.
    engine: EngineKind | None = Field(
        None, description="serving engine that runs this model in another process (with url)"
    )
    url: str | None = Field(None, description="base URL of the model's engine, e.g. http://gpu-node-1:8000")
    model: str | None = Field(None, description="the engine's id of the model (default: the only one it serves)")
    timeout_s: float = Field(
        60.0, gt=0.0, le=3600.0, description="seconds an engine call may take as a whole (a stream: each token)"
    )
    api_key_env: str | None = Field(None, description="environment variable that holds the engine's API key")
    tokenizer: str | None = Field(
        None,
        description="engine entries: a tokenizer directory to tokenize with here instead of asking the engine "
        "(checked against the engine at first use); 'engine' always asks it; default: the engine's model "
        "directory where it exists on this machine",
    )

    @model_validator(mode="after")
    def _engine_fields(self) -> ModelConfig:
        if self.engine is None:
            remote_only = sorted(
                f for f in REMOTE_FIELDS if f in self.model_fields_set and getattr(self, f) is not None
            )
            if remote_only:
                raise ValueError(
                    f"{', '.join(remote_only)}: only for a model on an engine (add engine: {_one_of(ENGINE_KINDS)})"
                )
            return self
        if not self.url:
            raise ValueError(f"a model on engine {self.engine!r} needs url: (e.g. http://127.0.0.1:8000)")
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {self.url!r}")
        local = sorted(f for f in LOCAL_FIELDS if f in self.model_fields_set)
        if local:
            raise ValueError(f"{', '.join(local)}: only for in-process models; {self.name!r} runs on {self.engine}")
        return self

    @property
    def in_process(self) -> bool:
        """Loaded and run in this process (no `engine:`), before anything loads: its LOCAL_FIELDS
        apply, it runs one generation at a time, and its files pin what it answers (the memo)."""
        return self.engine is None


def parse_model_ref(ref: str) -> dict[str, Any]:
    """One entry of `--models`: a bundled name, a directory or a .gguf file, or a model on a
    serving engine as `[NAME=]ENGINE:URL[#MODEL_ID]`, e.g. `vllm:http://gpu-node-1:8000` or
    `llama=vllm:http://10.0.0.5:8000#meta-llama/Llama-3.1-8B-Instruct`."""
    name, eq, rest = ref.partition("=")
    if not eq:
        name, rest = "", ref
    engine, colon, url = rest.partition(":")
    if not colon or engine not in ENGINE_KINDS or not url.startswith(("//", "http")):
        return {"name": ref}
    url = url if url.startswith("http") else "http:" + url
    url, _, model = url.partition("#")
    entry: dict[str, Any] = {
        "name": name or f"{engine}@{url.split('://', 1)[-1].rstrip('/')}",
        "engine": engine,
        "url": url,
    }
    if model:
        entry["model"] = model
    return entry


# Fields that only mean something for one kind of model entry (checked above; the CLI applies its
# flags to the entries they fit).
LOCAL_FIELDS = ("backend", "device", "dtype", "n_ctx", "threads", "trust_remote_code")
REMOTE_FIELDS = ("url", "model", "api_key_env", "tokenizer")


class RunConfig(StrictModel):
    models: list[ModelConfig] = Field(min_length=1)
    method: str = Field("single", description="decoding method (see `fuselm generate --help`)")
    method_options: dict[str, Any] = Field(default_factory=dict)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)


def validation_message(
    e: ValidationError, where: str = "", model: type[BaseModel] | None = None, flags: bool = False
) -> str:
    """One line for a pydantic error: each problem at its place; an unknown key of `model` (or of
    a model nested in it) with the closest known one ("did you mean"). With `flags`, the places
    are named as the command line's flags (`--dev-data`, `--thetas[0]`)."""
    parts = []
    for err in e.errors():
        loc = _flag(err["loc"]) if flags and err["loc"] else ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden" and model is not None and err["loc"]:
            known = _fields_at(model, err["loc"][:-1])
            close = difflib.get_close_matches(str(err["loc"][-1]), known, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else (f" (known: {', '.join(known)})" if known else "")
            msg = "unknown key" + hint
        parts.append(f"{loc}: {msg}" if loc else msg)
    prefix = f"{where}: " if where else ""
    return prefix + "; ".join(parts)


def _flag(loc: tuple) -> str:
    head, *rest = loc
    return "--" + str(head).replace("_", "-") + "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in rest)


def _fields_at(model: type[BaseModel], path: tuple) -> list[str]:
    """The field names of the model found at `path` inside `model` (through list items and
    optional fields); none when the path leads elsewhere."""
    for key in path:
        if isinstance(key, int) or model is None:
            continue  # a list index: the same item type
        field = model.model_fields.get(str(key))
        model = _model_in(field.annotation) if field is not None else None
    return sorted(model.model_fields) if model is not None else []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None
