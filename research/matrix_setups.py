"""The results matrix's setups (docs/results.md): tasks with their row limits, the methods and
models run on each, the `fuselm eval` jobs they make; and the worker pool the matrix scripts
share (one CPU per worker). Imported by results_matrix.py, results_doc.py and
never_worse_matrix.py; run none of it directly.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

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


def failed(failures: list[str], root: Path) -> int:
    """The exit status of a matrix run, saying which steps failed (their logs are under `root`)."""
    if failures:
        print(f"failed: {', '.join(failures)} (see their logs under {root})", file=sys.stderr)
    return 1 if failures else 0
