"""fuselm: fuse several language models at inference time.

The package's face: the few names most users need. Everything here is defined in a layer below
(config, models, fusion, results) and only gathered here.
"""

from __future__ import annotations

from ._version import __version__
from .config import GenerationConfig, ModelConfig, RunConfig
from .errors import FuselmError
from .fusion.loop import decode
from .fusion.methods import METHODS, build_method, check_method
from .models.catalog import BUNDLED
from .models.expert import Expert
from .models.loading import Model, load_model, load_models
from .models.session import DecodingSession, Session
from .resolve import resolve_run_config
from .result import GenerationResult, GenerationStats, TraceStep


def _models(models) -> list[Expert]:
    if isinstance(models, (str, Expert)):
        models = [models]
    return [m if isinstance(m, Expert) else load_model(m) for m in models]


def generate(models, prompt: str, method: str = "single", method_options=None, on_text=None, **generation):
    """Generate with one model or fuse several (for many prompts, build an :class:`Ensemble` once).

    `models` are loaded models (:class:`Expert`: a :class:`Model`, or a model on an engine) or names; `generation` takes the fields of
    :class:`GenerationConfig` (max_new_tokens, temperature, top_p, top_k, seed, stop, chat, system).

    >>> fuselm.generate("smollm2-135m", "What is the capital of France?", max_new_tokens=20).text  # doctest: +SKIP
    'The capital of France is Paris.'
    """
    built = build_method(method, _models(models), method_options)
    try:
        return decode(built, prompt, GenerationConfig(**generation), on_text)
    finally:
        built.close()


class Ensemble:
    """Several models decoded together by one method, built once and used for any number of prompts.

    >>> ens = Ensemble(["smollm2-135m", "qwen2.5-coder-0.5b"], method="adafuse", theta=0.7)  # doctest: +SKIP
    >>> ens.generate("What is the capital of France?", max_new_tokens=30).text  # doctest: +SKIP
    'The capital of France is Paris.'
    """

    def __init__(self, models, method: str = "adafuse", **method_options):
        if not isinstance(models, (str, Expert)):
            check_method(method, len(models), method_options)  # before loading any model
        self.models = _models(models)
        self.method = build_method(method, self.models, method_options)
        self.generation: dict = {}  # the generation settings every `generate` starts from

    @classmethod
    def from_config(cls, config=None, *, calibration=None, models=None, method=None, **method_options) -> Ensemble:
        """The setup a run config file (as `fuselm generate --config` reads) and/or a calibration
        file (`fuselm calibrate`) describe, resolved as the command line resolves it
        (`resolve.resolve_run_config`); `models`, `method` and `method_options` go over theirs,
        and the file's generation settings are where every `generate` starts.

        >>> ens = Ensemble.from_config(calibration="calib.yaml")  # doctest: +SKIP
        """
        run = resolve_run_config(config, models=models, method=method, options=method_options, calibration=calibration)
        check_method(run.method, len(run.models), run.method_options)  # before loading any model
        ens = cls.__new__(cls)
        ens.models = load_models(run.models)
        try:
            ens.method = build_method(run.method, ens.models, run.method_options)
        except BaseException:
            for m in ens.models:
                m.close()
            raise
        ens.generation = run.generation.model_dump(exclude_unset=True)
        return ens

    def generate(self, prompt: str, on_text=None, **generation) -> GenerationResult:
        return decode(self.method, prompt, GenerationConfig(**{**self.generation, **generation}), on_text)

    def close(self) -> None:
        self.method.close()

    def __enter__(self) -> Ensemble:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = [
    "BUNDLED",
    "METHODS",
    "DecodingSession",
    "Ensemble",
    "Expert",
    "FuselmError",
    "GenerationConfig",
    "GenerationResult",
    "GenerationStats",
    "Model",
    "ModelConfig",
    "RunConfig",
    "Session",
    "TraceStep",
    "__version__",
    "generate",
    "load_model",
]
