"""A calibration file (`fuselm calibrate --out calib.yaml`): which setup of an ensemble to run on
one task, chosen on dev rows, and what was tried. `generate`, `eval` and `serve` take it with
`--calibration FILE` (or `calibration:` in a config): it gives the models, the method and the
method options; the eval runner also refuses test rows that the calibration used.

A calibration file may come from someone else, so applying one only chooses a setup: which
members (by name), the method and its options. Its member entries may carry the name, the weight
and the local settings in `CALIBRATION_FIELDS` (how a model runs here, nothing it can reach or
execute); an entry that sets anything else (`trust_remote_code: true`, an engine's `engine`,
`url`, `model`, `api_key_env`, a `tokenizer` path) is refused, unless the user gives the model
entries beside the calibration (`--models`, a config's `models:`): then those are used and the
calibration's entries are not. The file still records every entry given to `fuselm calibrate`
(engines' URLs included), so the user who made it on engine experts passes them again. Option
files (`controller`, `router`) written relative are read relative to the calibration file.

The file is YAML, written by `eval.calibrate` and read here (the layers above only apply it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from .config import ModelConfig, StrictModel, validation_message
from .errors import FuselmError
from .files import atomic_write, load_yaml
from .fusion.methods import PATH_OPTIONS

FORMAT = 1

# What a calibration's member entry may set when it is applied without the user's own entries:
# how a model runs here, never what code runs, which server is reached or which secret is sent.
CALIBRATION_FIELDS = ("name", "weight", "backend", "device", "dtype", "n_ctx", "threads", "timeout_s")


class DevRows(StrictModel):
    """The rows the calibration ran on (never to be used for reported test scores)."""

    file: str = Field(description="the data file, relative to the data directory when inside it")
    offset: int = 0
    limit: int | None = None
    ids: list[int | str] = Field(default_factory=list)


class MemberScore(StrictModel):
    name: str
    score: float | None = Field(description="dev main metric alone (single)")
    nll: float | None = Field(None, description="NLL per byte of the dev references")
    weight: float = Field(1.0, description="quality weight from the dev NLL (best member 1)")
    kept: bool = Field(True, description="in the equal-vote setups (every member is in the anchored ones)")
    why_dropped: str | None = Field(None, description="why it is not in the equal-vote setups")
    seconds_per_sample: float | None = None


class Trial(StrictModel):
    """One fused setup tried on the dev rows."""

    label: str
    method: str
    models: list[str]
    method_options: dict[str, Any] = Field(default_factory=dict)
    score: float | None = None
    versus_best: list[float] | None = Field(None, description="score minus the best member's, 95% paired interval")
    seconds_per_sample: float | None = None
    n: int = 0
    cost: float | None = Field(
        None, description="CPU seconds (else wall seconds) per row relative to the anchor alone on the same rows"
    )
    dropped: str | None = Field(None, description="why the race left it behind after `n` rows (None: ran to the end)")


class Calibration(StrictModel):
    fuselm_calibration: int = FORMAT
    task: str
    metric: str
    dev: DevRows
    controller_dev: DevRows | None = Field(
        None, description="the rows the tried controller learnt from (never to be used for test scores either)"
    )
    members: list[ModelConfig] = Field(min_length=1, description="every model given to calibrate, in order")
    scores: list[MemberScore]
    anchor: str = Field(description="the member fused setups were measured against and the fallback")
    anchor_reason: str = Field("", description="why this member (empty: an older calibration, the best dev score)")
    models: list[str] = Field(min_length=1, description="the chosen setup's models, by name")
    method: str
    method_options: dict[str, Any] = Field(default_factory=dict)
    reason: str = ""
    significant: bool = Field(False, description="made with --significant: a fused setup needed a significant dev gain")
    max_loss: float | None = Field(
        None,
        description="made with --max-loss: how far below the anchor a chosen setup's dev interval could reach,"
        " as a fraction of the anchor's score (None: an older calibration, no such bound)",
    )
    tried: list[Trial] = Field(default_factory=list)
    level: float = Field(
        0.95, description="the confidence level of every paired interval: 1 - 0.05 / looks (Bonferroni over looks)"
    )
    looks: int = Field(1, description="how many times the race looked at the intervals (blocks of dev rows)")
    decided: bool = Field(True, description="False: too few dev rows to tell setups apart; the best member alone")
    dev_seconds: float | None = Field(
        None, description="generation time of every dev run and of the controller's training rows, summed (the cost)"
    )
    versions: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _names_are_members(self) -> Calibration:
        members = [m.name for m in self.members]
        unknown = [n for n in [self.anchor, *self.models] if n not in members]
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: not among the members ({', '.join(members)})")
        return self

    def model_configs(self) -> list[ModelConfig]:
        by_name = {m.name: m for m in self.members}
        return [by_name[n] for n in self.models]

    def chosen_trial(self) -> Trial | None:
        """The tried setup that was chosen; None for the fallback to the best member alone."""
        setup = (self.method, self.models, self.method_options)
        return next((t for t in self.tried if (t.method, t.models, t.method_options) == setup), None)

    def save(self, path: str | Path) -> None:
        data = self.model_dump(mode="json")
        data["members"] = [m.model_dump(mode="json", exclude_defaults=True) for m in self.members]  # short
        text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100)
        atomic_write(path, text)  # a reader never sees half a file


def load_calibration(path: str | Path) -> Calibration:
    data = load_yaml(path)
    if not isinstance(data, dict) or "fuselm_calibration" not in data:
        raise FuselmError(f"{path} is not a calibration file (make one with `fuselm calibrate`)")
    if data["fuselm_calibration"] != FORMAT:
        raise FuselmError(f"{path}: calibration format {data['fuselm_calibration']}, this fuselm reads {FORMAT}")
    try:
        return Calibration(**data)
    except ValidationError as e:
        raise FuselmError(validation_message(e, str(path), Calibration)) from None


def _names(models: list[Any]) -> list[str]:
    out = []
    for m in models:
        if isinstance(m, ModelConfig):
            out.append(m.name)
        elif isinstance(m, dict):
            out.append(str(m.get("name")))
        else:
            out.append(str(m))
    return out


def apply_calibration(data: dict[str, Any], path: str | Path, task: str | None = None) -> dict[str, Any]:
    """A run config (as a dict: models, method, method_options) with the calibration's setup.
    Models given beside it must be the ones it was made for, and their entries are used; without
    them, the calibration's entries, each limited to CALIBRATION_FIELDS (see the module's
    docstring). A method given beside it is an error (the calibration chose one); method options
    given beside it override its own. With `task`, the calibration must be for that task."""
    cal = load_calibration(path)
    if task is not None and task != cal.task:
        raise FuselmError(f"{path} calibrates task {cal.task!r}, not {task!r}: calibrate for {task!r} first")
    given = data.get("models")
    if given:
        names, members = _names(given), [m.name for m in cal.members]
        if sorted(names) != sorted(members):
            raise FuselmError(
                f"{path} was made for models {', '.join(members)}; given {', '.join(names)}"
                " (leave the models out: the calibration gives them)"
            )
        entries = dict(zip(names, given))  # the entries given (another machine: engines, threads)
    else:
        by_name = {m.name: m for m in cal.members}
        entries = {n: _member_entry(by_name[n], path, list(by_name)) for n in cal.models}
    if data.get("method") not in (None, cal.method):
        raise FuselmError(f"{path} chose method {cal.method!r}; drop --method {data['method']} (or calibrate again)")
    out = dict(data)
    out["models"] = [entries[n] for n in cal.models]
    out["method"] = cal.method
    out["method_options"] = {**_options_beside(cal.method_options, path), **(data.get("method_options") or {})}
    return out


def _member_entry(member: ModelConfig, path: str | Path, members: list[str]) -> dict[str, Any]:
    """A calibration's entry of a chosen member, as a model entry of the run: refused when it
    sets more than CALIBRATION_FIELDS (false and null values set nothing)."""
    entry = member.model_dump(exclude_unset=True)
    for field, value in entry.items():
        if field not in CALIBRATION_FIELDS and value is not None and value is not False:
            raise FuselmError(
                f"{path}: a calibration cannot set {field} (member {member.name!r}); give the models yourself"
                f" with --models/--config ({', '.join(members)})"
            )
    return {k: v for k, v in entry.items() if k in CALIBRATION_FIELDS}


def _options_beside(options: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """The calibration's method options, with a relative controller file or router directory
    taken relative to the calibration file (`fuselm calibrate` writes them absolute)."""
    here = Path(path).parent
    return {
        k: str(here / v) if k in PATH_OPTIONS and isinstance(v, str) and v and not Path(v).is_absolute() else v
        for k, v in options.items()
    }
