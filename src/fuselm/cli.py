"""The `fuselm` command line. Flags for generation and models are derived from the config models."""

from __future__ import annotations

import argparse
import json
import os
import sys
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from .config import LOCAL_FIELDS, GenerationConfig, ModelConfig, RunConfig, parse_model_ref, validation_message
from .errors import FuselmError
from .files import load_yaml

# Flags whose CLI spelling differs from a plain --field-name (or that belong to one model entry:
# a model on an engine is given in --models as ENGINE:URL, see config.parse_model_ref).
_SPECIAL_FIELDS = {"chat", "name", "weight", "trust_remote_code", "engine", "url", "model", "api_key_env", "tokenizer"}


def _add_model_flags(parser: argparse.ArgumentParser, model: type[BaseModel], skip: set[str]) -> None:
    """Add --field-name flags for the fields of a pydantic model (defaults stay in the model)."""
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        ann = field.annotation
        origin = typing.get_origin(ann)
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": field.description}
        if origin is list:
            kwargs.update(action="append", metavar="TEXT")
        elif origin is typing.Literal:
            kwargs.update(choices=typing.get_args(ann))
        elif ann is bool:
            kwargs.update(action="store_true")
        else:
            args = [a for a in typing.get_args(ann) if a is not type(None)] or [ann]
            kwargs.update(type=args[0] if args[0] in (int, float, str) else str)
        parser.add_argument(flag, **kwargs)


def _pick(ns: argparse.Namespace, model: type[BaseModel]) -> dict[str, Any]:
    return {k: getattr(ns, k) for k in model.model_fields if hasattr(ns, k)}


def _add_run_flags(p: argparse.ArgumentParser, config_help: str = "run config; flags override its values") -> None:
    """Flags shared by `generate`, `eval` and `serve`: models, method, config, and the config fields."""
    p.add_argument(
        "--model",
        "--models",
        dest="models",
        metavar="NAMES",
        help="model (or comma-separated models): bundled name, directory or .gguf",
    )
    p.add_argument(
        "--method",
        default=argparse.SUPPRESS,
        help=f"decoding method (default: single): {_method_list()}; a multiple_choice task is scored by single,"
        " product or mixture (docs/tasks.md)",
    )
    p.add_argument("--config", metavar="FILE.yaml", help=config_help)
    p.add_argument(
        "--option",
        "-O",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="method option, e.g. -O theta=0.5 -O max_words=2 (see docs/methods.md)",
    )
    p.add_argument("--router", metavar="DIR", help="trained router for fusionroute / expert-route (= -O router=DIR)")
    p.add_argument(
        "--calibration",
        metavar="CALIB.yaml",
        help="run the setup a `fuselm calibrate` chose: its models, method and options (-O overrides them)",
    )
    for flag, const, help_text in [
        ("--chat", "chat", "use the chat template (error if the model has none)"),
        ("--raw", "raw", "feed the prompt as raw text"),
    ]:
        p.add_argument(flag, dest="chat", action="store_const", const=const, default=argparse.SUPPRESS, help=help_text)
    p.add_argument(
        "--trust-remote-code",
        dest="trust_remote_code",
        action="store_true",
        default=argparse.SUPPRESS,
        help="allow custom model code from a model directory (off by default)",
    )
    _add_model_flags(p, GenerationConfig, skip=_SPECIAL_FIELDS)
    _add_model_flags(p, ModelConfig, skip=_SPECIAL_FIELDS)


def _method_list() -> str:
    from .fusion.methods import METHODS

    return ", ".join(METHODS.names())


def _task_list() -> str:
    from .eval.tasks import TASKS

    return ", ".join(TASKS.names()) + ", or a task file (lm-eval YAML, docs/tasks.md; descriptions: `fuselm tasks`)"


MEMO_HELP = (
    "neither read nor keep single-model work in the memo (a greedy `single` generation, a model's scores of"
    " continuations: docs/evaluation.md); on by default"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fuselm", description="Fuse several language models at inference time.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and library logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    sub.add_parser("models", help="list the bundled models and their state on this machine")

    ts = sub.add_parser("tasks", help="list the built-in tasks and those of task files (see docs/tasks.md)")
    ts.add_argument("files", nargs="*", metavar="FILE.yaml", help="task files (lm-eval task YAML) to read and list")

    g = sub.add_parser("generate", help="generate text with one model or an ensemble")
    g.add_argument("prompt", nargs="?", help="the prompt ('-' reads standard input)")
    _add_run_flags(g)
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    g.add_argument("--html", metavar="OUT.html", help="also write the answer as HTML, spans coloured by model")

    e = sub.add_parser("eval", help="evaluate a method on benchmark tasks (resumable)")
    e.add_argument("--task", action="append", dest="tasks", metavar="TASK", help=f"task (repeatable): {_task_list()}")
    e.add_argument("--list-tasks", action="store_true", help="list the tasks and exit")
    _add_run_flags(e)
    e.add_argument("--data", help="local JSONL file for the task, or hub:NAME[:CONFIG]:SPLIT when online")
    e.add_argument("--data-dir", help="directory with the benchmark files (default: $FUSELM_DATA, else ./data)")
    e.add_argument("--limit", type=int, help="number of rows")
    e.add_argument("--concurrency", type=int, default=1, metavar="N",
                   help="rows in flight at once, for models on engines, which batch them (default 1)")  # fmt: skip
    e.add_argument("--offset", type=int, default=0, help="first row")
    e.add_argument("--out", required=False, help="run directory (several tasks/methods: one subdirectory each)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.add_argument("--no-memo", action="store_true", help=MEMO_HELP)

    v = sub.add_parser("serve", help="serve setups as OpenAI-compatible models over HTTP (see docs/serving.md)")
    _add_run_flags(v, config_help="serve config: setups, limits, host, port (see docs/serving.md)")
    v.add_argument("--id", help="model id of the setup given by --models/--method (default: the method, or the model)")
    v.add_argument("--replicas", type=int, default=1, metavar="N",
                   help="copies of the --models setup's models, requests run side by side on them (default 1)")  # fmt: skip
    v.add_argument("--host", default=argparse.SUPPRESS, help="address to bind (default 127.0.0.1: this machine only)")
    v.add_argument("--port", type=int, default=argparse.SUPPRESS, help="port (default 8000)")
    v.add_argument(
        "--api-key", default=argparse.SUPPRESS, help="require `Authorization: Bearer KEY` (or FUSELM_API_KEY)"
    )
    _add_limit_flags(v)

    c = sub.add_parser("calibrate", help="choose, on dev rows, how to fuse an ensemble on a task (resumable)")
    c.add_argument("--task", required=True, help=f"task: {_task_list()}")
    c.add_argument("--model", "--models", dest="models", metavar="NAMES", required=True,
                   help="the ensemble's models, comma-separated (as for generate)")  # fmt: skip
    c.add_argument(
        "--dev-data",
        metavar="FILE",
        help="dev rows (default: the task's dev file; path or under --data-dir; `test`: the task's test file,"
        " with --offset past the rows you evaluate)",
    )
    c.add_argument("--offset", type=int, default=0, help="first dev row")
    c.add_argument("--limit", "--budget-rows", dest="limit", type=int, default=200,
                   help="dev rows at most: the race's budget (default 200)")  # fmt: skip
    c.add_argument("--block-rows", type=int, default=50, metavar="N",
                   help="the race looks after each block of N dev rows and goes on only with the setups still in"
                        " contention (default 50)")  # fmt: skip
    c.add_argument(
        "--budget-minutes",
        type=float,
        metavar="M",
        help="no further block once the calibration's runs have decoded for M minutes",
    )
    c.add_argument(
        "--max-cost",
        type=float,
        metavar="X",
        help="leave out fused setups that take more than X times the anchor's time per row",
    )
    c.add_argument(
        "--min-rows",
        type=int,
        default=30,
        metavar="N",
        help="on fewer dev rows, choose no fused setup: the best member alone (default 30)",
    )
    c.add_argument("--out", required=True, metavar="CALIB.yaml", help="the calibration file to write")
    c.add_argument("--plot", metavar="OUT.png",
                   help="also draw what it tried: dev scores with paired intervals (run again to redraw: nothing reruns)")  # fmt: skip
    c.add_argument("--runs", metavar="DIR", help="where the dev runs go (default: CALIB.runs/ beside --out)")
    c.add_argument("--thetas", default="0.5,0.8", help="anchored AdaFuse: thresholds to try (default 0.5,0.8)")
    c.add_argument("--margins", default="0,0.5", help="anchored AdaFuse: override margins to try (default 0,0.5)")
    c.add_argument("--max-gap", type=float, default=10.0,
                   help="no equal-vote setups with members more points than this below the best on dev; "
                        "anchored ones keep them (default 10)")  # fmt: skip
    c.add_argument("--controller-rows", type=int, default=0, metavar="N",
                   help="also try adafuse with a learned controller, trained first on the N dev rows after"
                        " --offset + --limit (saved as CALIB.controller.json; default 0: none)")  # fmt: skip
    c.add_argument("--controller", metavar="FILE.json",
                   help="also try adafuse with this controller (trained on other dev rows)")  # fmt: skip
    c.add_argument("--anchor-by", choices=["nll", "score"], default="nll",
                   help="the anchor (and fallback): nll, of the members within noise of the best dev score, the one"
                        " with the lowest NLL of the dev references (default); score, the best dev score")  # fmt: skip
    c.add_argument("--significant", action="store_true",
                   help="fuse only where the gain over the anchor is significant on the dev rows (its paired"
                        " 95%% interval above 0); safer, fewer gains")  # fmt: skip
    c.add_argument("--max-loss", type=float, default=0.1, metavar="FRACTION",
                   help="fuse only where the paired 95%% interval against the anchor on the dev rows reaches no"
                        " lower than this fraction of the anchor's score below it (default 0.1; 0: no plausible"
                        " loss at all; inf: no bound)")  # fmt: skip
    c.add_argument("--data-dir", help="directory with the benchmark files (default: $FUSELM_DATA, else ./data)")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    c.add_argument("--no-memo", action="store_true", help=MEMO_HELP)
    _add_model_flags(c, GenerationConfig, skip=_SPECIAL_FIELDS | {"stop"})
    _add_model_flags(c, ModelConfig, skip=_SPECIAL_FIELDS)

    t = sub.add_parser("train-router", help="train a FusionRoute router for a set of experts (resumable)")
    t.add_argument("--config", metavar="FILE.yaml", help="training config (see docs/fusionroute.md)")
    _add_train_flags(t)
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

    tc = sub.add_parser("train-controller", help="fit a learned fusion controller for adafuse on dev rows (resumable)")
    tc.add_argument("--task", required=True, help=f"task: {_task_list()}")
    tc.add_argument("--model", "--models", dest="models", metavar="NAMES", required=True,
                    help="the ensemble's models, comma-separated, in the order they will run")  # fmt: skip
    tc.add_argument("--data", metavar="FILE", help="dev rows (default: the task's dev file; `test` as for calibrate)")
    tc.add_argument("--offset", type=int, default=0, help="first dev row")
    tc.add_argument("--limit", type=int, default=100, help="dev rows (default 100)")
    tc.add_argument("--option", "-O", action="append", default=[], metavar="KEY=VALUE",
                    help="adafuse option while collecting (use the same when generating)")  # fmt: skip
    tc.add_argument("--out", required=True, metavar="CONTROLLER.json", help="the controller file to write")
    tc.add_argument("--data-dir", help="directory with the benchmark files (default: $FUSELM_DATA, else ./data)")
    tc.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_model_flags(tc, ModelConfig, skip=_SPECIAL_FIELDS)

    sub.add_parser(
        "lm-eval",
        help="run lm-evaluation-harness with the `fuselm` model registered: fuselm lm-eval --model fuselm"
        " --model_args config=fuse.yaml --tasks TASK ... (lm-eval's own arguments; docs/tasks.md)",
        add_help=False,
    )
    r = sub.add_parser("report", help="compare evaluation runs: table, Markdown, PNG")
    r.add_argument("runs", nargs="+", help="run directories")
    r.add_argument("--md", metavar="OUT.md", help="also write the table as Markdown")
    r.add_argument("--plot", metavar="OUT.png", help="also plot quality against cost")
    r.add_argument(
        "--baseline",
        metavar="NAME[,NAME]",
        help="add each run's main metric minus a baseline run's on the same task, with a 95%% paired"
        " bootstrap interval (same resampled rows for both); NAME is a model (its single-model run)"
        " or a method (e.g. token-average)",
    )
    return parser


def _run_config(ns: argparse.Namespace, data: dict[str, Any] | None = None, task: str | None = None) -> RunConfig:
    """The run config from a config file and the flags; with a calibration (for `task`, when
    given), the setup it chose."""
    if data is None:
        data = load_yaml(ns.config) if ns.config else {}
    gen = dict(data.get("generation") or {})
    gen.update(_pick(ns, GenerationConfig))
    data["generation"] = gen
    model_overrides = _pick(ns, ModelConfig)
    if ns.models:
        data["models"] = [parse_model_ref(n.strip()) for n in ns.models.split(",") if n.strip()]
    calibrated = bool(getattr(ns, "calibration", None) or data.get("calibration"))
    if not data.get("models") and not calibrated:
        raise FuselmError("no model given: use --model NAME (see `fuselm models`) or a --config file")
    data["models"] = [_with_overrides(m, model_overrides) for m in data.get("models") or []]
    if hasattr(ns, "method"):
        data["method"] = ns.method
    opts = {**(data.get("method_options") or {}), **_options(ns.option)}
    if getattr(ns, "router", None):
        opts["router"] = ns.router
    data["method_options"] = opts
    calibration = getattr(ns, "calibration", None) or data.pop("calibration", None)
    if calibration:
        from .calibration import apply_calibration

        data = apply_calibration(data, calibration, task)
        data["models"] = [_with_overrides(m, model_overrides) for m in data["models"]]
    try:
        cfg = RunConfig(**data)
    except ValidationError as e:
        raise FuselmError(validation_message(e, ns.config or "options", RunConfig)) from None
    from .fusion.methods import check_method

    # before any model is loaded; a multiple-choice task is scored, by its own methods (eval/choice.py)
    if task is not None:
        from .eval.choice import check_choice_method, check_generation_method, is_multiple_choice
        from .eval.tasks import get_task

        loaded = get_task(task)
        if is_multiple_choice(loaded):
            check_choice_method(loaded, cfg.method, len(cfg.models), cfg.method_options)
            return cfg
        check_generation_method(loaded, cfg.method)
    check_method(cfg.method, len(cfg.models), cfg.method_options)
    return cfg


def _options(items: list[str]) -> dict[str, Any]:
    """`--option KEY=VALUE`s (`-O`): each value read as YAML, dashes in a key as underscores."""
    opts: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise FuselmError(f"--option expects KEY=VALUE, got {item!r}")
        opts[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return opts


def _with_overrides(entry: str | dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A model entry with the command line's model flags, each where it fits (--threads to the
    in-process models, --timeout-s to those on engines)."""
    entry = {"name": entry} if isinstance(entry, str) else dict(entry)
    skip = LOCAL_FIELDS if entry.get("engine") else ("timeout_s",)
    return {**entry, **{k: v for k, v in overrides.items() if k not in skip}}


def cmd_eval(ns: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from .eval.runner import EvalSpec, run_eval
    from .eval.tasks import TASKS, get_task

    console = Console(stderr=True)
    if ns.list_tasks:
        for name, description in TASKS.describe(lambda t: t.description):
            print(f"{name:14} {description}")
        return 0
    data = load_yaml(ns.config) if ns.config else {}
    tasks = ns.tasks or data.pop("tasks", None) or ([data.pop("task")] if "task" in data else [])
    methods = [ns.method] if hasattr(ns, "method") else (data.pop("methods", None) or [data.get("method", "single")])
    data.pop("tasks", None), data.pop("methods", None)
    if not tasks:
        raise FuselmError("no task given: use --task NAME (see `fuselm eval --list-tasks`)")
    if not ns.out:
        raise FuselmError("give --out DIR for the run (it is resumable: run the same command again to continue)")
    tasks = [get_task(t).name for t in tasks]  # unknown task: fail before loading any model; a file: its path
    explicit = set(_pick(ns, GenerationConfig)) | set((data.get("generation") or {}).keys())
    summaries = []
    for task in tasks:
        for method in methods:
            base = argparse.Namespace(**{**vars(ns), "method": method})
            if (ns.calibration or data.get("calibration")) and not hasattr(ns, "method") and "method" not in data:
                del base.method  # the calibration chooses it
            run = _run_config(base, data=dict(data), task=task)
            spec = EvalSpec(
                task=task,
                method=run.method,
                models=run.models,
                method_options=run.method_options,
                generation=run.generation,
                data=ns.data,
                limit=ns.limit,
                offset=ns.offset,
                seed=getattr(ns, "seed", None),  # --seed also shuffles the rows
            )
            if ns.calibration or data.get("calibration"):
                from .eval.calibrate import check_unused

                check_unused(ns.calibration or data["calibration"], spec, Path(ns.data_dir) if ns.data_dir else None)
            out = Path(ns.out) if len(tasks) * len(methods) == 1 else Path(ns.out) / f"{get_task(task).label}__{method}"
            summaries.append(
                run_eval(
                    spec,
                    out,
                    Path(ns.data_dir) if ns.data_dir else None,
                    explicit,
                    show_progress=not ns.no_progress,
                    concurrency=ns.concurrency,
                    memo=not ns.no_memo,
                )
            )
    table = Table(title="evaluation")
    for col in ("task", "method", "models", "n", "metrics", "s/sample"):
        table.add_column(col)
    for s in summaries:
        shown = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} n/a" for k, v in s.metrics.items())
        cost = f"{s.seconds_per_sample:.2f}" if s.seconds_per_sample is not None else "n/a"
        table.add_row(s.task, s.method, s.setup, str(s.n), shown, cost)
    console.print(table)
    dumped = [s.model_dump(mode="json") for s in summaries]
    print(json.dumps(dumped if len(dumped) > 1 else dumped[0], ensure_ascii=False))
    return 0


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise FuselmError(f"{flag} expects numbers separated by commas, got {text!r}") from None


def cmd_calibrate(ns: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from .eval.calibrate import CalibrateSpec, calibrate

    console = Console(stderr=True, width=None if sys.stderr.isatty() else 140)
    overrides = _pick(ns, ModelConfig)
    models = [_with_overrides(parse_model_ref(n.strip()), overrides) for n in ns.models.split(",") if n.strip()]
    try:
        spec = CalibrateSpec(
            task=ns.task, models=models, dev_data=ns.dev_data, offset=ns.offset, limit=ns.limit,
            thetas=_floats(ns.thetas, "--thetas"), margins=_floats(ns.margins, "--margins"), max_gap=ns.max_gap,
            generation=GenerationConfig(**_pick(ns, GenerationConfig)), controller=ns.controller,
            significant=ns.significant, max_loss=ns.max_loss, anchor_by=ns.anchor_by, block_rows=ns.block_rows,
            budget_minutes=ns.budget_minutes, max_cost=ns.max_cost, min_rows=ns.min_rows,
        )  # fmt: skip
    except ValidationError as e:
        raise FuselmError(validation_message(e, "calibrate", flags=True)) from None
    from .eval.tasks import get_task

    spec = spec.model_copy(update={"task": get_task(ns.task).name})  # unknown: fail now; a file: its path
    out = Path(ns.out)
    runs = Path(ns.runs) if ns.runs else out.with_suffix(".runs")
    if ns.controller_rows:
        from .eval.choice import is_multiple_choice

        if is_multiple_choice(get_task(spec.task)):
            raise FuselmError(f"task {spec.task} is multiple_choice: a fusion controller steers generation; leave"
                              " --controller-rows out")  # fmt: skip
        if ns.controller:
            raise FuselmError("give --controller FILE or --controller-rows N, not both")
        from .training.controller_train import ControllerTrainSpec, train_controller

        try:
            train = ControllerTrainSpec(task=spec.task, models=models, data=ns.dev_data, offset=ns.offset + ns.limit,
                                        limit=ns.controller_rows)  # fmt: skip
        except ValidationError as e:
            raise FuselmError(validation_message(e, "--controller-rows")) from None
        path = out.with_suffix(".controller.json")
        console.print(f"[bold]calibrate: a controller on {ns.controller_rows} dev rows from row {train.offset}[/]")
        train_controller(train, path, Path(ns.data_dir) if ns.data_dir else None, not ns.no_progress,
                         say=console.print)  # fmt: skip
        spec = spec.model_copy(update={"controller": str(path)})
    cal = calibrate(
        spec,
        runs,
        Path(ns.data_dir) if ns.data_dir else None,
        set(_pick(ns, GenerationConfig)),
        show_progress=not ns.no_progress,
        say=lambda text: console.print(f"[bold]{text}[/]"),
        memo=not ns.no_memo,
    )
    cal.save(out)
    scale = get_task(cal.task).scale(cal.metric)
    table = Table(title=f"calibration of {cal.task} on {len(cal.dev.ids)} dev rows ({cal.dev.file}), {cal.metric}")
    for col in ("setup", "models", "rows", cal.metric, f"minus {cal.anchor} [{cal.level:.1%}]", "s/sample", "cost", ""):
        table.add_column(col)
    fmt = lambda x: "n/a" if x is None else f"{x * scale:.1f}"  # noqa: E731
    for m in cal.scores:
        note = "anchor" if m.name == cal.anchor else (m.why_dropped or f"weight {m.weight:g}")
        cost = f"{m.seconds_per_sample:.2f}" if m.seconds_per_sample is not None else ""
        table.add_row("single", m.name, str(len(cal.dev.ids)), fmt(m.score), "", cost, "1.00" if m.name == cal.anchor
                      else "", note)  # fmt: skip
    picked = cal.chosen_trial()
    for t in cal.tried:
        d = t.versus_best
        diff = "" if d is None else f"{d[0] * scale:+.1f} [{d[1] * scale:+.1f}, {d[2] * scale:+.1f}]"
        chosen = t is picked
        cost = f"{t.seconds_per_sample:.2f}" if t.seconds_per_sample is not None else ""
        rel = f"{t.cost:.2f}x" if t.cost is not None else ""
        note = "[green]chosen[/]" if chosen else (f"[dim]out: {t.dropped}[/]" if t.dropped else "")
        table.add_row(t.label, "+".join(t.models), str(t.n), fmt(t.score), diff, cost, rel, note)
    console.print(table)
    console.print(f"anchor: {cal.anchor_reason}")
    console.print(f"chose: {cal.reason}")
    if not cal.decided:
        console.print(f"[yellow]note: {len(cal.dev.ids)} dev rows decide nothing; calibrate on more (--limit)[/]")
    if picked is not None and picked.versus_best is not None and picked.versus_best[1] <= 0:
        console.print(f"[yellow]note: its interval against {cal.anchor} alone includes 0: on {len(cal.dev.ids)} dev rows"
                      " the gain may be noise; more dev rows (--limit) would tell, --significant would not fuse[/]")  # fmt: skip
    if ns.plot:
        from .eval.report import plot_calibration

        plot_calibration(cal, ns.plot)
        console.print(f"wrote {ns.plot}")
    console.print(f"wrote {out}; use it: fuselm eval --task {cal.task} --calibration {out} --out DIR (on other rows)")
    print(json.dumps({"calibration": str(out), "method": cal.method, "models": cal.models,
                      "method_options": cal.method_options, "reason": cal.reason}, ensure_ascii=False))  # fmt: skip
    return 0


def cmd_train_controller(ns: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from .training.controller_train import ControllerTrainSpec, train_controller

    console = Console(stderr=True, width=None if sys.stderr.isatty() else 140)
    overrides = _pick(ns, ModelConfig)
    models = [_with_overrides(parse_model_ref(n.strip()), overrides) for n in ns.models.split(",") if n.strip()]
    opts = _options(ns.option)
    from .eval.tasks import get_task
    from .fusion.methods import method_options

    ns.task = get_task(ns.task).name  # a task file: its path, as calibrate records it
    method_options("adafuse", opts)  # a bad option: one line, before any model loads
    try:
        spec = ControllerTrainSpec(task=ns.task, models=models, data=ns.data, offset=ns.offset, limit=ns.limit,
                                   options=opts)  # fmt: skip
    except ValidationError as e:
        raise FuselmError(validation_message(e, "train-controller", flags=True)) from None
    info = train_controller(spec, ns.out, Path(ns.data_dir) if ns.data_dir else None, not ns.no_progress,
                            say=console.print)  # fmt: skip
    table = Table(title=f"choosing the right candidate, {info['held_out_rows']} held-out dev rows")
    table.add_column("rule")
    table.add_column("accuracy")
    for rule, acc in info["held_out_accuracy"].items():
        table.add_row(rule, "n/a" if acc is None else f"{acc:.3f}")
    console.print(table)
    console.print(f"controller saved to {ns.out} (use: fuselm generate --method adafuse --models {ns.models}"
                  f" -O controller={ns.out} ...)")  # fmt: skip
    print(json.dumps(info, ensure_ascii=False))
    return 0


def cmd_report(ns: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from .eval.report import by_task, load_run, overview, plot_quality_cost, report_rows, to_markdown

    runs = [load_run(p) for p in ns.runs]
    rows = report_rows(runs, [b for b in (ns.baseline or "").split(",") if b])
    console = Console(width=None if sys.stdout.isatty() else 160)
    tables = list(by_task(rows).items())
    if len(tables) > 1:
        tables.insert(0, ("main metric by task (* = partial run)", overview(rows)))
    for task, (header, body) in tables:
        table = Table(title=task)
        for col in header:
            table.add_column(col)
        for line in body:
            table.add_row(*line)
        console.print(table)
    if ns.md:
        with open(ns.md, "w", encoding="utf-8") as f:
            f.write(to_markdown(rows))
    if ns.plot:
        plot_quality_cost(runs, ns.plot)
    return 0


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    """One flag per scalar field of the router training config (lists and sections come from YAML)."""
    from .training.router_train import RouterTrainConfig

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


def cmd_train_router(ns: argparse.Namespace) -> int:
    from .training.router_train import RouterTrainConfig, RouterTrainer

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


def _add_limit_flags(p: argparse.ArgumentParser) -> None:
    """One flag per server limit (`request_timeout_s` is `--request-timeout SECONDS`)."""
    from .serve.config import Limits

    g = p.add_argument_group("limits")
    for name, f in Limits.model_fields.items():
        seconds = name.endswith("_s")
        flag = "--" + (name[:-2] if seconds else name).replace("_", "-")
        kind = f.annotation if f.annotation in (int, float) else str
        g.add_argument(flag, dest=f"limit_{name}", type=kind, default=argparse.SUPPRESS, metavar="S" if seconds else "N",
                       help=f"{f.description} (default {f.default})")  # fmt: skip


def cmd_serve(ns: argparse.Namespace) -> int:
    from .serve.config import ServeConfig

    data = load_yaml(ns.config) if ns.config else {}
    if ns.models or ns.calibration:  # one setup from the flags
        run = _run_config(ns, data={})
        default_id = run.models[0].name if run.method == "single" and len(run.models) == 1 else run.method
        if ns.calibration and not ns.id:
            default_id = Path(ns.calibration).stem
        setup = {"id": ns.id or Path(default_id).name, "replicas": ns.replicas, **run.model_dump(mode="json")}
        # each entry as given: its defaults written out would read as set (an engine entry refuses local fields)
        setup["models"] = [m.model_dump(mode="json", exclude_unset=True) for m in run.models]
        data["setups"] = [*(data.get("setups") or []), setup]
    elif not data.get("setups"):
        raise FuselmError("nothing to serve: give --models NAMES (and --method) or a --config with setups")
    for key in ("host", "port", "api_key"):
        if hasattr(ns, key):
            data[key] = getattr(ns, key)
    if "api_key" not in data and "FUSELM_API_KEY" in os.environ:
        if not os.environ["FUSELM_API_KEY"].strip():
            raise FuselmError("FUSELM_API_KEY is set but empty: give a key, or unset it to serve without one")
        data["api_key"] = os.environ["FUSELM_API_KEY"]
    limits = {k[len("limit_") :]: v for k, v in vars(ns).items() if k.startswith("limit_")}
    if limits:
        data["limits"] = {**(data.get("limits") or {}), **limits}
    try:
        cfg = ServeConfig(**data)
    except ValidationError as e:
        raise FuselmError(validation_message(e, ns.config or "options", ServeConfig)) from None
    from .fusion.methods import check_method

    for s in cfg.setups:  # before the server starts: a bad method or option is a one-line error here
        check_method(s.method, len(s.models), s.method_options)
    import uvicorn

    from .serve.app import build_app

    app = build_app(cfg)
    if not cfg.loopback() and not cfg.api_key:
        print(f"fuselm: warning: serving on {cfg.host}, reachable from other machines, without an API key: anyone"
              " who reaches it can generate (set --api-key or FUSELM_API_KEY)", file=sys.stderr, flush=True)  # fmt: skip
    where = f"http://{cfg.host}:{cfg.port}"
    print(f"fuselm: serving {', '.join(s.id for s in cfg.setups)} on {where} (loading models: {where}/ready "
          "says when they answer)", file=sys.stderr, flush=True)  # fmt: skip
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info" if ns.debug else "warning",
                timeout_graceful_shutdown=10)  # fmt: skip
    return 0


def cmd_models(ns: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from .models import assets
    from .models.catalog import BUNDLED

    table = Table(title="bundled models")
    for col in ("name", "arch", "vocab", "chat", "installed", "assembled", "converted", "extra"):
        table.add_column(col)
    yes = lambda b: "[green]yes[/]" if b else "[dim]no[/]"  # noqa: E731
    for m in BUNDLED.values():
        installed = m.installed()
        assembled = assets.assembled_path(m).is_file()
        table.add_row(
            m.name,
            m.architecture,
            f"{m.vocab_size:,}",
            yes(m.chat_template),
            yes(installed),
            yes(assembled),
            yes(assets.is_converted(m.name)),
            m.extra,
        )
    console = Console(width=None if sys.stdout.isatty() else 110)
    console.print(table)
    console.print(f"cache: {assets.cache_dir()} (set FUSELM_CACHE to move it)")
    return 0


def cmd_tasks(ns: argparse.Namespace) -> int:
    """The built-in tasks, then those of the given task files: a row each, in plain columns."""
    from .eval.taskfile import load_task_file
    from .eval.tasks import TASK_DIR, TASKS

    rows = [("name", "task", "type", "data", "metric", "description")]
    for name in TASKS.names():
        t = TASKS.get(name)
        rows.append((t.label, name, t.output_type, t.data_file or "", t.main_metric, t.description))
    for f in ns.files:
        t = load_task_file(f)
        data = os.path.relpath(t.data_file or "")  # under this directory: shorter
        rows.append((t.label, f, t.output_type, t.data_file if data.startswith("..") else data, t.main_metric,
                     t.description))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    # on stderr: the listing itself stays a table to read or parse
    print(
        f"the built-in tasks are the task files NAME.yaml in {TASK_DIR} (copy one to start your own)", file=sys.stderr
    )
    return 0


def cmd_generate(ns: argparse.Namespace) -> int:
    from .fusion.loop import decode
    from .fusion.methods import build_method
    from .models.loading import load_models

    prompt = ns.prompt
    if prompt == "-":
        prompt = sys.stdin.read()
    if not prompt:
        raise FuselmError("no prompt given")
    cfg = _run_config(ns)
    models = load_models(cfg.models)
    stream = None if ns.json else _stdout_stream
    method = build_method(cfg.method, models, cfg.method_options)
    try:
        result = decode(method, prompt, cfg.generation, on_text=stream)
    finally:
        method.close()
    if ns.html:
        from .viz import render_html

        with open(ns.html, "w", encoding="utf-8") as f:
            f.write(render_html(result, prompt))
    if ns.json:
        print(json.dumps(result.to_dict(), ensure_ascii=False))
    else:
        sys.stdout.write("\n")
        sys.stdout.flush()
    return 0


def _stdout_stream(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _quiet_libraries() -> None:
    import warnings

    # peft calls a transformers API deprecated in 5.x: a warning per model load, nothing for users to do
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.modeling_utils")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def cmd_lm_eval(args: list[str]) -> int:
    """lm-eval's command line, every argument its own, with the `fuselm` model registered."""
    try:
        from .eval.harness import run_cli
    except ImportError as e:
        if "lm_eval" not in str(e):
            raise
        print("fuselm: error: lm-evaluation-harness is not installed: pip install 'fuselm[lm-eval]'", file=sys.stderr)
        return 1
    return run_cli(args)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["lm-eval"]:  # lm-eval parses its own arguments (argparse would take their flags)
        try:
            return cmd_lm_eval(args[1:])
        except FuselmError as e:
            print(f"fuselm: error: {e}", file=sys.stderr)
            return 1
    parser = build_parser()
    ns = parser.parse_args(argv)
    if not ns.command:
        parser.print_help()
        return 2
    if not ns.debug:
        _quiet_libraries()
    else:
        import logging

        logging.basicConfig(level=logging.INFO)
    handlers = {
        "models": cmd_models,
        "tasks": cmd_tasks,
        "generate": cmd_generate,
        "eval": cmd_eval,
        "report": cmd_report,
        "train-router": cmd_train_router,
        "calibrate": cmd_calibrate,
        "train-controller": cmd_train_controller,
        "serve": cmd_serve,
    }
    try:
        return handlers[ns.command](ns)
    except FuselmError as e:
        if ns.debug:
            raise
        print(f"fuselm: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nfuselm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
