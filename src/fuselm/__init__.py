"""fuselm: fuse several language models at inference time."""

from __future__ import annotations

from .config import GenerationConfig, ModelConfig, RunConfig
from .errors import FuselmError
from .models.catalog import BUNDLED
from .models.loading import Model, load_model
from .models.session import DecodingSession
from .result import GenerationResult

__version__ = "0.1.0"


def generate(models, prompt: str, method: str = "single", method_options=None, on_text=None, **generation):
    """Generate with one model or fuse several.

    `models` are loaded :class:`Model` objects or names; `generation` takes the fields of
    :class:`GenerationConfig` (max_new_tokens, temperature, top_p, top_k, seed, stop, chat, system).
    """
    from .fusion.loop import generate as _generate

    if isinstance(models, (str, Model)):
        models = [models]
    loaded = [m if isinstance(m, Model) else load_model(m) for m in models]
    return _generate(loaded, prompt, method, GenerationConfig(**generation), method_options, on_text)


__all__ = [
    "BUNDLED",
    "DecodingSession",
    "FuselmError",
    "GenerationConfig",
    "GenerationResult",
    "Model",
    "ModelConfig",
    "RunConfig",
    "generate",
    "load_model",
]
