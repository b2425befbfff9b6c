"""Resolve a model reference (bundled name, transformers directory, GGUF file) to a backend, or a
model entry with `engine:` to a model on that serving engine."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from importlib import metadata
from pathlib import Path
from typing import Any

from ..config import GenerationConfig, ModelConfig
from ..conventions import OFFERS_FOLLOW, OFFERS_FULL, OFFERS_ROLLOUT, OFFERS_SCORE, OFFERS_TOPK
from ..errors import FuselmError, UnknownNameError
from . import assets, llamacpp
from .backend import Backend, ModelInfo
from .catalog import BUNDLED
from .expert import Expert
from .prefix import PrefixCache
from .prompts import Prompt, chat_messages
from .session import DecodingSession

__all__ = ["DeferredModel", "Expert", "Model", "Prompt", "identity", "load_model", "locate"]


class Model(Expert):
    """A loaded model: a backend plus how to turn a user prompt into its prompt text.
    (A model on a serving engine is a :class:`fuselm.models.remote.RemoteModel`: both are
    :class:`fuselm.models.expert.Expert`.)

    Several Model objects may share one backend (and its prefix cache) with other configs, e.g.
    other ensemble weights: `with_config`."""

    works_in_process = True
    # in this process, its sessions offer everything a method may need
    offers = frozenset({OFFERS_FULL, OFFERS_TOPK, OFFERS_ROLLOUT, OFFERS_SCORE, OFFERS_FOLLOW})

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

    @property
    def vocab_size(self) -> int:
        return self.info.vocab_size

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

    def with_config(self, config: ModelConfig) -> Model:
        return Model(self.backend, config, self.prefix_cache)

    def close(self) -> None:
        self.prefix_cache.clear()
        self.backend.close()

    def __repr__(self) -> str:
        return f"Model({self.name!r}, backend={self.info.backend!r})"


def resolve_backend_kind(cfg: ModelConfig, is_gguf: bool) -> str:
    if cfg.backend != "auto":
        return cfg.backend
    return "llamacpp" if is_gguf and llamacpp.available() else "transformers"


@dataclass(frozen=True)
class Weights:
    """What `load_model` loads for an in-process model entry: the backend that runs it, its
    weights (a .gguf file, or a transformers directory), and the name its results carry."""

    kind: str
    path: Path
    name: str


def locate(cfg: ModelConfig) -> Weights:
    """The weights `load_model` loads for `cfg`, without loading them (a bundled model's GGUF is
    assembled, or its transformers copy converted, on first use, as loading would)."""
    ref = cfg.name
    if cfg.device != "cpu" and cfg.backend == "llamacpp":
        raise FuselmError("--device applies to the transformers backend; llama.cpp here is CPU-only")
    if ref in BUNDLED:
        bundled = BUNDLED[ref]
        kind = resolve_backend_kind(cfg, is_gguf=True)
        path = assets.ensure_gguf(bundled) if kind == "llamacpp" else assets.ensure_converted(bundled)
        return Weights(kind, path, ref)
    check_reference(cfg)
    path = Path(ref).expanduser()
    if path.is_file():
        if resolve_backend_kind(cfg, is_gguf=True) == "llamacpp":
            return Weights("llamacpp", path, path.stem)
        # transformers reads GGUF directly, slowly; convert once into the cache like bundled models
        out = assets.cache_dir() / "hf" / f"{path.stem}-{assets.sha256_file(path)[:12]}"
        if not assets.is_converted(out.name):
            assets.convert_gguf_to_safetensors(path, out)
        return Weights("transformers", out, path.stem)
    if cfg.backend == "llamacpp":
        raise FuselmError(f"{path} is a directory; the llama.cpp backend needs a .gguf file")
    return Weights("transformers", path, path.name)


def load_model(name: str | ModelConfig, **overrides) -> Expert:
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

        return RemoteModel.from_config(cfg)
    return load_in_process(cfg)


def load_in_process(cfg: ModelConfig) -> Model:
    """The in-process model entry `cfg` loaded (its weights found by `locate`)."""
    weights = locate(cfg)
    if weights.kind == "llamacpp":
        return Model(llamacpp.LlamaCppBackend(weights.path, name=weights.name, n_ctx=cfg.n_ctx,
                                              n_threads=cfg.threads), cfg)  # fmt: skip
    from .hf import TransformersBackend

    backend = TransformersBackend.from_directory(
        weights.path, name=weights.name, device=cfg.device, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code
    )
    return Model(backend, cfg)


def identity(cfg: ModelConfig) -> dict[str, Any] | None:
    """Everything about an in-process model entry that its outputs depend on, to key the memo of
    its work (eval/memo.py): the reference and the backend, each weight, tokenizer and template
    file's path, size and modification time, the settings that change its numbers (dtype and
    device on transformers, the context length on llama.cpp) and the versions of the libraries
    that run it. Left out: the ensemble `weight` (a method's, not the model's) and `threads`
    (it spreads the same work over cores). None for a model on an engine: its name and URL do
    not pin the weights behind them."""
    if not cfg.in_process:
        return None
    weights = locate(cfg)
    root = weights.path
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    stamps = [[str(p.resolve()), (st := p.stat()).st_size, st.st_mtime_ns] for p in files]
    if weights.kind == "llamacpp":
        settings: dict[str, Any] = {"n_ctx": cfg.n_ctx, "versions": _versions("llama_cpp_python")}
    else:
        settings = {"device": cfg.device, "dtype": cfg.dtype, "trust_remote_code": cfg.trust_remote_code,
                    "versions": _versions("torch", "transformers", "tokenizers")}  # fmt: skip
    return {"name": cfg.name, "backend": weights.kind, "files": stamps, **settings}


def _versions(*packages: str) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for package in packages:
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    return out


class DeferredModel(Expert):
    """An in-process model entry loaded at its first use: a run whose every answer the memo
    already holds (eval/memo.py) never loads it."""

    works_in_process = True
    offers = Model.offers

    def __init__(self, cfg: ModelConfig):
        check_reference(cfg)
        self.config = cfg
        self._model: Model | None = None

    @cached_property
    def name(self) -> str:
        return locate(self.config).name

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def model(self) -> Model:
        if self._model is None:
            self._model = load_in_process(self.config)
        return self._model

    @property
    def backend(self) -> Backend:
        return self.model().backend

    @property
    def info(self) -> ModelInfo:
        return self.model().info

    @property
    def vocab_size(self) -> int:
        return self.model().vocab_size

    def prompt_text(self, prompt: Prompt, gen: GenerationConfig | None = None) -> str:
        return self.model().prompt_text(prompt, gen)

    def tokenize(self, text: str) -> list[int]:
        return self.model().tokenize(text)

    def decode(self, ids: list[int]) -> str:
        return self.model().decode(ids)

    def session(self, prompt_text: str) -> DecodingSession:
        return self.model().session(prompt_text)

    def with_config(self, config: ModelConfig) -> Model:
        return self.model().with_config(config)

    def close(self) -> None:
        if self._model is not None:
            self._model.close()


def load_models(models: list[str | ModelConfig]) -> list[Expert]:
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
