"""A learned fusion controller: which candidate of a scored AdaFuse round to commit.

Features are computed from what a round's trace already holds (each candidate's per-model mean
NLL, the combined score, who proposed it, its kind and length; each model's margin; how far the
generation is), by one function used both when training (`fuselm train-controller` reads the
traces of reference-following runs) and at inference (`-O controller=PATH`), so the two cannot
drift apart. The model is a logistic regression over candidates (the highest score wins),
stored as JSON: feature names, standardisation, weights, and the models it was trained for.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import FuselmError
from ..files import atomic_write_json
from ..result import CandidateTrace

FORMAT = 1
NLL_CAP = 20.0  # a missing or infinite NLL (a dropped expert, an impossible candidate)


def _nll(x: float | None) -> float:
    return NLL_CAP if x is None or not math.isfinite(x) else min(x, NLL_CAP)


def feature_names(models: list[str]) -> list[str]:
    names = []
    for i in range(len(models)):
        names += [f"nll_{i}", f"nll_gap_{i}", f"proposed_by_{i}", f"margin_{i}"]
    return names + [
        "score_gap",
        "score_rank",
        "is_branch",
        "is_eos",
        "n_proposers",
        "log_chars",
        "n_words",
        "log_position",
    ]


def round_features(
    candidates: list[CandidateTrace], models: list[str], margins: dict[str, float] | None, position: int
) -> list[list[float]]:
    """One feature row per candidate of a scored round (`models`: the method's model names, in
    order; `position`: characters generated before the round)."""
    margins = margins or {}
    per_model = [[_nll((c.nll or {}).get(m)) for c in candidates] for m in models]
    best = [min(col) if col else 0.0 for col in per_model]
    scores = [c.score if c.score is not None and math.isfinite(c.score) else NLL_CAP for c in candidates]
    order = sorted(range(len(candidates)), key=lambda i: (scores[i], i))
    rank = {i: r for r, i in enumerate(order)}
    rows = []
    for ci, c in enumerate(candidates):
        row: list[float] = []
        for mi, m in enumerate(models):
            row += [per_model[mi][ci], per_model[mi][ci] - best[mi], float(m in c.proposers), margins.get(m, 0.0)]
        row += [
            scores[ci] - min(scores),
            float(rank[ci]),
            float(c.kind == "branch"),
            float(c.eos),
            float(len(c.proposers)),
            math.log1p(len(c.text)),
            float(len(c.text.split())),
            math.log1p(position),
        ]
        rows.append(row)
    return rows


@dataclass
class Controller:
    """A logistic regression over candidate features (higher: commit this one)."""

    models: list[str]
    features: list[str]
    mean: list[float]
    std: list[float]
    weights: list[float]
    bias: float
    info: dict

    def scores(self, rows: list[list[float]]) -> list[float]:
        return [
            self.bias + sum(w * (x - mu) / sd for w, x, mu, sd in zip(self.weights, row, self.mean, self.std))
            for row in rows
        ]

    def choose(self, rows: list[list[float]]) -> int:
        """The candidate to commit (ties: the earlier)."""
        s = self.scores(rows)
        return max(range(len(s)), key=lambda i: (s[i], -i))

    def save(self, path: str | Path) -> None:
        atomic_write_json(
            path,
            {
                "fuselm_controller": FORMAT,
                "kind": "logistic",
                "models": self.models,
                "features": self.features,
                "mean": self.mean,
                "std": self.std,
                "weights": self.weights,
                "bias": self.bias,
                "info": self.info,
            },
        )

    @classmethod
    def load(cls, path: str | Path) -> Controller:
        p = Path(path)
        if not p.is_file():
            raise FuselmError(f"controller not found: {path} (train one with `fuselm train-controller`)")
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise FuselmError(f"{path}: not a controller file ({e.msg})") from None
        if not isinstance(data, dict) or data.get("fuselm_controller") != FORMAT or data.get("kind") != "logistic":
            raise FuselmError(f"{path}: not a controller file of format {FORMAT} (`fuselm train-controller` makes one)")
        ctl = cls(
            models=list(data["models"]), features=list(data["features"]), mean=list(data["mean"]),
            std=list(data["std"]), weights=list(data["weights"]), bias=float(data["bias"]), info=data.get("info", {}),
        )  # fmt: skip
        if ctl.features != feature_names(ctl.models) or not (
            len(ctl.mean) == len(ctl.std) == len(ctl.weights) == len(ctl.features)
        ):
            raise FuselmError(f"{path}: its features are not this fuselm's ({len(ctl.features)} named)")
        return ctl

    def check_models(self, names: list[str], path: str) -> None:
        if len(names) != len(self.models):
            raise FuselmError(
                f"controller {path} was trained for {len(self.models)} models ({', '.join(self.models)}), got"
                f" {len(names)} ({', '.join(names)})"
            )
