"""The frozen-rule protocol's setups (issue 39): the ensembles, each task's unseen test rows and
dev rows, the chains' order, where each run lives and the commands of one chain. Imported by
protocol.py (which runs them) and protocol_table.py (which reads them).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

ENSEMBLES = {
    "default": ["smollm2-135m", "qwen2.5-coder-0.5b"],  # a weak and a stronger member, two tokenizers
    "gemma-qwen": ["gemma3-270m", "qwen2.5-coder-1.5b"],  # close on TriviaQA, two tokenizers
    "qwens": ["qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"],  # one tokenizer
}


@dataclass(frozen=True)
class Rows:
    test_offset: int  # test rows: the task's test file from here ...
    test_limit: int  # ... this many (none of them in an earlier table)
    dev: tuple[str, ...] = ()  # calibrate's dev rows: its defaults, or these flags


# Unseen test rows: NQ and TriviaQA 200-999, SQuAD 350-999, GSM8K 100-499 (earlier tables used the
# rows before these). SQuAD has no dev split: its test rows 200-349, which no earlier table tested
# on, are its dev rows (the calibration's race stops at 150 there).
TASKS = {
    "triviaqa": Rows(200, 800),
    "nq": Rows(200, 800),
    "squad": Rows(350, 650, ("--dev-data", "test", "--offset", "200", "--limit", "150")),
    "gsm8k": Rows(100, 400),
}
# cheap chains first: each one finished is a result
ORDER = [
    "default/triviaqa", "default/nq", "qwens/triviaqa", "gemma-qwen/triviaqa", "qwens/nq", "gemma-qwen/nq",
    "default/squad", "default/gsm8k", "qwens/squad", "gemma-qwen/squad", "qwens/gsm8k", "gemma-qwen/gsm8k",
]  # fmt: skip


def calib_path(root: Path, chain: str) -> Path:
    return root / "calib" / f"{chain.replace('/', '-')}.yaml"


def member_run(root: Path, task: str, model: str) -> Path:
    return root / "members" / task / model  # shared by every ensemble with this member


def calibrated_run(root: Path, chain: str) -> Path:
    return root / chain / "calibrated"


def steps(root: Path, chain: str) -> list[tuple[str, Path, list[str]]]:
    """(name, what it writes, command) of one chain, in order."""
    ensemble, task = chain.split("/")
    rows = TASKS[task]
    fuselm = [sys.executable, "-m", "fuselm.cli"]
    common = ["--threads", "1", "--data-dir", "../shared/data", "--no-progress"]
    calib = calib_path(root, chain)
    out = [("calibrate", calib, [*fuselm, "calibrate", "--task", task, "--models", ",".join(ENSEMBLES[ensemble]),
                                 *rows.dev, *common, "--out", str(calib)])]  # fmt: skip
    test = [
        *fuselm,
        "eval",
        "--task",
        task,
        "--offset",
        str(rows.test_offset),
        "--limit",
        str(rows.test_limit),
        *common,
    ]
    for m in ENSEMBLES[ensemble]:
        run = member_run(root, task, m)
        out.append((f"single {m}", run, [*test, "--model", m, "--out", str(run)]))
    run = calibrated_run(root, chain)
    out.append(("calibrated", run, [*test, "--calibration", str(calib), "--out", str(run)]))
    return out


def done(path: Path) -> bool:
    if path.suffix == ".yaml":
        return path.is_file()
    summary = path / "summary.json"
    return summary.is_file() and bool(json.loads(summary.read_text()).get("complete"))
