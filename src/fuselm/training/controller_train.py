"""`fuselm train-controller`: fit a fusion controller (fusion.controller) on dev rows; and
`fuselm calibrate --controller-rows N`, which trains one first and lets the calibration try it.

1. Each dev row is decoded with AdaFuse *along its reference*: every round runs as usual (the
   same proposals, branches and scores as at inference), but what is committed follows the
   reference text (the candidate that continues it, else its next word), so later rounds see
   the prefix a right decision would have left.
2. Every scored round of the trace gives one example per candidate: the features of
   `fusion.controller.round_features`, label 1 for the candidate that continues the reference
   (the longest such), 0 for the others; rounds where no candidate continues it teach nothing
   and are left out. Examples are appended per row to `examples.jsonl` (resumable).
3. A logistic regression over candidates (L2, standardised features) is fitted on 80% of the
   rows and measured on the other 20% against the hand rules (the lowest combined NLL; the
   anchor's own proposal), then refitted on all rows and saved as JSON.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..calibration import Calibration
from ..config import GenerationConfig, ModelConfig, validation_message
from ..errors import FuselmError
from ..eval.calibrate import CalibrateSpec, calibrate
from ..eval.choice import is_multiple_choice
from ..eval.records import EvalSpec
from ..eval.runner import task_generation
from ..eval.task import TEST_FILE, data_name, data_path, default_data_dir, load_rows
from ..eval.tasks import get_task
from ..files import DirLock, append_jsonl, atomic_write_json, read_jsonl
from ..fusion.adafuse import AdaFuse, AdaFuseOptions
from ..fusion.base import Step, StepContext
from ..fusion.controller import Controller, feature_names, round_features
from ..fusion.loop import decode
from ..models.loading import load_models
from ..progress import progress_bar
from ..result import TraceStep
from ..text.words import first_word_end


class ControllerTrainSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: str
    models: list[ModelConfig] = Field(min_length=2)
    data: str | None = Field(None, description="dev rows (default: the task's dev file)")
    offset: int = Field(0, ge=0)
    limit: int = Field(100, ge=2)
    options: dict[str, Any] = Field(default_factory=dict, description="AdaFuse options while collecting")
    l2: float = Field(0.01, ge=0.0)
    seed: int = 0


class ReferenceFollowingAdaFuse(AdaFuse):
    """AdaFuse whose committed text follows the row's reference (training data only)."""

    name = "adafuse-along-reference"
    needs_reference = True

    def step(self, ctx: StepContext) -> Step:
        step = super().step(ctx)
        rest = (ctx.reference or "")[len(ctx.generated) :]
        if not rest.strip():
            return Step(text=rest, new_tokens=1, finished=True, detail=step.detail)
        if step.text and rest.startswith(step.text) and not step.finished:
            return step
        winner = label_of(step.detail.candidates if step.detail else [], rest)
        if winner is not None and step.detail is not None:
            text = step.detail.candidates[winner].text
        else:
            end = first_word_end(rest)
            text = rest[:end] if end else rest
        return Step(text=text, new_tokens=max(1, len(text) // 4), source=None, detail=step.detail)


def label_of(candidates, rest: str) -> int | None:
    """The candidate that continues `rest` (the longest; case aside: "paris" continues "Paris"),
    or the end of sequence when `rest` is spent; None when none does."""
    best, length = None, -1
    for i, c in enumerate(candidates):
        if c.eos:
            if not rest.strip() and length < 0:
                best, length = i, 0
        elif c.text and rest.casefold().startswith(c.text.casefold()) and len(c.text) > length:
            best, length = i, len(c.text)
    return best


def examples_from_trace(trace: list[TraceStep], names: list[str], reference: str) -> list[dict[str, Any]]:
    """The scored rounds of a reference-following trace: features per candidate and the label."""
    out = []
    position = 0
    for t in trace:
        scored = [c for c in t.candidates if c.nll is not None]
        if len(scored) == len(t.candidates) and len(t.candidates) > 1:
            label = label_of(t.candidates, reference[position:])
            if label is not None:
                rows = round_features(t.candidates, names, t.margins, position)
                anchor_pick = next((i for i, c in enumerate(t.candidates) if c.kind == "proposal"), 0)
                out.append({"features": rows, "label": label, "winner": t.winner, "first": anchor_pick})
        position += len(t.text)
    return out


def _same_collection(out: Path, spec: ControllerTrainSpec, data: str) -> None:
    """Record what the examples in `out` are collected with, or check it: rows kept from another
    task, models, options or data file would be mixed into this controller's training."""
    what = {"task": spec.task, "models": [[m.name, m.weight] for m in spec.models], "options": spec.options,
            "data": data}  # fmt: skip
    record = out / "collected_with.json"
    if not record.is_file():
        atomic_write_json(record, what)
        return
    had = json.loads(record.read_text())
    diff = [k for k in what if had.get(k) != what[k]]
    if diff:
        raise FuselmError(
            f"{out} holds examples collected with other {', '.join(diff)}; train into another --out or delete it"
        )


def collect(
    spec: ControllerTrainSpec, out: Path, data_dir: Path, show_progress: bool, say: Callable[[str], None]
) -> tuple[list[dict[str, Any]], list[str]]:
    """Each dev row's examples, in `out`/examples.jsonl (rows done earlier are kept)."""
    task = get_task(spec.task)
    if spec.data is None and task.dev_file is None:
        raise FuselmError(
            f"task {task.name} has no dev split: give --data FILE (rows no evaluation uses; `{TEST_FILE}`"
            " with --offset: the task's test file past the rows you evaluate)"
        )
    data = str(data_path(task, spec.data or task.dev_file or "", data_dir))
    sel = EvalSpec(task=task.name, models=spec.models, data=data, offset=spec.offset, limit=spec.limit)
    rows = sel.select(load_rows(task, data, data_dir))
    _same_collection(out, spec, data_name(task, Path(data), data_dir))
    path = out / "examples.jsonl"
    done = {r["id"]: r for r in read_jsonl(path)} if path.is_file() else {}
    todo = [r for r in rows if r["id"] not in done]
    names: list[str] = []
    if todo:
        models = load_models(spec.models)
        method = ReferenceFollowingAdaFuse(models, AdaFuseOptions(**spec.options))
        names = method.names
        gen = task_generation(task, GenerationConfig(), set())
        prefix = task.prompt_prefix(data_dir)
        try:
            with progress_bar(show_progress) as progress:
                bar = progress.add_task(f"{task.name}: rounds along the references", total=len(rows),
                                        completed=len(rows) - len(todo))  # fmt: skip
                for row in todo:
                    reference = task.reference_text(row)
                    t0 = time.perf_counter()
                    result = decode(method, task.build_prompt(prefix, row), gen, reference=reference)
                    item = {"id": row["id"], "names": names, "seconds": round(time.perf_counter() - t0, 3),
                            "rounds": examples_from_trace(result.trace, names, reference)}  # fmt: skip
                    append_jsonl(path, item)
                    done[row["id"]] = item
                    progress.update(bar, advance=1)
        finally:
            for m in models:
                m.close()
    items = [done[r["id"]] for r in rows if r["id"] in done]
    names = names or (items[0]["names"] if items else [m.name for m in spec.models])
    say(f"{sum(len(i['rounds']) for i in items)} scored rounds with a right candidate in {len(items)} dev rows")
    return items, names


def fit(items: list[dict[str, Any]], names: list[str], l2: float) -> Controller:
    """Logistic regression over the candidates of every round."""
    xs = [row for it in items for r in it["rounds"] for row in r["features"]]
    ys = [float(j == r["label"]) for it in items for r in it["rounds"] for j in range(len(r["features"]))]
    if not xs or len(set(ys)) < 2:
        raise FuselmError("no scored round with a right candidate to learn from: give more dev rows (--limit)")
    x = torch.tensor(xs, dtype=torch.float64)
    y = torch.tensor(ys, dtype=torch.float64)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return Controller(
        models=names, features=feature_names(names), mean=mean.tolist(), std=std.tolist(),
        weights=w.detach().tolist(), bias=float(b.detach()), info={},
    )  # fmt: skip


def _recorded(spec: ControllerTrainSpec, data_dir: Path) -> str | None:
    """The dev file as the controller records it: None for the task's dev split, else its name
    (`data_name`), which a calibration on another machine or directory still finds."""
    if spec.data is None:
        return None
    task = get_task(spec.task)
    return data_name(task, data_path(task, spec.data, data_dir), data_dir)


def accuracy(items: list[dict[str, Any]], pick: Callable[[dict[str, Any]], int]) -> float | None:
    rounds = [r for it in items for r in it["rounds"]]
    return sum(pick(r) == r["label"] for r in rounds) / len(rounds) if rounds else None


def train_controller(
    spec: ControllerTrainSpec, out: str | Path, data_dir: Path | None = None, show_progress: bool = True,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:  # fmt: skip
    """Collect (resumable), fit, compare with the hand rules on held-out rows, save. `out` is
    the controller's JSON path; its examples go beside it (OUT.examples/)."""
    out = Path(out)
    work = out.with_suffix(".examples")
    work.mkdir(parents=True, exist_ok=True)
    with DirLock(work, "train-controller"):
        data_dir = data_dir or default_data_dir()
        items, names = collect(spec, work, data_dir, show_progress, say)
    order = list(range(len(items)))
    random.Random(spec.seed).shuffle(order)
    cut = max(1, math.ceil(len(items) * 0.8)) if len(items) > 1 else len(items)
    train = [items[i] for i in order[:cut]]
    held = [items[i] for i in order[cut:]]
    table: dict[str, float | None] = {}
    if held and any(it["rounds"] for it in held):
        trial = fit(train, names, spec.l2)
        table = {
            "controller": accuracy(held, lambda r: trial.choose(r["features"])),
            "adafuse's own rule (these options)": accuracy(held, lambda r: r["winner"]),
            f"{names[0]}'s proposal": accuracy(held, lambda r: r["first"]),
        }
    controller = fit(items, names, spec.l2)
    n_rounds = sum(len(it["rounds"]) for it in items)
    controller.info = {
        "task": spec.task, "models": [m.name for m in spec.models], "options": spec.options,
        "dev": {"data": _recorded(spec, data_dir), "offset": spec.offset, "limit": spec.limit, "rows": len(items),
                "ids": [it["id"] for it in items]},
        "rounds": n_rounds, "held_out_rows": len(held), "held_out_accuracy": table,
        "seconds": round(sum(it.get("seconds", 0.0) for it in items), 3),  # decoding the rows: the cost
    }  # fmt: skip
    controller.save(out)
    atomic_write_json(work / "summary.json", controller.info)
    return controller.info


def calibrate_with_controller(
    spec: CalibrateSpec,
    out: str | Path,
    runs: Path,
    controller_rows: int = 0,
    data_dir: Path | None = None,
    explicit_generation: set[str] | None = None,
    show_progress: bool = True,
    say: Callable[[str], None] = print,
    memo: bool = True,
) -> Calibration:
    """What `fuselm calibrate` runs: with `controller_rows`, a controller trained first on that
    many dev rows after the calibration's own (saved as OUT.controller.json, then tried by the
    calibration); the calibration (eval.calibrate, resumable in `runs`); its file saved at `out`."""
    out = Path(out)
    if controller_rows:
        if is_multiple_choice(get_task(spec.task)):
            raise FuselmError(f"task {spec.task} is multiple_choice: a fusion controller steers generation; leave"
                              " --controller-rows out")  # fmt: skip
        if spec.controller:
            raise FuselmError("give --controller FILE or --controller-rows N, not both")
        try:
            train = ControllerTrainSpec(task=spec.task, models=spec.models, data=spec.dev_data,
                                        offset=spec.offset + spec.limit, limit=controller_rows)  # fmt: skip
        except ValidationError as e:
            raise FuselmError(validation_message(e, "--controller-rows")) from None
        path = out.with_suffix(".controller.json")
        say(f"calibrate: a controller on {controller_rows} dev rows from row {train.offset}")
        train_controller(train, path, data_dir, show_progress, say=say)
        spec = spec.model_copy(update={"controller": str(path)})
    cal = calibrate(spec, runs, data_dir, explicit_generation, show_progress=show_progress, say=say, memo=memo)
    cal.save(out)
    return cal
