"""A run directory of `fuselm eval`: what it holds (config.json, rows.jsonl) and how one is kept.

The public API the runner, the calibration and research scripts share: `prepare_run_dir` records
a run's config or checks that a directory holds the same run (a larger limit over the same rows
extends it), `read_rows` reads its rows back typed, `run_setup` / `other_setup` say what setup a
directory holds, `set_aside` moves a superseded run out of the way, `as_today` reads an older
run's spec with today's defaults, `versions` what made it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from ..errors import FuselmError
from ..files import DirLock, atomic_write_json, read_jsonl
from .records import EvalRow, EvalSpec, RunSetup, option_files


def versions() -> dict[str, str]:
    import torch
    import transformers

    from .._version import __version__

    out = {"fuselm": __version__, "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import llama_cpp

        out["llama_cpp"] = llama_cpp.__version__
    except ImportError:
        pass
    return out


def read_rows(path: Path) -> list[EvalRow]:
    """The complete rows of a rows.jsonl (a torn last line is cut off the file)."""
    return [EvalRow.model_validate(r) for r in read_jsonl(path)]


def selection_digest(rows: list[dict[str, Any]]) -> str:
    return hashlib.sha256(json.dumps([r["id"] for r in rows], default=str).encode()).hexdigest()


def _extends(old: dict[str, Any], spec: EvalSpec, all_rows: list[dict[str, Any]] | None) -> bool:
    """Whether `spec` only raises the row limit of the run recorded in `old` (same rows first):
    its rows are kept and the run goes on to the new limit."""
    old_spec = old.get("spec") or {}
    new_spec = spec.model_dump(mode="json")
    if all_rows is None or {k: v for k, v in old_spec.items() if k != "limit"} != {
        k: v for k, v in new_spec.items() if k != "limit"
    }:
        return False
    before, after = old_spec.get("limit"), spec.limit
    if before is None or (after is not None and after <= before):
        return False
    try:
        earlier = EvalSpec.model_validate(old_spec).select(all_rows)
    except ValueError:
        return False
    return selection_digest(earlier) == old.get("data_sha256")


def as_today(spec: Any) -> Any:
    """An earlier run's spec with the fields added to the config since, at their defaults (a new
    option must not make every earlier run look like another one)."""
    try:
        return EvalSpec.model_validate(spec).model_dump(mode="json")
    except ValueError:
        return spec


def run_setup(out: Path) -> RunSetup | None:
    """The setup of the run in `out`, as today's EvalSpec reads its config (None where there is
    no run)."""
    cfg = out / "config.json"
    return _setup_of(json.loads(cfg.read_text())) if cfg.is_file() else None


def _setup_of(config: dict[str, Any]) -> RunSetup:
    old = as_today(config.get("spec")) or {}
    return RunSetup(
        old.get("method"), [m.get("name") for m in old.get("models") or []], old.get("method_options") or {}
    )


def _changed_files(config: dict[str, Any], options: dict[str, Any]) -> list[str]:
    """The options whose file or directory differs from the one the run in `config` recorded
    (none for runs made before digests were recorded)."""
    was, now = config.get("option_files"), option_files(options)
    return [] if was is None else [k for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)]


def other_setup(out: Path, method: str, models: list[str], options: dict[str, Any]) -> str | None:
    """What makes the run in `out` another setup than `method` over `models` with `options`
    (absolute file paths, as EvalSpec records them): its own setup, or a run of a controller or
    router that was trained again since; None when it is this one, or holds no run."""
    cfg = out / "config.json"
    if not cfg.is_file():
        return None
    config = json.loads(cfg.read_text())  # read once: the setup and the option files' digests
    had = _setup_of(config)
    if had != (method, list(models), dict(options)):
        return f"another setup ({had.options or had.method})"
    changed = _changed_files(config, options)
    return f"a run of another {' and '.join(changed)} file" if changed else None


def set_aside(out: Path) -> Path:
    """Move a run that holds another setup to NAME.superseded/ (one kept), to be run again. Both
    directories' locks are taken first: a run still working in either is refused with the lock's
    one-line error, and nothing is moved or removed."""
    aside = out.with_name(out.name + ".superseded")
    with DirLock(out, "eval") as lock:
        if aside.is_dir():
            with DirLock(aside, "eval"):
                shutil.rmtree(aside, ignore_errors=True)
        out.rename(aside)
        lock.path = aside / DirLock.NAME  # the lock moved with its directory: released (removed) there
    return aside


def prepare_run_dir(out: Path, spec: EvalSpec, data_digest: str, all_rows: list[dict[str, Any]] | None = None) -> None:
    """Record the run's config in `out`, or check that `out` holds this same run. A larger
    --limit over the same rows (given `all_rows`, the task's rows before selection) extends it."""
    record = {"spec": spec.model_dump(mode="json"), "data_sha256": data_digest}
    cfg = out / "config.json"
    if cfg.is_file():
        old = json.loads(cfg.read_text())
        mine = {"spec": as_today(old.get("spec")), "data_sha256": old.get("data_sha256")}
        extends = mine != record and _extends(old, spec, all_rows)
        if mine != record and not extends:
            diff = [k for k in record["spec"] if record["spec"].get(k) != (mine["spec"] or {}).get(k)]
            if old.get("data_sha256") != data_digest:
                diff.append("data")
            raise FuselmError(
                f"{out} holds a run with a different config (differs in: {', '.join(diff) or '?'}); "
                "use another --out or delete it"
            )
        changed = _changed_files(old, spec.method_options)
        if changed:
            raise FuselmError(
                f"{out} holds a run made with another {' and '.join(changed)}: "
                f"{', '.join(str(spec.method_options[k]) for k in changed)} changed since (trained again?), and its"
                " rows would mix two setups; use another --out or delete it"
            )
        if extends:
            atomic_write_json(cfg, {**old, **record, "extended_from_limit": old["spec"]["limit"]})
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cfg, {**record, "option_files": option_files(spec.method_options), "versions": versions()})
