"""The never-worse protocol with the rules frozen (issue 39): per ensemble and task, `fuselm
calibrate` as the README runs it (the race, defaults) on dev rows, then each member alone and the
calibrated choice on test rows that no earlier table used. Resumable: every step is a resumable
fuselm command, so stop it at any time and run it again.

    python research/protocol.py --list                  # the commands, in order
    python research/protocol.py --status                # how far each chain has come
    python research/protocol.py --workers 2             # run them (one CPU each, taskset)
    python research/protocol.py --chains default/triviaqa,qwens/nq
    python research/protocol_table.py                   # the tables (docs/results.md)

Run it from the checkout's root, with ../shared/data beside it. The rules are those of the commit the runs were made with: run this from a worktree checked out
at that commit (``PYTHONPATH=WORKTREE/src``); each calibration file records fuselm's version.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

from protocol_setups import ORDER, done, steps  # this folder


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="runs/protocol2", type=Path)
    ap.add_argument("--chains", default=",".join(ORDER), help="ENSEMBLE/TASK, comma-separated, in order")
    ap.add_argument("--workers", type=int, default=1, help="chains at once, each on a CPU of its own")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--status", action="store_true")
    ns = ap.parse_args()
    chains = ns.chains.split(",")
    unknown = [c for c in chains if c not in ORDER]
    if unknown:
        ap.error(f"unknown chains {unknown}; known: {', '.join(ORDER)}")
    if ns.list or ns.status:
        for c in chains:
            for name, path, cmd in steps(ns.root, c):
                mark = ("done " if done(path) else "     ") if ns.status else ""
                print(f"{mark}{c} {name}: {shlex.join(cmd[1:])}" if ns.list else f"{mark}{c} {name}")
        return 0
    queue = list(chains)
    lock = threading.Lock()
    busy: set[Path] = set()
    failed: list[str] = []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def take(path: Path) -> bool:
        """Wait while another worker runs this directory; False when it is done by then."""
        while True:
            with lock:
                if path not in busy:
                    if done(path):
                        return False
                    busy.add(path)
                    return True
            time.sleep(10)

    def worker(cpu: int) -> None:
        # A member's test run is shared by chains: two workers never run the same directory (the
        # second would be refused by its lock), so a worker takes the next chain none is on.
        while True:
            with lock:
                if not queue:
                    return
                chain = queue.pop(0)
            for name, path, cmd in steps(ns.root, chain):
                if not take(path):
                    continue
                path.parent.mkdir(parents=True, exist_ok=True)
                log = ns.root / "logs" / f"{chain.replace('/', '-')}.log"
                log.parent.mkdir(parents=True, exist_ok=True)
                with open(log, "a") as f:
                    f.write(f"$ {shlex.join(cmd[1:])}\n")
                with open(log, "a") as f:
                    rc = subprocess.call(["taskset", "-c", str(cpu), *cmd], stdout=f, stderr=subprocess.STDOUT, env=env)
                with lock:
                    busy.discard(path)
                if rc != 0:
                    failed.append(f"{chain} {name} (rc {rc}; {log})")
                    break

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(ns.workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for f in failed:
        print("failed:", f, file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
