"""Run a benchmark on two revisions of fuselm, alternately, on this machine: the numbers of a
refactor's before and after, taken in one sitting so that machine drift hits both alike.

    python benchmarks/ab_revisions.py --before 3672a82 --rounds 2 -- fusion_speed.py --tokens 32 --prompts 2

The other revision is checked out once into a git worktree (default: ../fuselm-ab-REV) and run
with its own source on PYTHONPATH and its own copy of the benchmark; the working tree is the
"after". Each run's stdout (the benchmark's Markdown table) is printed under a heading that
says which revision and round it is.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worktree(rev: str, where: Path | None) -> Path:
    path = where or ROOT.parent / f"fuselm-ab-{rev}"
    if not (path / "src" / "fuselm").is_dir():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), rev], check=True)
    return path


def run(tree: Path, script: str, args: list[str], env: dict[str, str]) -> str:
    env = {**env, "PYTHONPATH": str(tree / "src")}
    proc = subprocess.run(
        [sys.executable, str(tree / "benchmarks" / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{tree}: {script} failed:\n{proc.stderr[-2000:]}")
    return proc.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="git revision to compare the working tree with")
    ap.add_argument("--worktree", type=Path, help="where to check it out")
    ap.add_argument("--rounds", type=int, default=2, help="before/after pairs, alternating")
    ap.add_argument("benchmark", nargs=argparse.REMAINDER, help="-- SCRIPT.py [its arguments]")
    a = ap.parse_args()
    bench = [x for x in a.benchmark if x != "--"]
    if not bench:
        ap.error("give the benchmark: -- SCRIPT.py [arguments]")
    before = worktree(a.before, a.worktree)
    env = dict(os.environ)
    for r in range(1, a.rounds + 1):
        for label, tree in (("before", before), ("after", ROOT)):
            out = run(tree, bench[0], bench[1:], env)
            print(f"### {label} ({a.before if label == 'before' else 'working tree'}), round {r}\n\n{out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
