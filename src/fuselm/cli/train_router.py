"""`fuselm train-router`: a FusionRoute router trained for a set of experts."""

from __future__ import annotations

import argparse
import json
import sys

from pydantic import ValidationError

from ..config import validation_message
from ..errors import FuselmError


def add_parser(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train-router", help="train a FusionRoute router for a set of experts (resumable)")
    t.add_argument("--config", metavar="FILE.yaml", help="training config (see docs/fusionroute.md)")
    _add_train_flags(t)
    t.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    """One flag per scalar field of the router training config (lists and sections come from YAML)."""
    from ..training.router_train import RouterTrainConfig

    for name, f in RouterTrainConfig.model_fields.items():
        ann = f.annotation
        kind = {int: int, float: float, str: str}.get(ann) or (
            {str | None: str}.get(ann) if ann == str | None else None
        )
        if kind is None:
            continue
        p.add_argument(
            "--" + name.replace("_", "-"), dest=name, type=kind, default=argparse.SUPPRESS, help=f.description
        )
    p.add_argument("--experts", dest="experts", default=argparse.SUPPRESS, help="comma-separated expert models")


def run(ns: argparse.Namespace) -> int:
    from ..training.router_train import RouterTrainConfig, RouterTrainer

    fields = RouterTrainConfig.model_fields
    overrides = {k: v for k, v in vars(ns).items() if k in fields}
    if isinstance(overrides.get("experts"), str):
        overrides["experts"] = [e.strip() for e in overrides["experts"].split(",") if e.strip()]
    if ns.config:
        cfg = RouterTrainConfig.from_yaml(ns.config, **overrides)
    else:
        try:
            cfg = RouterTrainConfig(**overrides)
        except ValidationError as e:
            raise FuselmError(validation_message(e, "options", RouterTrainConfig)) from None
    summary = RouterTrainer(cfg, show_progress=not ns.no_progress).run()
    print(json.dumps(summary, ensure_ascii=False))
    print(
        f"router saved to {cfg.out}/router (use: fuselm generate --method fusionroute --router {cfg.out}/router "
        f"--models {','.join(cfg.experts)} ...)",
        file=sys.stderr,
    )
    return 0
