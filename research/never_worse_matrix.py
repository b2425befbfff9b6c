"""The never-worse evaluation of docs/results.md: per ensemble and task, calibrate on dev rows,
then evaluate on test rows no calibration used, resumable.

    python research/never_worse_matrix.py --list                       # the commands, in order
    python research/never_worse_matrix.py --status                     # how far each chain has come
    python research/never_worse_matrix.py --workers 2                  # run them (one CPU each)
    python research/never_worse_matrix.py --ensembles default --tasks nq,triviaqa

Each (ensemble, task) is one chain, run in order by one worker: `fuselm calibrate` into
``runs/never-worse/ENSEMBLE/TASK/calib.yaml`` (with `--controller-rows`: a learned controller
trained on the dev rows after the calibration's, tried in its grid), then `fuselm eval` of every
member alone, of the calibrated setup (`--calibration`: first, the never-worse claim rests on
it), of `token-average` equal and gated by the calibration's anchor (ensembles of one
vocabulary), of anchored AdaFuse (the calibration's
anchor, default theta and margin), of today's `adafuse`, of `adafuse` with the
calibration's controller (`-O controller=`), and of what the same dev runs choose without the
calibration's loss bound (`calib.no-bound.yaml`, `--max-loss inf`; right after the calibrated
run where no other step runs that setup, else last and copied). Finished runs are skipped and interrupted ones go
on where they stopped (calibrate and eval are both resumable), so the script can be stopped and
started at any time. A test run whose setup no longer matches (a calibration made again chose
otherwise) is moved aside to NAME.superseded/ and run again; a step with the setup of a finished
earlier step (the calibration chose the controller) copies that run (greedy: the same rows). Workers are pinned to their own
CPU with ``taskset``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import yaml
from matrix_setups import failed, run_workers  # this folder

from fuselm.eval.records import absolute_paths
from fuselm.eval.rundir import other_setup, run_setup, set_aside

ENSEMBLES = {
    "default": ["smollm2-135m", "qwen2.5-coder-0.5b"],  # a weak and a stronger member, two tokenizers
    "gemma-qwen": ["gemma3-270m", "qwen2.5-coder-1.5b"],  # close on TriviaQA, two tokenizers
    "qwens": ["qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"],  # one tokenizer
}
ONE_VOCABULARY = {"qwens"}  # token-average runs beside adafuse
# Test rows (the first N of the task's test file) and dev rows (file, offset, limit): dev rows
# come from a dev/train split, or, where a task has none, from its test file after the test rows.
TASKS = {
    "nq": (200, None, 0, 50),
    "triviaqa": (200, None, 0, 50),
    "squad": (200, "squad/test_0-999.jsonl", 200, 50),
    "gsm8k": (100, None, 0, 30),
    # FLORES: rows 100-189 for calibration, 190-369 for its controller (30 and 60 until 2026-12-06:
    # chrF on 30 sentences did not separate the controller's gains from noise)
    "flores-en-de": (100, "flores/eng2deu_0-399.jsonl", 100, 90),
    "flores-de-en": (100, "flores/deu2eng_0-399.jsonl", 100, 90),
    "flores-en-ro": (100, "flores/eng2ron_0-399.jsonl", 100, 90),
    "humaneval": (82, "test", 82, 30),  # problems 0-81 tested, 82-111 for calibration (its own test file)
}


def chain(root: Path, ensemble: str, task: str) -> list[tuple[str, list[str]]]:
    """The commands of one (ensemble, task), in order; `{anchor}` is filled from the calibration."""
    models = ENSEMBLES[ensemble]
    n_test, dev, offset, n_dev = TASKS[task]
    where = root / ensemble / task
    calib = where / "calib.yaml"
    # calibrate --controller-rows writes it; absolute, as the calibration records it: an eval run
    # records its -O options as given, and resumes only with the same spelling
    ctrl = (where / "calib.controller.json").resolve()
    cal = ["fuselm", "calibrate", "--task", task, "--models", ",".join(models), "--limit", str(n_dev),
           "--controller-rows", str(2 * n_dev), "--out", str(calib)]  # fmt: skip
    if dev:
        cal += ["--dev-data", dev, "--offset", str(offset)]
    out = [("calibrate", cal)]
    # the same dev runs chosen from without the loss bound (`--max-loss inf`, the rule before
    # 2026-12-06): its test run shows what the bound saved or cost on rows it did not see
    unbounded = [*cal[: cal.index("--controller-rows")], "--controller", str(ctrl), "--runs",
                 str(calib.with_suffix(".runs")), "--max-loss", "inf", "--out", str(where / "calib.no-bound.yaml")]  # fmt: skip
    if dev:
        unbounded += ["--dev-data", dev, "--offset", str(offset)]
    out.append(("calibrate-no-bound", unbounded))
    test = ["fuselm", "eval", "--task", task, "--limit", str(n_test)]
    for m in models:
        out.append((f"single-{m}", [*test, "--model", m, "--out", str(where / f"single-{m}")]))
    # what the calibration chose first: the never-worse claim needs it; then the hand policies
    out.append(("calibrated", [*test, "--calibration", str(calib), "--out", str(where / "calibrated")]))
    if ensemble in ONE_VOCABULARY:
        out.append(("token-average", [*test, "--method", "token-average", "--models", ",".join(models), "--out",
                                      str(where / "token-average")]))  # fmt: skip
        # gated by the calibration's anchor (GaC), default theta
        out.append(("token-average-gated", [*test, "--method", "token-average", "--models", ",".join(models), "-O",
                                            "policy=anchored", "-O", "anchor={anchor}", "--out",
                                            str(where / "token-average-gated")]))  # fmt: skip
    out.append(("anchored", [*test, "--method", "adafuse", "--models", ",".join(models), "-O", "policy=anchored",
                             "-O", "anchor={anchor}", "--out", str(where / "anchored")]))  # fmt: skip
    out.append(
        ("adafuse", [*test, "--method", "adafuse", "--models", ",".join(models), "--out", str(where / "adafuse")])
    )
    # the calibration's controller (trained on twice its dev rows, after them) over today's adafuse
    out.append(("controller", [*test, "--method", "adafuse", "--models", ",".join(models), "-O",
                               f"controller={ctrl}", "--out", str(where / "controller")]))  # fmt: skip
    # moved after `calibrated` once the calibrations exist (no_bound_early), unless a step runs its setup
    out.append(("calibrated-no-bound", [*test, "--calibration", str(where / "calib.no-bound.yaml"), "--out",
                                        str(where / "calibrated-no-bound")]))  # fmt: skip
    return out


def set_aside_other_rows(where: Path, n_dev: int) -> list[str]:
    """A calibration made on another number of dev rows than TASKS asks for now: its files go to
    `calib.N-rows.*` (kept for comparison), and so do the runs of its controller, test and dev
    (trained again on other rows into the same file name). Its other dev runs stay: the same
    command with a larger --limit extends them."""
    calib = where / "calib.yaml"
    if not calib.is_file():
        return []
    had = yaml.safe_load(calib.read_text())["dev"]["limit"]
    if had == n_dev:
        return []
    tag = f"{had}-rows"
    moved = []
    for f in (where / "calib.no-bound.yaml", where / "calib.controller.json", calib):  # calib.yaml last
        if f.is_file():
            moved.append(str(f.rename(f.with_name(f"{f.stem}.{tag}{f.suffix}"))))
    runs = [d for d in where.iterdir() if d.is_dir()] + [d for d in (where / "calib.runs").glob("*") if d.is_dir()]
    for run in runs:
        if run.name.endswith((".superseded", "-rows")):  # set aside before
            continue
        setup = run_setup(run)
        if setup is not None and "controller" in setup.options:
            moved.append(str(run.rename(run.with_name(f"{run.name}.{tag}"))))
    return moved


def progress(args: list[str]) -> str:
    """How far one step has come, from its files: `done`, `rows/N`, or `-` (not started)."""
    out = Path(args[args.index("--out") + 1])
    if args[1] == "calibrate":
        if out.is_file():
            return "done"
        runs = out.with_suffix(".runs")
        examples = out.with_suffix(".controller.examples") / "examples.jsonl"
        parts = [f"controller examples {_lines(examples)}"] if examples.is_file() else []
        if runs.is_dir():
            parts.append(f"{sum(1 for d in runs.iterdir() if d.is_dir())} dev runs")
        return "(" + ", ".join(parts) + ")" if parts else "-"
    n = int(args[args.index("--limit") + 1])
    rows = _lines(out / "rows.jsonl")
    return "done" if rows >= n else f"{rows}/{n}" if rows else "-"


def _lines(path: Path) -> int:
    return sum(1 for line in path.open() if line.strip()) if path.is_file() else 0


def _asked(args: list[str]) -> tuple[str, list[str], dict]:
    """(method, model names, method options) that an eval command line asks for."""
    if "--calibration" in args:
        cal = yaml.safe_load(Path(args[args.index("--calibration") + 1]).read_text())
        return cal["method"], cal["models"], cal["method_options"]
    flag = "--models" if "--models" in args else "--model"
    method = args[args.index("--method") + 1] if "--method" in args else "single"
    opts = dict(args[i + 1].split("=", 1) for i, a in enumerate(args) if a == "-O")
    return method, args[args.index(flag) + 1].split(","), {k: yaml.safe_load(v) for k, v in opts.items()}


def _setup(args: list[str]) -> tuple[str, list[str], dict]:
    """What `_asked` says, with file options as a run records them (absolute: the same file
    spelled otherwise, e.g. under a relative --root, is the same setup)."""
    method, models, options = _asked(args)
    return method, models, absolute_paths(options)


def set_aside_if_stale(args: list[str]) -> str | None:
    """Move an eval run aside when it holds another setup than `args` asks for now (the
    calibration was made again and chose otherwise, or its controller was trained again): a
    resumed run must keep its config."""
    run = Path(args[args.index("--out") + 1]) if args[:2] == ["fuselm", "eval"] else None
    if run is None or other_setup(run, *_setup(args)) is None:
        return None
    return str(set_aside(run))


def same_as_done(args: list[str], earlier: list[list[str]]) -> Path | None:
    """A finished run of an earlier step of the chain with the very setup `args` asks for (the
    calibration chose the controller, say): greedy decoding gives the same rows, so it is copied."""
    from fuselm.eval.report import load_run

    if args[:2] != ["fuselm", "eval"] or (Path(args[args.index("--out") + 1]) / "config.json").exists():
        return None
    for other in earlier:
        run = Path(other[other.index("--out") + 1])
        if other[:2] == ["fuselm", "eval"] and (run / "summary.json").is_file() and _setup(other) == _setup(args):
            if load_run(run).summary.complete:
                return run
    return None


def no_bound_early(steps: list[tuple[str, list[str]]], where: Path) -> list[tuple[str, list[str]]]:
    """The steps after `calibrated`, with `calibrated-no-bound` first where no other step runs its
    setup: it is the test of the loss bound on rows neither calibration saw, worth having before
    the hand policies (where another step runs the same setup it stays last and is copied)."""
    names = [name for name, _ in steps]
    if "calibrated-no-bound" not in names or not (where / "calib.no-bound.yaml").is_file():
        return steps
    late = steps[names.index("calibrated-no-bound")]
    rest = [s for s in steps if s is not late]
    mine = _setup(fill(late[1], where / "calib.yaml"))
    if any(args[:2] == ["fuselm", "eval"] and _setup(fill(args, where / "calib.yaml")) == mine for _, args in rest):
        return steps
    return [late, *rest]


def fill(args: list[str], calib: Path) -> list[str]:
    if not any("{anchor}" in a for a in args):
        return args
    anchor = yaml.safe_load(calib.read_text())["anchor"]
    return [a.format(anchor=anchor) if "{" in a else a for a in args]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="runs/never-worse")
    ap.add_argument("--ensembles", default=",".join(ENSEMBLES))
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma-separated tasks, in priority order")
    ap.add_argument(
        "--data-dir",
        default=os.environ.get("FUSELM_DATA") or str(Path(__file__).resolve().parents[2] / "shared" / "data"),
        help="benchmark files, passed to the runs as $FUSELM_DATA (default: $FUSELM_DATA, else ../shared/data)",
    )
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--list", action="store_true", help="print the commands and exit")
    ap.add_argument("--status", action="store_true", help="print how far each chain has come and exit")
    ns = ap.parse_args()
    ensembles, tasks = ns.ensembles.split(","), ns.tasks.split(",")
    for names, known in ((ensembles, ENSEMBLES), (tasks, TASKS)):
        bad = [x for x in names if x not in known]
        if bad:
            ap.error(f"unknown: {', '.join(bad)} (known: {', '.join(known)})")
    root = Path(ns.root)
    chains = [(e, t, chain(root, e, t)) for t in tasks for e in ensembles]
    if ns.list:
        for _, _, steps in chains:
            for _, args in steps:
                print(shlex.join(args))
        return 0
    if ns.status:
        record = Path(__file__).resolve().parents[1] / "docs" / "never-worse.json"
        archived = json.loads(record.read_text()) if record.is_file() else {}
        for ensemble, task, steps in chains:
            done = [progress(args) for _, args in steps]
            line = ", ".join(f"{name} {d}" for (name, _), d in zip(steps, done))
            if all(d == "-" for d in done) and f"{ensemble}/{task}" in archived:
                line = "no runs here; its tables are kept in docs/never-worse.json"
            print(f"{ensemble}/{task}: {line}")
        return 0
    env = {**os.environ, "FUSELM_DATA": ns.data_dir}
    lock = threading.Lock()
    failures: list[str] = []
    pin = ns.workers > 1 and shutil.which("taskset") is not None

    def worker(cpu: int) -> None:
        # the CPU it is pinned to, or those it may use (one worker under an outer `taskset -c 1`)
        tag = f"cpu {cpu}" if pin else f"cpus {','.join(map(str, sorted(os.sched_getaffinity(0))))}"
        while True:
            with lock:
                if not chains:
                    return
                ensemble, task, steps = chains.pop(0)
            where = root / ensemble / task
            where.mkdir(parents=True, exist_ok=True)
            for path in set_aside_other_rows(where, TASKS[task][3]):
                print(f"[{tag}] {ensemble}/{task}: calibrated on other rows than TASKS says: moved to {path}\n", end="")
            done: list[list[str]] = []
            while steps:
                name, args = steps.pop(0)
                if name == "calibrated":  # both calibrations are made by now
                    steps = no_bound_early(steps, where)
                cmd = (
                    (["taskset", "-c", str(cpu)] if pin else []) + fill(args, where / "calib.yaml") + ["--no-progress"]
                )
                print(f"[{tag}] {ensemble}/{task}: {name}\n", end="", flush=True)
                line = cmd[cmd.index("fuselm") :]
                aside = set_aside_if_stale(line)
                if aside:
                    print(f"[{tag}] {ensemble}/{task}: {name} held another setup: moved to {aside}\n", end="")
                same = same_as_done(line, done)
                done.append(line)
                if same is not None:
                    shutil.copytree(same, line[line.index("--out") + 1])
                    print(f"[{tag}] {ensemble}/{task}: {name} is the setup of {same.name}: copied\n", end="")
                    continue
                with open(where / f"{name}.log", "a") as log:
                    rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
                if rc != 0:
                    print(f"[{tag}] FAILED ({rc}) {ensemble}/{task}: {name}\n", end="", flush=True)
                    failures.append(f"{ensemble}/{task}/{name}")
                    break  # the rest of the chain needs this step

    run_workers(ns.workers, worker)
    return failed(failures, root)


if __name__ == "__main__":
    sys.exit(main())
