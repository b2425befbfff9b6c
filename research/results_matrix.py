"""Run the evaluation matrix of docs/results.md: every task x every method, resumable.

    python research/results_matrix.py --list              # the fuselm commands, in order
    python research/results_matrix.py --workers 2         # run them (two processes, one CPU each)
    python research/results_matrix.py --tasks nq,squad --methods adafuse

Each job is one ``fuselm eval`` run into ``runs/results/TASK-METHOD`` (its log beside it).
Finished runs are skipped and interrupted ones continue where they stopped, so the script can
be stopped and started again at any time. With ``--workers N`` (N > 1) each worker is pinned
to its own CPU with ``taskset``: on a 2-core machine two single-threaded runs get more done
than one run on two threads, since small decode batches do not split well across threads.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import threading
from pathlib import Path

# Rows per task (the evaluation issue's sizes); None = all rows.
from matrix_setups import METHODS, ROUTER, TASKS, failed, finished, jobs, run_workers  # this folder


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
    return failed(failures, root)


if __name__ == "__main__":
    sys.exit(main())
