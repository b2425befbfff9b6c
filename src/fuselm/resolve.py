"""A run's configuration resolved from everything that describes it: a config file (models,
method, method options, generation settings, a calibration), what the caller gives beside it
(model entries, a method, method options, generation settings, model settings; these win), and a
calibration's chosen setup applied last (calibration.py). One function for every place that turns
those into a `RunConfig`: the CLI (generate, eval, serve's setup from flags), lm-eval's
`model_args` (eval/harness.py) and `Ensemble.from_config`, so that a config file, a calibration
and the options over them mean the same everywhere.

Names are not checked here (a method's name and options, a task's fit): the caller does that
before it loads a model (`fusion.methods.check_method`, `eval.choice.check_task_method`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .calibration import apply_calibration
from .config import LOCAL_FIELDS, ModelConfig, RunConfig, parse_model_ref, validation_message
from .errors import FuselmError
from .files import load_yaml

NO_MODEL = "no model given: use --model NAME (see `fuselm models`) or a --config file"


def model_entries(refs: str, separator: str = ",") -> list[dict[str, Any]]:
    """Model entries from a list of references joined by `separator` (`--models A,B`; lm-eval's
    `models=A+B`), each read by `config.parse_model_ref` (a name, a file, or ENGINE:URL)."""
    return [parse_model_ref(r.strip()) for r in str(refs).split(separator) if r.strip()]


def with_model_settings(entry: str | dict[str, Any] | ModelConfig, settings: dict[str, Any]) -> dict[str, Any]:
    """A model entry with model settings given for every model (the command line's --threads,
    --timeout-s, ...), each where it fits: the local ones to in-process models, `timeout_s` to
    those on engines."""
    if isinstance(entry, ModelConfig):
        entry = entry.model_dump(exclude_unset=True)
    entry = parse_model_ref(entry) if isinstance(entry, str) else dict(entry)
    skip = LOCAL_FIELDS if entry.get("engine") else ("timeout_s",)
    return {**entry, **{k: v for k, v in settings.items() if k not in skip}}


def resolve_run_config(
    config: str | Path | dict[str, Any] | None = None,
    *,
    models: list[str | dict[str, Any] | ModelConfig] | None = None,
    method: str | None = None,
    options: dict[str, Any] | None = None,
    generation: dict[str, Any] | None = None,
    model_settings: dict[str, Any] | None = None,
    calibration: str | Path | None = None,
    task: str | None = None,
    generation_defaults: dict[str, Any] | None = None,
    method_for_several: str | None = None,
    where: str | None = None,
    no_model: str = NO_MODEL,
) -> RunConfig:
    """The run config that `config` (a YAML file's path, or its contents as a dict) and the
    values given beside it describe:

    - `models` replace the file's models; `method` its method; `options` go over its method
      options and `generation` over its generation settings, which go over `generation_defaults`;
      `model_settings` go into every model entry where they fit (`with_model_settings`);
    - `calibration` (else the file's `calibration:`) applies the setup it chose: its models
      unless models are given, its method (a different one given is an error), its options
      under the given ones; with `task`, it must have been made for that task;
    - without a method anywhere, `method_for_several` where there are several models (None:
      RunConfig's default, `single`);
    - no model at all is the error `no_model`; a value the schema refuses is one line naming
      `where` (default: the file, else "options")."""
    data = dict(load_yaml(config) if isinstance(config, (str, Path)) else config or {})
    where = where or (str(config) if isinstance(config, (str, Path)) else "options")
    if models is not None:
        data["models"] = list(models)
    data["models"] = [parse_model_ref(m) if isinstance(m, str) else m for m in data.get("models") or []]
    if method is not None:
        data["method"] = method
    data["method_options"] = {**(data.get("method_options") or {}), **(options or {})}
    data["generation"] = {**(generation_defaults or {}), **(data.get("generation") or {}), **(generation or {})}
    calibration = calibration or data.pop("calibration", None)
    data.pop("calibration", None)  # the one given beside the file wins
    if calibration:
        data = apply_calibration(data, calibration, task)
    if not data["models"]:
        raise FuselmError(no_model)
    data["models"] = [with_model_settings(m, model_settings or {}) for m in data["models"]]
    if data.get("method") is None and method_for_several and len(data["models"]) > 1:
        data["method"] = method_for_several
    if data.get("method") is None:
        data.pop("method", None)
    try:
        return RunConfig(**data)
    except ValidationError as e:
        raise FuselmError(validation_message(e, where, RunConfig)) from None
