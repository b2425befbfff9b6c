"""`fuselm calibrate`: choose on dev rows how to fuse an ensemble on a task; the choice shown as a
table and written as a calibration file."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydantic import ValidationError

from ..config import GenerationConfig, ModelConfig, validation_message
from ..errors import FuselmError
from .flags import DATA_DIR_HELP, MEMO_HELP, SPECIAL_FIELDS, add_model_flags, floats, given_models, picked, task_list


def add_parser(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("calibrate", help="choose, on dev rows, how to fuse an ensemble on a task (resumable)")
    c.add_argument("--task", required=True, help=f"task: {task_list()}")
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
    c.add_argument("--data-dir", help=DATA_DIR_HELP)
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    c.add_argument("--no-memo", action="store_true", help=MEMO_HELP)
    add_model_flags(c, GenerationConfig, skip=SPECIAL_FIELDS | {"stop"})
    add_model_flags(c, ModelConfig, skip=SPECIAL_FIELDS)


def run(ns: argparse.Namespace) -> int:
    from rich.console import Console

    from ..eval.calibrate import CalibrateSpec
    from ..eval.tasks import get_task
    from ..training.controller_train import calibrate_with_controller

    console = Console(stderr=True, width=None if sys.stderr.isatty() else 140)
    try:
        spec = CalibrateSpec(
            task=ns.task, models=given_models(ns), dev_data=ns.dev_data, offset=ns.offset, limit=ns.limit,
            thetas=floats(ns.thetas, "--thetas"), margins=floats(ns.margins, "--margins"), max_gap=ns.max_gap,
            generation=GenerationConfig(**picked(ns, GenerationConfig)), controller=ns.controller,
            significant=ns.significant, max_loss=ns.max_loss, anchor_by=ns.anchor_by, block_rows=ns.block_rows,
            budget_minutes=ns.budget_minutes, max_cost=ns.max_cost, min_rows=ns.min_rows,
        )  # fmt: skip
    except ValidationError as e:
        raise FuselmError(validation_message(e, "calibrate", flags=True)) from None
    spec = spec.model_copy(update={"task": get_task(ns.task).name})  # unknown: fail now; a file: its path
    out = Path(ns.out)
    cal = calibrate_with_controller(
        spec,
        out,
        Path(ns.runs) if ns.runs else out.with_suffix(".runs"),
        controller_rows=ns.controller_rows,
        data_dir=Path(ns.data_dir) if ns.data_dir else None,
        explicit_generation=set(picked(ns, GenerationConfig)),
        show_progress=not ns.no_progress,
        say=lambda text: console.print(f"[bold]{text}[/]"),
        memo=not ns.no_memo,
    )
    _show(cal, console)
    if ns.plot:
        from ..eval.report import plot_calibration

        plot_calibration(cal, ns.plot)
        console.print(f"wrote {ns.plot}")
    console.print(f"wrote {out}; use it: fuselm eval --task {cal.task} --calibration {out} --out DIR (on other rows)")
    print(json.dumps({"calibration": str(out), "method": cal.method, "models": cal.models,
                      "method_options": cal.method_options, "reason": cal.reason}, ensure_ascii=False))  # fmt: skip
    return 0


def _show(cal, console) -> None:
    """What was tried, each setup's dev score against the anchor's, and why this choice."""
    from rich.table import Table

    from ..eval.tasks import get_task

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
    picked_trial = cal.chosen_trial()
    for t in cal.tried:
        d = t.versus_best
        diff = "" if d is None else f"{d[0] * scale:+.1f} [{d[1] * scale:+.1f}, {d[2] * scale:+.1f}]"
        chosen = t is picked_trial
        cost = f"{t.seconds_per_sample:.2f}" if t.seconds_per_sample is not None else ""
        rel = f"{t.cost:.2f}x" if t.cost is not None else ""
        note = "[green]chosen[/]" if chosen else (f"[dim]out: {t.dropped}[/]" if t.dropped else "")
        table.add_row(t.label, "+".join(t.models), str(t.n), fmt(t.score), diff, cost, rel, note)
    console.print(table)
    console.print(f"anchor: {cal.anchor_reason}")
    console.print(f"chose: {cal.reason}")
    if not cal.decided:
        console.print(f"[yellow]note: {len(cal.dev.ids)} dev rows decide nothing; calibrate on more (--limit)[/]")
    if picked_trial is not None and picked_trial.versus_best is not None and picked_trial.versus_best[1] <= 0:
        console.print(f"[yellow]note: its interval against {cal.anchor} alone includes 0: on {len(cal.dev.ids)} dev"
                      " rows the gain may be noise; more dev rows (--limit) would tell, --significant would not fuse[/]")  # fmt: skip
