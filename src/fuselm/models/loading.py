"""Resolve a model reference (bundled name, transformers directory, GGUF file) to a backend, or a
model entry with `engine:` to a model on that serving engine."""

from __future__ import annotations

from pathlib import Path

from ..config import GenerationConfig, ModelConfig
from ..errors import FuselmError, UnknownNameError
from . import assets, llamacpp
from .backend import OFFERS_FULL, OFFERS_ROLLOUT, OFFERS_SCORE, OFFERS_TOPK, Backend, ModelInfo
from .catalog import BUNDLED
from .prefix import PrefixCache
from .prompts import Prompt, chat_messages
from .session import DecodingSession

__all__ = ["Model", "Prompt", "load_model"]


class Model:
    """A loaded model: a backend plus how to turn a user prompt into its prompt text.
    (A model on a serving engine is a :class:`fuselm.models.remote.RemoteModel`, with the same
    face: name, config, prompt_text, tokenize, session, close.)

    Several Model objects may share one backend (and its prefix cache) with other configs, e.g.
    other ensemble weights: pass `prefix_cache` of the first."""

    remote = False  # runs in this process: its sessions offer everything a method may need
    offers = frozenset({OFFERS_FULL, OFFERS_TOPK, OFFERS_ROLLOUT, OFFERS_SCORE})

    def __init__(self, backend: Backend, config: ModelConfig | None = None, prefix_cache: PrefixCache | None = None):
        self.backend = backend
        self.config = config or ModelConfig(name=backend.info.name)
        # The warm prompt prefix of this model's sessions (see fuselm.models.prefix).
        self.prefix_cache = prefix_cache or PrefixCache(backend)

    @property
    def name(self) -> str:
        return self.backend.info.name

    @property
    def info(self) -> ModelInfo:
        return self.backend.info

    def prompt_text(self, prompt: Prompt, gen: GenerationConfig | None = None) -> str:
        """The text the model is conditioned on: chat-templated or raw, per `gen.chat`."""
        messages = chat_messages(prompt, gen or GenerationConfig(), self.info.has_chat_template)
        return prompt if messages is None else self.backend.render_chat(messages)

    def tokenize(self, text: str) -> list[int]:
        return self.backend.tokenize(text)

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids)

    def session(self, prompt_text: str) -> DecodingSession:
        """A session on this model that starts from (and leaves) its warm prompt prefix."""
        return DecodingSession(self.backend, prompt_text, self.prefix_cache)

    def close(self) -> None:
        self.prefix_cache.clear()
        self.backend.close()

    def __repr__(self) -> str:
        return f"Model({self.name!r}, backend={self.info.backend!r})"


def resolve_backend_kind(cfg: ModelConfig, is_gguf: bool) -> str:
    if cfg.backend != "auto":
        return cfg.backend
    return "llamacpp" if is_gguf and llamacpp.available() else "transformers"


def load_model(name: str | ModelConfig, **overrides) -> Model:
    """Load a bundled model by short name, a transformers directory, or a GGUF file.

    >>> m = load_model("smollm2-135m")  # doctest: +SKIP
    >>> fuselm.generate(m, "What is the capital of France?", max_new_tokens=20).text  # doctest: +SKIP
    'The capital of France is Paris.'
    """
    cfg = name if isinstance(name, ModelConfig) else ModelConfig(name=name, **overrides)
    if isinstance(name, ModelConfig) and overrides:
        cfg = cfg.model_copy(update=overrides)
    if cfg.engine is not None:  # on a serving engine: nothing is loaded, nothing sent yet
        from .remote import RemoteModel

        return RemoteModel.from_config(cfg)  # type: ignore[return-value]
    ref = cfg.name
    if cfg.device != "cpu" and cfg.backend == "llamacpp":
        raise FuselmError("--device applies to the transformers backend; llama.cpp here is CPU-only")
    if ref in BUNDLED:
        bundled = BUNDLED[ref]
        kind = resolve_backend_kind(cfg, is_gguf=True)
        if kind == "llamacpp":
            backend: Backend = llamacpp.LlamaCppBackend(
                assets.ensure_gguf(bundled), name=ref, n_ctx=cfg.n_ctx, n_threads=cfg.threads
            )
        else:
            from .hf import TransformersBackend

            backend = TransformersBackend.from_directory(
                assets.ensure_converted(bundled), name=ref, device=cfg.device, dtype=cfg.dtype
            )
        return Model(backend, cfg)
    check_reference(cfg)
    path = Path(ref).expanduser()
    if path.is_file():
        kind = resolve_backend_kind(cfg, is_gguf=True)
        if kind == "llamacpp":
            return Model(llamacpp.LlamaCppBackend(path, name=path.stem, n_ctx=cfg.n_ctx, n_threads=cfg.threads), cfg)
        # transformers reads GGUF directly, slowly; convert once into the cache like bundled models
        out = assets.cache_dir() / "hf" / f"{path.stem}-{assets.sha256_file(path)[:12]}"
        if not assets.is_converted(out.name):
            assets.convert_gguf_to_safetensors(path, out)
        from .hf import TransformersBackend

        return Model(TransformersBackend.from_directory(out, name=path.stem, device=cfg.device, dtype=cfg.dtype), cfg)
    if cfg.backend == "llamacpp":
        raise FuselmError(f"{path} is a directory; the llama.cpp backend needs a .gguf file")
    from .hf import TransformersBackend

    return Model(
        TransformersBackend.from_directory(
            path, device=cfg.device, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code
        ),
        cfg,
    )


def load_models(models: list[str | ModelConfig]) -> list[Model]:
    """`load_model` for each, after every name has been checked (`check_reference`): a misspelt
    last name fails before the first model loads."""
    cfgs = [m if isinstance(m, ModelConfig) else ModelConfig(name=m) for m in models]
    for cfg in cfgs:
        check_reference(cfg)
    return [load_model(cfg) for cfg in cfgs]


def check_reference(cfg: ModelConfig) -> None:
    """The error `load_model` would give for a name that names nothing (an unknown bundled
    name, with "did you mean"; a missing file or directory), without loading anything, so that
    commands running several models fail before the first one runs. An engine is asked only
    when used."""
    if cfg.engine is not None or cfg.name in BUNDLED:
        return
    path = Path(cfg.name).expanduser()
    if path.suffix == ".gguf" and not path.is_file():
        raise FuselmError(f"model file not found: {path}")
    if path.is_file() or path.is_dir():
        return
    if "/" in cfg.name or cfg.name.startswith("."):
        raise FuselmError(f"model path not found: {cfg.name}")
    raise UnknownNameError("model", cfg.name, BUNDLED)
