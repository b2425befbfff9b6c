"""`fuselm calibrate`: choose, on dev rows, how to run an ensemble on one task, so that fusion
does not lose to its best member.

1. Every member alone (`single`) on the dev rows, and each member's mean NLL per token of the
   dev references, per byte (quality weights: the best NLL / the member's NLL, the best 1).
2. The anchor, the member fused setups are measured against and fallen back to: of the members
   whose dev score is not significantly below the best one's, the one with the lowest reference
   NLL (`anchor_by="nll"`; `"score"`: the best dev score). Members more than `max_gap` points
   below the best dev score are left out of the equal-vote setups (UniTE: members far apart hurt when each has
   a vote).
3. A small grid of fused setups on the same rows, each with its paired 95% interval against
   the anchor. Each method offers its own (`FusionMethod.calibration_setups`, given what the
   calibration knows: a `GridContext`), so a new method joins the grid in its own module:
   AdaFuse, over the members within the gap, today's `adafuse`, with the quality weights, with
   per-prompt weights (PackLLM), with three members or more the weighted median and the best
   two (AdaFuse's top-2); over all members, anchored AdaFuse over `thetas` x `margins` (the
   anchor commits alone while it is confident, a far weaker member overrides it only by a
   margin, so the gap rule does not apply: FLORES en->de on the default pair, SmolLM2 10.4 chrF
   below Qwen 0.5B, anchored over both +2.3 above Qwen alone on test rows); with a learned
   controller (trained on other dev rows: `fuselm calibrate --controller-rows N` trains one on
   the N rows after these), `adafuse` steered by it, everywhere and only where the anchor is
   unsure. Token-average, where all members share one vocabulary: equal, with the quality
   weights (on Qwen 1.5B + 0.5B the one method above its best member on TriviaQA, +4.5 EM), and
   gated by the anchor over `thetas` (GaC: the anchor's token while it is sure).
4. The best fused setup is chosen only if its dev score is above the anchor's and its paired
   interval against the anchor reaches no lower than `max_loss` of the anchor's score below 0
   (with `significant`, only if it lies above 0), it is not surely below any member alone, and
   it takes at most `max_cost` times the anchor's time; of those, the cheapest within noise of
   the best one (cost per row relative to the anchor alone, measured on the same rows: a tie
   goes to the cheaper setup); otherwise the calibration falls back to the anchor alone
   (`choose`). Scores that tie on the main metric (few dev
   rows, low scores) are ranked by the task's finer metrics (F1 after exact match), and members
   then by their reference NLL.

The grid races instead of running every setup on every row: the members and every fused setup
run on a first block of dev rows (`block_rows`), then, block by block up to `limit` rows, only
the setups still in contention go on (each run grows: the same run directory, a larger limit).
After each block a fused setup is out when its paired interval says it is surely below the best
setup measured so far (a member or a fused one), surely more than the loss bound below the
anchor, or when it takes more than `max_cost` times the anchor's time per row; the race stops
early when the leader is surely above the anchor, when every fused setup is out, or when
`budget_minutes` are spent. Repeated looks at the same data make a 95% interval wrong more
often than 5%, so every interval of a calibration is taken at 1 - 0.05/K, K the number of
looks the budget allows (Bonferroni over the looks: with one block, the plain 95%). The
choice (4.) is made on the rows each setup reached, among the setups never left behind; and
on fewer than `min_rows` dev rows no fused setup is chosen at all: the best member alone, and
the calibration says so.

Every run is an ordinary resumable eval run under the runs directory, so an interrupted
calibration goes on where it stopped when the same command is run again.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..calibration import Calibration, DevRows, MemberScore, Trial
from ..config import GenerationConfig, ModelConfig
from ..errors import FuselmError
from ..files import atomic_write_json
from ..fusion.base import GridContext
from ..fusion.controller import Controller
from ..fusion.methods import METHODS
from ..models.backend import require_one_vocabulary
from ..models.loading import DeferredModel, check_reference, load_model, load_models
from ..progress import progress_bar
from .choice import is_multiple_choice, score_continuations
from .memo import Memo, model_key
from .records import EvalSpec
from .report import RunView, load_run, paired_difference
from .rundir import as_today, other_setup, set_aside, versions
from .runner import run_eval, summarize, task_generation
from .task import TEST_FILE, Task, data_name, data_path, default_data_dir, load_rows
from .tasks import get_task


class CalibrateSpec(BaseModel):
    """What `fuselm calibrate` runs."""

    model_config = ConfigDict(extra="forbid")

    task: str
    models: list[ModelConfig]
    dev_data: str | None = Field(None, description="dev rows (default: the task's dev file)")
    offset: int = Field(0, ge=0)
    limit: int = Field(200, ge=1, description="dev rows at most: the race's budget in rows")
    block_rows: int = Field(50, ge=1, description="the race looks at its intervals after each block of this many rows")
    budget_minutes: float | None = Field(
        None, gt=0, description="no further block once the calibration's runs have decoded for this many minutes"
    )
    max_cost: float | None = Field(
        None, gt=0, description="leave out fused setups that take more than this many times the anchor's time per row"
    )
    min_rows: int = Field(
        30, ge=1, description="on fewer dev rows, no fused setup is chosen: the best member alone, and it says so"
    )
    # the anchored policy's options, checked here so that a bad grid fails before any model runs
    thetas: list[Annotated[float, Field(ge=0.0, le=1.0)]] = Field(default_factory=lambda: [0.5, 0.8], min_length=1)
    margins: list[Annotated[float, Field(ge=0.0)]] = Field(default_factory=lambda: [0.0, 0.5], min_length=1)
    max_gap: float = Field(
        10.0, ge=0.0, description="leave members this many points below the best out of the equal-vote setups"
    )
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    controller: str | None = Field(
        None, description="a controller file for these models (`fuselm train-controller` on other dev rows), tried"
    )
    anchor_by: Literal["nll", "score"] = Field(
        "nll",
        description="the anchor: `nll`, of the members within noise of the best dev score (paired 95%), the one"
        " with the lowest reference NLL; `score`, the best dev score",
    )
    significant: bool = Field(
        False,
        description="choose only a fused setup whose paired 95% interval against the anchor lies above 0 on the"
        " dev rows (safer, fewer gains); otherwise the best fused setup that scores above it",
    )
    max_loss: float = Field(
        0.1,
        ge=0.0,
        description="choose only a fused setup whose paired 95% interval against the anchor on the dev rows"
        " reaches no lower than this fraction of the anchor's dev score below it (0.1: a setup that may lose"
        " more than a tenth of the anchor's score is not chosen, however high its mean; inf: no bound, the"
        " rule before 2026-12-06)",
    )

    @field_validator("models")
    @classmethod
    def _an_ensemble(cls, models: list[ModelConfig]) -> list[ModelConfig]:
        if len(models) < 2:
            raise ValueError(f"calibrate chooses how to fuse two models or more; got {len(models)}")
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise ValueError(f"calibrate needs distinct model names; got {', '.join(names)}")
        return models


def dev_file(task: Task, given: str | None, data_dir: Path) -> tuple[Path, str]:
    """The dev data file, and its name as a calibration records it (`data_name`)."""
    if given is None:
        if task.dev_file is None:
            raise FuselmError(
                f"task {task.name} has no dev split: give --dev-data FILE, e.g. its test file with --offset past"
                f" the rows you evaluate (--dev-data {TEST_FILE} --offset 200)"
            )
        given = task.dev_file
    path = data_path(task, given, data_dir)
    return path, data_name(task, path, data_dir)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text).strip("_")[:80]


def trial_name(label: str, models: list[str]) -> str:
    """A tried setup's run, as the calibration names it (its directory: `trial_dir`)."""
    return f"{label} {'+'.join(models)}"


def trial_dir(runs: Path, label: str, models: list[str]) -> Path:
    """Where a calibration keeps the dev run of a tried setup (`label` over `models`)."""
    return runs / _slug(trial_name(label, models))


def member_dir(runs: Path, name: str) -> Path:
    """Where a calibration keeps the dev run of the member `name` alone."""
    return runs / _slug(f"single {name}")


def _finer(task: Task) -> list[str]:
    return [m for m in [*task.metrics, *task.corpus_metrics] if m != task.main_metric]


def rank_key(task: Task, view: RunView) -> tuple[float, ...]:
    """How a run ranks on the dev rows: its main metric, then the task's finer ones (F1 after
    exact match), higher first."""
    return tuple(
        (x if (x := view.summary.metrics.get(m)) is not None else -math.inf) for m in [task.main_metric, *_finer(task)]
    )


def rank_members(task: Task, alone: dict[str, RunView], nll: dict[str, float | None]) -> list[str]:
    """Member names, best first on the dev rows: ties on the main metric (few dev rows, low
    scores) go to the finer metrics, then the lower reference NLL, then the order given."""
    names = list(alone)
    return sorted(names, key=lambda n: (*rank_key(task, alone[n]), -(nll[n] if nll[n] is not None else math.inf),
                                        -names.index(n)), reverse=True)  # fmt: skip


def one_vocabulary(models: list[ModelConfig]) -> bool:
    """Whether the models share one vocabulary (token-average can mix them)."""
    loaded = load_models(models)
    try:
        require_one_vocabulary("token-average", loaded)
        return True
    except FuselmError:
        return False
    finally:
        for m in loaded:
            m.close()


def reference_nll(
    model_cfg: ModelConfig,
    task: Task,
    rows: list[dict],
    prefix: str,
    gen: GenerationConfig,
    show_progress: bool = False,
    memo: Memo | None = None,
) -> float:
    """NLL per byte of the rows' reference texts after their prompts, under one model (per
    byte, not per token: models with different tokenizers compare). With the memo, each row's
    score is read from it when there (the model then loads only for the others)."""
    key = model_key(model_cfg) if memo is not None else None
    model = DeferredModel(model_cfg) if key else load_model(model_cfg)
    try:
        logprob, nbytes = 0.0, 0
        with progress_bar(show_progress) as progress:
            bar = progress.add_task(f"{model_cfg.name}: NLL of the references", total=len(rows))
            for row in rows:
                prompt = task.build_prompt(prefix, row)
                sc = score_continuations(model, prompt, [task.reference_text(row)], gen, memo=memo, key=key).scores[0]
                logprob, nbytes = logprob + sc.logprob, nbytes + sc.n_bytes
                progress.update(bar, advance=1)
        return -logprob / nbytes if nbytes else math.inf
    finally:
        model.close()


ALPHA = 0.05  # the error a calibration's intervals allow in all, split evenly over the race's looks


def calibrate(
    spec: CalibrateSpec,
    runs: Path,
    data_dir: Path | None = None,
    explicit_generation: set[str] | None = None,
    show_progress: bool = True,
    say: Callable[[str], None] = print,
    memo: bool = True,
) -> Calibration:
    """Run the calibration of `spec` (resumable, in `runs`) and return its result: the members
    and the grid race over blocks of dev rows (see the module docstring). With `memo`, the
    members' work is read from the memo of single-model work where another run did it
    (eval/memo.py: the members alone, their reference NLLs, their scores in a multiple-choice
    grid)."""
    task = get_task(spec.task)
    data_dir = data_dir or default_data_dir()
    path, name = dev_file(task, spec.dev_data, data_dir)
    for m in spec.models:  # a misspelt name fails now, not after the members before it have run
        check_reference(m)
    base = EvalSpec(task=task.name, models=spec.models[:1], generation=spec.generation, data=str(path),
                    limit=spec.limit, offset=spec.offset)  # fmt: skip
    rows = base.select(load_rows(task, str(path), data_dir))
    if not rows:
        raise FuselmError(f"no dev rows selected from {name} (offset {spec.offset}, limit {spec.limit})")
    controller, controller_dev, controller_seconds = None, None, 0.0
    if spec.controller and is_multiple_choice(task):
        raise FuselmError(f"task {task.name} is multiple_choice: a fusion controller steers generation; leave it out")
    if spec.controller:  # checked before any model loads
        controller, controller_dev, controller_seconds = _controller_rows(
            spec, task, data_dir, name, {r["id"] for r in rows}
        )
    runs.mkdir(parents=True, exist_ok=True)
    block = min(spec.block_rows, len(rows))
    looks = math.ceil(len(rows) / block)
    level = 1.0 - ALPHA / looks  # every look's intervals at this level: valid however many looks are taken
    too_few = len(rows) < spec.min_rows
    n_steps = len(spec.models) * 2  # grows once the grid is known
    step = 0

    def run(label: str, method: str, models: list[ModelConfig], options: dict, n: int) -> RunView:
        nonlocal step
        step += 1
        say(f"calibrate {step}/{n_steps}: {label} on {n} dev rows of {name}")
        out = runs / _slug(label)
        ev = base.model_copy(update={"method": method, "models": models, "method_options": options, "limit": n})
        _set_aside_if_other_setup(out, ev, say)
        if ran_past(out, ev):  # a calibration run again: its first looks are read back, as they were
            return view_of_first(load_run(out), task, ev, rows[:n])
        summary = run_eval(ev, out, data_dir, explicit_generation, show_progress=show_progress, memo=memo)
        if summary.memo_rows:
            say(f"calibrate: {summary.memo_rows} of {summary.n} rows of {label} from the memo")
        return load_run(out)

    n = block
    alone = {m.name: run(f"single {m.name}", "single", [m], {}, n) for m in spec.models}
    nll = _reference_nlls(spec, task, rows[:n], data_dir, runs, explicit_generation or set(), say, (step, n_steps),
                          show_progress, memo)  # fmt: skip
    step += len(spec.models)
    ranked = rank_members(task, alone, nll)
    if too_few:
        best = ranked[0]
        anchor_reason = f"{best} ({_pct(task, alone[best])}): the best dev score"
    else:
        best, anchor_reason = choose_anchor(task, ranked, alone, nll, spec.anchor_by, level)
    members = _member_scores(spec, task, alone, nll, ranked, best)
    grid = [] if too_few else _grid(spec, task, members, ranked, best, controller)
    n_steps += len(grid)
    views: dict[str, RunView] = {}
    dropped: dict[str, str] = {}
    alive = list(grid)
    floor_of = lambda anchor: _floor(spec.max_loss, anchor.summary.main)  # noqa: E731
    stop_reason = ""
    for look in range(1, looks + 1):
        if look > 1:
            n = min(look * block, len(rows))
            n_steps += len(spec.models) + len(alive)
            alone = {m.name: run(f"single {m.name}", "single", [m], {}, n) for m in spec.models}
        for label, method, models, opts in alive:
            views[label] = run(trial_name(label, [m.name for m in models]), method, models, opts, n)
        anchor = alone[best]
        for label, why in _race_drops(task, alone, anchor, {g[0]: views[g[0]] for g in alive}, level,
                                      floor_of(anchor), spec.max_cost).items():  # fmt: skip
            dropped[label] = f"{why} after {n} rows"
            say(f"calibrate: {label} is out after {n} dev rows: {why}")
        alive = [g for g in alive if g[0] not in dropped]
        if not alive:
            stop_reason = f"every fused setup was out after {n} of {len(rows)} dev rows" if grid else ""
            break
        leader = max(alive, key=lambda g: rank_key(task, views[g[0]]))
        d = paired_difference(views[leader[0]], anchor, task.main_metric, level=level)
        if look < looks and d is not None and d[1] > 0:
            stop_reason = f"{leader[0]} was surely above {best} after {n} of {len(rows)} dev rows"
            break
        spent = _seconds([*alone.values(), *views.values()]) / 60
        if look < looks and spec.budget_minutes is not None and spent >= spec.budget_minutes:
            stop_reason = f"the budget of {spec.budget_minutes:g} minutes was spent after {n} of {len(rows)} dev rows"
            break
    anchor = alone[best]
    tried = [_trial(task, label, method, models, opts, views[label], anchor, level, dropped.get(label))
             for label, method, models, opts in grid]  # fmt: skip
    if too_few:
        chosen = None
        reason = (f"{len(rows)} dev rows are too few to tell setups apart (--min-rows {spec.min_rows}): run {best}"
                  f" alone, the best dev score ({_pct(task, anchor)}); calibrate on more rows to decide")  # fmt: skip
    else:
        live = [t for t in tried if t.dropped is None]
        chosen, reason = choose(task, anchor, live, views, spec.significant, spec.max_loss, members=alone,
                                level=level, max_cost=spec.max_cost)  # fmt: skip
        if not live and tried and chosen is None:
            reason = f"fall back to {best} alone ({_pct(task, anchor)}): every fused setup was out of the race"
        if stop_reason:
            reason += f" (the race stopped: {stop_reason})"
    method, models, options = (
        (chosen.method, chosen.models, chosen.method_options) if chosen else ("single", [best], {})
    )
    # The anchor was picked on the first block; the members ran every block. A member alone that
    # ranks at least as high as the choice on all the dev rows, for no more cost, is the choice.
    pick = views[chosen.label] if chosen else anchor
    better = dominating_member(task, pick, alone, anchor, exclude=models if method == "single" else [])
    if better is not None:
        reason = (f"{better} alone ({_pct(task, alone[better])}) ranks at least as high as"
                  f" {chosen.label if chosen else best + ' alone'} ({_pct(task, pick)}) on the {n} dev rows for no"
                  f" more cost; it is run instead (before: {reason})")  # fmt: skip
        method, models, options = "single", [better], {}
    members = [
        m.model_copy(
            update={"score": alone[m.name].summary.main, "seconds_per_sample": alone[m.name].summary.seconds_per_sample}
        )
        for m in members
    ]  # fmt: skip (the scores on every dev row the members ran)
    used = rows[:n]
    return Calibration(
        task=task.name,
        metric=task.main_metric,
        dev=DevRows(file=name, offset=spec.offset, limit=n, ids=[r["id"] for r in used]),
        controller_dev=controller_dev,
        members=spec.models,
        scores=members,
        anchor=best,
        anchor_reason=anchor_reason,
        models=models,
        method=method,
        method_options=options,
        reason=reason,
        significant=spec.significant,
        max_loss=spec.max_loss,
        tried=tried,
        level=round(level, 6),
        looks=looks,
        decided=not too_few,
        dev_seconds=round(_seconds([*alone.values(), *views.values()]) + controller_seconds, 1),
        versions=versions(),
    )


def _pct(task: Task, view: RunView) -> str:
    return f"{(view.summary.main or 0.0) * task.scale():.1f}"


def _seconds(views: list[RunView]) -> float:
    return sum((v.summary.seconds_per_sample or 0.0) * v.summary.n for v in views)


def _floor(max_loss: float | None, anchor_score: float | None) -> float | None:
    """How far below the anchor's score a setup's interval may reach (None: no bound)."""
    if max_loss is None or math.isinf(max_loss):
        return None
    return -max_loss * max(anchor_score or 0.0, 0.0)


def relative_cost(view: RunView, anchor: RunView) -> float | None:
    """The cost of `view` over the anchor alone's on the rows both ran: CPU seconds where every
    one of those rows has them in both runs (models in this process: another job's load on the
    machine hardly moves them), else wall seconds."""
    mine = {r.id: r for r in view.rows}
    pairs = [(mine[r.id], r) for r in anchor.rows if r.id in mine]
    on_cpu = bool(pairs) and all(a.cpu_seconds is not None and b.cpu_seconds is not None for a, b in pairs)
    spent = sum((a.cpu_seconds if on_cpu else a.seconds) or 0.0 for a, _ in pairs)
    base = sum((b.cpu_seconds if on_cpu else b.seconds) or 0.0 for _, b in pairs)
    return round(spent / base, 3) if pairs and base > 0 else None


def _race_drops(
    task: Task,
    alone: dict[str, RunView],
    anchor: RunView,
    alive: dict[str, RunView],
    level: float,
    floor: float | None,
    max_cost: float | None,
) -> dict[str, str]:
    """The fused setups to leave behind after a look, and why: one surely below the best setup
    measured so far (member or fused), one surely more than the loss bound below the anchor,
    one costing more than `max_cost` times the anchor."""
    metric = task.main_metric
    everyone = {**{f"{n} alone": v for n, v in alone.items()}, **alive}
    leader_name, leader = max(everyone.items(), key=lambda kv: rank_key(task, kv[1]))
    scale = task.scale()
    out = {}
    for label, view in alive.items():
        cost = relative_cost(view, anchor)
        if max_cost is not None and cost is not None and cost > max_cost:
            out[label] = f"{cost:.2f}x the anchor's time (--max-cost {max_cost:g})"
            continue
        d = paired_difference(view, anchor, metric, level=level)
        if floor is not None and d is not None and d[2] < floor:
            out[label] = (
                f"surely more than the loss bound below the anchor ({d[0] * scale:+.1f} [{d[1] * scale:+.1f}, {d[2] * scale:+.1f}])"
            )
            continue
        if label != leader_name:
            d = paired_difference(view, leader, metric, level=level)
            if d is not None and d[2] < 0:
                out[label] = (
                    f"surely below {leader_name} ({d[0] * scale:+.1f} [{d[1] * scale:+.1f}, {d[2] * scale:+.1f}])"
                )
    return out


def _trial(task, label, method, models, opts, view: RunView, anchor: RunView, level, dropped) -> Trial:
    d = paired_difference(view, anchor, task.main_metric, level=level)
    return Trial(
        label=label,
        method=method,
        models=[m.name for m in models],
        method_options=opts,
        score=view.summary.main,
        versus_best=None if d is None else [round(x, 5) for x in d],
        seconds_per_sample=view.summary.seconds_per_sample,
        n=view.summary.n,
        cost=relative_cost(view, anchor),
        dropped=dropped,
    )


def _member_scores(spec, task, alone, nll, ranked, best) -> list[MemberScore]:
    """Each member's dev score, reference NLL, quality weight and whether the equal-vote setups
    keep it (members more than `max_gap` points below the best are anchored only)."""
    scores = {n: v.summary.main for n, v in alone.items()}
    best_nll = min((x for x in nll.values() if x is not None), default=None)
    scale = task.scale()
    members = []
    for m in spec.models:
        gap = ((scores[ranked[0]] or 0.0) - (scores[m.name] or 0.0)) * scale  # below the best dev score
        kept = m.name == best or gap <= spec.max_gap
        weight = 1.0 if not best_nll or nll[m.name] is None else round(best_nll / nll[m.name], 4)
        members.append(
            MemberScore(
                name=m.name,
                score=scores[m.name],
                nll=None if nll[m.name] is None else round(nll[m.name], 4),
                weight=weight,
                kept=kept,
                why_dropped=None
                if kept
                else f"{gap:.1f} points below {ranked[0]}: anchored only (max gap {spec.max_gap:g})",
                seconds_per_sample=alone[m.name].summary.seconds_per_sample,
            )  # fmt: skip
        )
    return members


def _choice_grid(spec, members: list[MemberScore], kept_models: list[ModelConfig]) -> list:
    """The fused setups of a multiple-choice task (eval.choice): the product of the members'
    choice log-likelihoods over the kept members (one weak member drags a product down: the gap
    rule applies), and their mixture over all of them (one confident member is enough), each with
    equal and with the quality weights."""
    grid = []

    def both(method: str, models: list[ModelConfig], weights: list[float]) -> None:
        grid.append((method, method, models, {}))
        if len(set(weights)) > 1:  # equal quality weights (none measured: an lm-eval task) are the plain setup
            grid.append((f"{method} weights={weights}", method, models, {"weights": weights}))

    if len(kept_models) >= 2:
        both("product", kept_models, [next(s.weight for s in members if s.name == m.name) for m in kept_models])
    both("mixture", list(spec.models), [s.weight for s in members])
    return grid


def _grid(
    spec, task: Task, members: list[MemberScore], ranked, best, controller
) -> list[tuple[str, str, list[ModelConfig], dict]]:
    """The fused setups to try: (label, method, models, options), each method's own
    (`FusionMethod.calibration_setups`), in the methods' registry order."""
    kept_models = [m for m in spec.models if next(s for s in members if s.name == m.name).kept]
    if is_multiple_choice(task):
        return _choice_grid(spec, members, kept_models)
    grid = GridContext(
        members=list(spec.models),
        kept=kept_models,
        kept_weights=[next(s.weight for s in members if s.name == m.name) for m in kept_models],
        weights=[s.weight for s in members],
        ranked=list(ranked),
        anchor=best,
        thetas=list(spec.thetas),
        margins=list(spec.margins),
        one_vocabulary=one_vocabulary(list(spec.models)),
        controller=None if controller is None else str(controller),
    )
    return [(s.label, cls.name, s.models, s.options) for cls in METHODS.values() for s in cls.calibration_setups(grid)]


def ran_past(out: Path, spec: EvalSpec) -> bool:
    """Whether `out` holds this run on more rows than `spec.limit` (the same rows first): a
    calibration run again (after an interruption, or done) replays its race's earlier looks."""
    cfg = out / "config.json"
    if not cfg.is_file():
        return False
    old = as_today(json.loads(cfg.read_text()).get("spec")) or {}
    new = spec.model_dump(mode="json")
    same = {k: v for k, v in old.items() if k != "limit"} == {k: v for k, v in new.items() if k != "limit"}
    return same and spec.limit is not None and (old.get("limit") is None or old["limit"] > spec.limit)


def view_of_first(view: RunView, task: Task, spec: EvalSpec, selected: list[dict[str, Any]]) -> RunView:
    """`view` on the `selected` rows only (a run that went further), summarized again."""
    ids = {r["id"] for r in selected}
    rows = [r for r in view.rows if r.id in ids]
    return RunView(view.name, summarize(task, spec, rows, selected), rows)


def _set_aside_if_other_setup(out: Path, spec: EvalSpec, say: Callable[[str], None]) -> None:
    """A run directory is named by its setup's label, which does not name the anchor: when the
    dev rows name another anchor (a calibration run again with more rows), the anchored runs
    there hold another setup, and a controller trained again (`--controller-rows` on other rows)
    is the same file name with other weights. Such runs are set aside and run again, rather than
    stopping the calibration on a config mismatch."""
    why = other_setup(out, spec.method, [m.name for m in spec.models], spec.method_options)
    if why is not None:
        aside = set_aside(out)
        say(f"calibrate: {out.name} held {why}: moved to {aside.name}, run again")


def choose_anchor(
    task: Task,
    ranked: list[str],
    alone: dict[str, RunView],
    nll: dict[str, float | None],
    by: str = "nll",
    level: float = 0.95,
) -> tuple[str, str]:
    """The anchor among the members `ranked` best first on the dev rows, and why. By `nll`: of
    the members whose dev score is not significantly below the first one's (its paired 95%
    interval reaches 0), the one whose NLL of the dev references is lowest. A few dozen dev rows
    rank members on a pass/fail score by chance (Qwen2.5-Coder 0.5B solved 8 of HumanEval's
    problems 82-111, the 1.5B 6, while the 1.5B solved 76% of problems 0-81 and the 0.5B 60%);
    the NLL of every reference token is a steadier measure of the same skill."""
    scale = task.scale()
    top = ranked[0]
    fmt = lambda n: f"{n} ({(alone[n].summary.main or 0.0) * scale:.1f})"  # noqa: E731
    if by == "score" or nll.get(top) is None:
        return top, f"{fmt(top)}: the best dev score"
    close = []
    for n in ranked[1:]:
        d = paired_difference(alone[top], alone[n], task.main_metric, level=level)
        if nll.get(n) is not None and (d is None or d[1] <= 0):
            close.append((n, d))
    n, d = min(close, key=lambda c: nll[c[0]], default=(top, None))
    if n == top or nll[n] >= nll[top]:
        why = f"{fmt(top)}: the best dev score"
        return top, why + (
            f", and the lowest reference NLL of the {len(close) + 1} within noise of it" if close else ""
        )
    ahead = (
        f", ahead by {d[0] * scale:+.1f} [{d[1] * scale:+.1f}, {d[2] * scale:+.1f}] (paired {level:.1%})" if d else ""
    )
    return n, (f"{fmt(n)}: the lowest reference NLL ({nll[n]:.3f} per byte against {nll[top]:.3f}) of the members"
               f" within noise of the best dev score, {fmt(top)}{ahead}")  # fmt: skip


def choose(
    task: Task,
    best: RunView,
    tried: list[Trial],
    views: dict[str, RunView],
    significant: bool = False,
    max_loss: float | None = None,
    *,
    members: dict[str, RunView] | None = None,
    level: float = 0.95,
    max_cost: float | None = None,
) -> tuple[Trial | None, str]:
    """The tried setup to run, or None for the anchor alone (`best`), and why. A setup must rank
    above the anchor on the dev rows (the main metric, ties decided by the finer ones); with
    `max_loss`, its paired interval against it must reach no lower than that fraction of the
    anchor's score below 0 (a mean gain of one problem in 30, with an interval down to -13
    points on an anchor at 20, is not a reason to leave the anchor); with `significant`, the
    interval must lie above 0; with `max_cost`, it takes at most that many times the anchor's
    time; and given the `members` alone, it is not surely below any of them (the anchor may be
    a member within noise of the best one, not the best). Of the setups left, the cheapest of
    those within noise of the best-ranked one is chosen (a tie goes to the cheaper setup);
    without costs, the best-ranked one. Intervals are at `level` (the race's)."""
    scale = task.scale()
    name = best.summary.models[0]
    best_score = best.summary.main if best.summary.main is not None else -math.inf
    floor = _floor(max_loss, best_score)
    keys = {id(t): rank_key(task, views[t.label]) for t in tried}
    above = [t for t in tried if keys[id(t)] > rank_key(task, best)]
    if max_cost is not None:
        above = [t for t in above if t.cost is None or t.cost <= max_cost]
    if members:
        above = [t for t in above if not _surely_below_a_member(task, views[t.label], members, level)]
    if floor is not None:
        bounded = [t for t in above if t.versus_best is not None and t.versus_best[1] >= floor]
    else:
        bounded = above
    sure = [t for t in bounded if t.versus_best is not None and t.versus_best[1] > 0]
    eligible = sure if significant else bounded
    leader = max(eligible, key=lambda t: keys[id(t)], default=None)
    chosen = leader
    if leader is not None and leader.cost is not None:
        close = [t for t in eligible if t is leader or _within_noise(task, views[t.label], views[leader.label], level)]
        chosen = min(close, key=lambda t: (t.cost if t.cost is not None else math.inf, [-x for x in keys[id(t)]]))
    interval = lambda d: f"{d[0] * scale:+.1f} [{d[1] * scale:+.1f}, {d[2] * scale:+.1f}]"  # noqa: E731
    if chosen is not None:
        d = chosen.versus_best
        reason = f"{chosen.label} scored {chosen.score * scale:.1f} on the dev rows against {best_score * scale:.1f} for {name} alone"
        if chosen.score == best_score:
            reason += f" (a tie on {task.main_metric}, decided by {', '.join(_finer(task))})"
        if d is not None:
            reason += f" ({interval(d)}, paired {level:.1%})"
        if chosen.cost is not None:
            reason += f", at {chosen.cost:.2f}x its time"
        if chosen is not leader and leader is not None:
            reason += (f"; the cheapest within noise of {leader.label} ({leader.score * scale:.1f},"
                       f" {leader.cost:.2f}x)")  # fmt: skip
        return chosen, reason
    top = max(tried, key=lambda t: keys[id(t)], default=None)
    if top is None:
        why = "nothing was tried"
    elif bounded:  # only with `significant`
        top = max(bounded, key=lambda t: keys[id(t)])
        why = (f"no fused setup's gain was significant on the dev rows (best: {top.label},"
               f" {interval(top.versus_best or [0.0, 0.0, 0.0])})")  # fmt: skip
    elif above:  # only with `max_loss`
        top = max(above, key=lambda t: keys[id(t)])
        d = top.versus_best
        risk = "no paired interval" if d is None else f"{interval(d)}, paired {level:.1%}"
        why = (f"the fused setups that beat it on the dev rows may lose more than {max_loss * 100:g}% of its score"
               f" (best: {top.label}, {risk}; the interval may reach {floor * scale:+.1f})")  # fmt: skip
    else:
        why = f"no fused setup beat it on the dev rows (best: {top.label}, {(top.score or 0) * scale:.1f})"
    return None, f"fall back to {name} alone ({best_score * scale:.1f}): {why}"


def dominating_member(
    task: Task, pick: RunView, alone: dict[str, RunView], anchor: RunView, exclude: list[str] = ()
) -> str | None:
    """The member whose run alone ranks at least as high as `pick` (main metric, then the finer
    ones) on the same dev rows at no more cost (both relative to the anchor), the best such; or
    None."""
    pick_cost = relative_cost(pick, anchor)
    found = [
        name for name, view in alone.items()
        if name not in exclude and view is not pick and view.summary.n >= pick.summary.n
        and rank_key(task, view) >= rank_key(task, pick)
        and (c := relative_cost(view, anchor)) is not None and pick_cost is not None and c <= pick_cost
    ]  # fmt: skip
    return max(found, key=lambda name: rank_key(task, alone[name]), default=None)


def _within_noise(task: Task, view: RunView, leader: RunView, level: float) -> bool:
    """Whether `view` is not surely below `leader` (its paired interval reaches 0)."""
    d = paired_difference(view, leader, task.main_metric, level=level)
    return d is None or d[2] >= 0


def _surely_below_a_member(task: Task, view: RunView, members: dict[str, RunView], level: float) -> bool:
    return any(not _within_noise(task, view, m, level) for m in members.values())


def _controller_rows(
    spec: CalibrateSpec, task: Task, data_dir: Path, dev_name: str, dev_ids: set
) -> tuple[Path, DevRows, float]:
    """The controller's file (absolute: a calibration is used from anywhere), the rows it learnt
    from, which must not be the calibration's own (its dev score would flatter it), and the
    seconds its training decoded for."""
    path = Path(spec.controller or "").resolve()
    ctl = Controller.load(path)
    ctl.check_models([m.name for m in spec.models], str(path))
    dev = ctl.info.get("dev") or {}
    if "ids" not in dev:
        raise FuselmError(f"{path} does not say which rows it learnt from: train it again with this fuselm")
    _, name = dev_file(task, dev.get("data"), data_dir)
    if name == dev_name and dev_ids & set(dev["ids"]):
        raise FuselmError(
            f"{path} learnt from {len(dev_ids & set(dev['ids']))} of these dev rows: its score on them says"
            " nothing; train it on other rows (--offset past them)"
        )
    rows = DevRows(file=name, offset=dev.get("offset", 0), limit=dev.get("limit"), ids=list(dev["ids"]))
    return path, rows, float(ctl.info.get("seconds") or 0.0)


def _reference_nlls(
    spec, task, rows, data_dir, runs, explicit, say, at: tuple[int, int], show_progress: bool, memo: bool
) -> dict[str, float | None]:
    """Each member's reference NLL, kept in runs/reference_nll.json (done once)."""
    cache = runs / "reference_nll.json"
    done = json.loads(cache.read_text()) if cache.is_file() else {}
    key = json.dumps({"unit": "byte", "rows": [r["id"] for r in rows]})
    done = done if done.get("rows") == key else {"rows": key, "nll": {}}
    gen = task_generation(task, spec.generation, explicit)
    prefix = task.prompt_prefix(data_dir)
    for i, m in enumerate(spec.models):
        if m.name in done["nll"]:
            continue
        say(f"calibrate {at[0] + i + 1}/{at[1]}: {m.name}'s NLL of the {len(rows)} dev references")
        store = Memo() if memo else None
        try:
            value = reference_nll(m, task, rows, prefix, gen, show_progress, store)
        except FuselmError:  # a task without reference texts: no quality weights
            value = None
        finally:
            if store is not None:
                store.close()
        if store is not None and store.hits:
            say(f"calibrate: {store.hits} of {len(rows)} of {m.name}'s reference scores from the memo")
        done["nll"][m.name] = value
        atomic_write_json(cache, done)
    return {m.name: done["nll"][m.name] for m in spec.models}


def check_unused(path: str | Path, spec: EvalSpec, data_dir: Path | None = None) -> None:
    """Refuse to evaluate rows that the calibration at `path` ran on (its choice was made on
    them: a score there says nothing about other rows)."""
    from ..calibration import load_calibration

    cal = load_calibration(path)
    task = get_task(spec.task)
    if spec.data and spec.data.startswith("hub:"):
        return
    data_dir = data_dir or default_data_dir()
    file = Path(spec.data) if spec.data else data_dir / (task.data_file or "")
    selected = None
    for rows, what in ((cal.dev, "calibrate"), (cal.controller_dev, "train the controller of")):
        if rows is None or not _same_file(task, rows.file, file, data_dir):
            continue
        selected = selected or spec.select(load_rows(task, spec.data, data_dir))
        used = [r["id"] for r in selected if r["id"] in set(rows.ids)]
        if used:
            raise FuselmError(
                f"{len(used)} of the {len(selected)} rows to evaluate (ids {used[0]}..{used[-1]}) were used to {what}"
                f" {path} ({rows.file}, offset {rows.offset}); evaluate other rows (--offset) or calibrate on"
                " other data"
            )


def _same_file(task: Task, recorded: str, file: Path, data_dir: Path) -> bool:
    """Whether a calibration's recorded dev file is `file` (a name, `test`, or an absolute path,
    as older calibrations recorded a package's file)."""
    try:
        return data_path(task, recorded, data_dir).resolve() == file.resolve()
    except FuselmError:  # not on this machine: it cannot be the file evaluated here
        return False
