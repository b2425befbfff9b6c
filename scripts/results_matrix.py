"""Run the evaluation matrix of docs/results.md: every task x every method, resumable.

    python scripts/results_matrix.py --list              # the fuselm commands, in order
    python scripts/results_matrix.py --workers 2         # run them (two processes, one CPU each)
    python scripts/results_matrix.py --tasks nq,squad --methods adafuse

Each job is one ``fuselm eval`` run into ``runs/results/TASK-METHOD`` (its log beside it).
Finished runs are skipped and interrupted ones continue where they stopped, so the script can
be stopped and started again at any time. With ``--workers N`` (N > 1) each worker is pinned
to its own CPU with ``taskset``: on a 2-core machine two single-threaded runs get more done
than one run on two threads, since small decode batches do not split well across threads.
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

# Rows per task (the evaluation issue's sizes); None = all rows.
TASKS = {
    "nq": 200,
    "triviaqa": 200,
    "squad": 200,
    "gsm8k": 100,
    "flores-en-de": 100,
    "flores-de-en": 100,
    "flores-en-ro": 100,
    "humaneval": None,
}
SINGLES = ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]
ENSEMBLE = "smollm2-135m,qwen2.5-coder-0.5b"  # the default ensemble (README)
QWENS = "qwen2.5-coder-1.5b,qwen2.5-coder-0.5b"  # one vocabulary: token-level methods
ROUTER = "runs/router-qwen-long/router"  # docs/results.md: the router of configs/router-qwen-long.yaml
METHODS: dict[str, list[str]] = {
    **{name: ["--model", name] for name in SINGLES},
    "token-average": ["--method", "token-average", "--models", QWENS],
    "unite": ["--method", "unite", "--models", ENSEMBLE],
    "fixed-span": ["--method", "fixed-span", "--models", ENSEMBLE],
    "adafuse": ["--method", "adafuse", "--models", ENSEMBLE],
    # FusionRoute needs a trained router: `fuselm train-router --config configs/router-qwen-long.yaml`.
    "fusionroute": ["--method", "fusionroute", "--router", "{router}", "--models", QWENS],
    "expert-route": ["--method", "expert-route", "--router", "{router}", "--models", QWENS],
}
# The FusionRoute issue's evaluation: its methods run on these tasks only.
ONLY_ON = {m: {"nq", "triviaqa", "gsm8k", "humaneval"} for m in ("fusionroute", "expert-route")}


def jobs(
    root: Path, tasks: list[str], methods: list[str], router: str = ROUTER, limits: dict[str, int] | None = None
) -> list[tuple[str, list[str], int | None]]:
    out = []
    for task in tasks:
        for method in methods:
            if task not in ONLY_ON.get(method, {task}):
                continue
            limit = (limits or {}).get(task, TASKS[task])
            args = ["fuselm", "eval", "--task", task, *(a.format(router=router) for a in METHODS[method])]
            if limit is not None:
                args += ["--limit", str(limit)]
            args += ["--out", str(root / f"{task}-{method}")]
            out.append((f"{task}-{method}", args, limit))
    return out


def run_workers(n: int, worker) -> None:
    """`worker(cpu)` on n threads, one per CPU index, until all return (shared with never_worse_matrix)."""
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def finished(run: Path, limit: int | None) -> bool:
    """Complete at this limit (a run made with a smaller one is extended: `fuselm eval` keeps its rows)."""
    summary, config = run / "summary.json", run / "config.json"
    if not (summary.is_file() and config.is_file() and json.loads(summary.read_text()).get("complete")):
        return False
    return json.loads(config.read_text())["spec"].get("limit") == limit


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="runs/results", help="directory for the run directories")
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma-separated tasks, in priority order")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods/models")
    ap.add_argument("--router", default=ROUTER, help="trained router for fusionroute / expert-route")
    ap.add_argument("--limits", default="", help="rows per task instead of the defaults, e.g. gsm8k=50,humaneval=82")
    ap.add_argument(
        "--data-dir",
        default=os.environ.get("FUSELM_DATA") or str(Path(__file__).resolve().parents[2] / "shared" / "data"),
        help="benchmark files, passed to the runs as $FUSELM_DATA (default: $FUSELM_DATA, else ../shared/data "
        "beside the checkout)",
    )
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--list", action="store_true", help="print the commands and exit")
    ns = ap.parse_args()
    tasks, methods = ns.tasks.split(","), ns.methods.split(",")
    for name, known in ((tasks, TASKS), (methods, METHODS)):
        bad = [x for x in name if x not in known]
        if bad:
            ap.error(f"unknown: {', '.join(bad)} (known: {', '.join(known)})")
    limits = {}
    for item in filter(None, ns.limits.split(",")):
        task, _, n = item.partition("=")
        if task not in TASKS or not n.isdigit() or int(n) < 1:
            ap.error(f"--limits takes TASK=N pairs with known tasks, got {item!r}")
        limits[task] = int(n)
    root = Path(ns.root)
    todo = jobs(root, tasks, methods, ns.router, limits)
    if ns.list:
        for _, args, _ in todo:
            print(shlex.join(args))
        return 0
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "FUSELM_DATA": ns.data_dir}
    pending = [j for j in todo if not finished(root / j[0], j[2])]
    print(f"{len(todo) - len(pending)} of {len(todo)} runs finished; {len(pending)} to go", flush=True)
    lock = threading.Lock()
    failures: list[str] = []
    pin = ns.workers > 1 and shutil.which("taskset") is not None

    def worker(cpu: int) -> None:
        while True:
            with lock:
                if not pending:
                    return
                name, args, _ = pending.pop(0)
            cmd = (["taskset", "-c", str(cpu)] if pin else []) + args + ["--no-progress"]
            print(f"[cpu {cpu}] start {name}\n", end="", flush=True)
            with open(root / f"{name}.log", "a") as log:
                rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            print(f"[cpu {cpu}] {'done' if rc == 0 else f'FAILED ({rc})'} {name}\n", end="", flush=True)
            if rc != 0:
                failures.append(name)

    run_workers(ns.workers, worker)
    if failures:
        print(f"failed: {', '.join(failures)} (see their logs under {root})", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
