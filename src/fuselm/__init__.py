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


class Ensemble:
    """Several models decoded together by one method.

    >>> ens = Ensemble(["smollm2-135m", "qwen2.5-coder-0.5b"], method="adafuse", theta=0.7)  # doctest: +SKIP
    >>> ens.generate("What is the capital of France?", max_new_tokens=30).text  # doctest: +SKIP
    'The capital of France is Paris.'
    """

    def __init__(self, models, method: str = "adafuse", **method_options):
        from .fusion.registry import get_method

        cls = get_method(method)
        cls.validate_models(len(models))
        cls.Options(**method_options)  # fail early on a bad option
        self.models = [m if isinstance(m, Model) else load_model(m) for m in models]
        self.method = method
        self.method_options = method_options

    def generate(self, prompt: str, on_text=None, **generation) -> GenerationResult:
        from .fusion.loop import generate as _generate

        return _generate(self.models, prompt, self.method, GenerationConfig(**generation), self.method_options, on_text)


__all__ = [
    "Ensemble",
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
