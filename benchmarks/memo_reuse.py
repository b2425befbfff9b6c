"""What the memo of single-model work (fuselm.eval.memo) saves: the wall time of the same
`fuselm` commands with the memo and with --no-memo, one after another in one fresh memo, on
this machine.

    python benchmarks/memo_reuse.py [--task examples/arc_easy.yaml] [--models smollm2-135m,qwen2.5-coder-0.5b]
        [--limit 50] [--out /tmp/memo-bench]

Multiple choice (the task file's test rows): each member alone, then `product` over both read
from the memo, then the same `product` with --no-memo; then `fuselm calibrate` on the dev rows
twice into two run directories (the second after the first has filled the memo), and the second
once more with --no-memo. Wall times include starting Python and importing fuselm (a few
seconds each): what a user waits for.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def timed(args: list[str], env: dict[str, str]) -> tuple[float, dict]:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "fuselm.cli", *args], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"fuselm {' '.join(args)} failed:\n{r.stderr}")
    return wall, json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="examples/arc_easy.yaml")
    ap.add_argument("--models", default="smollm2-135m,qwen2.5-coder-0.5b")
    ap.add_argument("--limit", type=int, default=50)
    ap.add_argument("--out", default="/tmp/memo-bench")
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = {**os.environ, "FUSELM_MEMO": str(out / "memo.sqlite3")}
    common = ["--task", args.task, "--limit", str(args.limit), "--no-progress"]
    lines = []

    def row(what: str, cmd: list[str]) -> None:
        wall, result = timed(cmd, env)
        memo = result.get("memo_rows", "") if isinstance(result, dict) else ""
        lines.append(f"| {what} | {wall:.1f} | {memo} |")
        print(lines[-1], flush=True)

    print("| command | wall s | rows from the memo |\n|---|---|---|")
    for i, model in enumerate(args.models.split(",")):
        row(f"eval single {model}", ["eval", *common, "--models", model, "--out", str(out / f"alone{i}")])
    product = ["eval", *common, "--models", args.models, "--method", "product"]
    row("eval product, memo", [*product, "--out", str(out / "product")])
    row("eval product, --no-memo", [*product, "--out", str(out / "product-plain"), "--no-memo"])
    calibrate = ["calibrate", *common, "--models", args.models, "--block-rows", str(args.limit), "--min-rows", "1"]
    row("calibrate, first", [*calibrate, "--out", str(out / "first.yaml")])
    row("calibrate again, other runs dir, memo", [*calibrate, "--out", str(out / "second.yaml")])
    row("calibrate again, other runs dir, --no-memo", [*calibrate, "--out", str(out / "third.yaml"), "--no-memo"])


if __name__ == "__main__":
    main()
