"""Load on `fuselm serve`: 1, 4 and 16 concurrent clients against one setup, against calling
`fuselm.Ensemble.generate` in-process one prompt after another, in the same run.

    python benchmarks/serve_load.py --requests 16 --max-tokens 32
    python benchmarks/serve_load.py --setups single --concurrency 1,4 --replicas 2

For each setup (a single model, then AdaFuse over two): the in-process sequential run first
(models loaded in this process, freed after), then a real server subprocess on 127.0.0.1 and
streaming chat requests from client threads (httpx). Reported per row: requests/s, generated
tokens/s, p50 and p99 request latency, p50 time to first streamed text, and the latency of
a lone request over the in-process one (what HTTP, SSE and the scheduler add). With
`--replicas 1,2` the server runs once per value, its setup's models loaded that many times
(each copy with an equal share of the cores).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import yaml

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

PROMPTS = [
    "What is the capital of France?",
    "Name three rivers in Europe.",
    "Explain in one sentence why the sky is blue.",
    "Write a haiku about the sea.",
    "What is 12 times 7?",
    "Give one tip for writing readable Python code.",
    "Who wrote Hamlet?",
    "What does a hash table do?",
]
SETUPS = {
    "single": {"id": "single", "models": [{"name": "smollm2-135m"}]},
    "adafuse": {
        "id": "adafuse",
        "models": [{"name": "smollm2-135m"}, {"name": "qwen2.5-coder-0.5b"}],
        "method": "adafuse",
    },
}


def in_process(setup: dict, prompts: list[str], max_tokens: int) -> tuple[float, int, list[float]]:
    import fuselm

    ens = fuselm.Ensemble([m["name"] for m in setup["models"]], method=setup.get("method", "single"))
    ens.generate(prompts[0], max_new_tokens=2)  # first touch, not timed
    lat, tokens = [], 0
    t0 = time.perf_counter()
    for p in prompts:
        t = time.perf_counter()
        r = ens.generate(p, max_new_tokens=max_tokens)
        lat.append(time.perf_counter() - t)
        tokens += r.stats.new_tokens
    wall = time.perf_counter() - t0
    ens.close()
    for m in ens.models:
        m.close()
    return wall, tokens, lat


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(setup: dict, max_tokens: int, replicas: int, tmp: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cfg = {"port": port, "limits": {"max_concurrent": 4, "max_queue": 64, "max_tokens": max_tokens},
           "setups": [{**setup, "replicas": replicas}]}  # fmt: skip
    path = tmp / f"{setup['id']}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = open(tmp / f"{setup['id']}.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fuselm.cli", "serve", "--config", str(path)], stdout=log, stderr=log
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {(tmp / (setup['id'] + '.log')).read_text()[-2000:]}")
        time.sleep(0.3)
    raise SystemExit("server not ready")


def one_request(client: httpx.Client, url: str, model: str, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """(latency, time to first text, completion tokens) of one streamed chat request."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    t0 = time.perf_counter()
    first = None
    tokens = 0
    with client.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data:") or line.endswith("[DONE]"):
                continue
            msg = json.loads(line[5:])
            if msg.get("usage"):
                tokens = msg["usage"]["completion_tokens"]
            for c in msg.get("choices", []):
                if first is None and c.get("delta", {}).get("content"):
                    first = time.perf_counter() - t0
    return time.perf_counter() - t0, first if first is not None else float("nan"), tokens


def load(url: str, model: str, prompts: list[str], max_tokens: int, concurrency: int):
    todo = list(prompts)
    lock = threading.Lock()
    results: list[tuple[float, float, int]] = []

    def worker() -> None:
        with httpx.Client() as client:
            while True:
                with lock:
                    if not todo:
                        return
                    p = todo.pop(0)
                res = one_request(client, url, model, p, max_tokens)
                with lock:
                    results.append(res)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, results


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setups", default="single,adafuse")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--requests", type=int, default=16, help="requests per concurrency level")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--replicas", default="1", help="server runs with these replica counts (e.g. 1,2)")
    a = ap.parse_args()
    prompts = (PROMPTS * (a.requests // len(PROMPTS) + 1))[: a.requests]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name in a.setups.split(","):
            setup = SETUPS[name]
            wall, tokens, lat = in_process(setup, prompts, a.max_tokens)
            rows.append((name, "in-process, sequential", len(prompts) / wall, tokens / wall, statistics.median(lat),
                         pct(lat, 0.99), float("nan"), 1.0))  # fmt: skip
            lone = statistics.median(lat)
            for replicas in (int(x) for x in a.replicas.split(",")):
                proc, url = start_server(setup, a.max_tokens, replicas, Path(d))
                where = "server" if replicas == 1 else f"server, {replicas} replicas"
                try:
                    one_request(httpx.Client(), url, name, prompts[0], 2)  # first touch
                    for c in (int(x) for x in a.concurrency.split(",")):
                        wall, res = load(url, name, prompts, a.max_tokens, c)
                        lats = [r[0] for r in res]
                        rows.append((name, f"{where}, {c} client(s)", len(res) / wall, sum(r[2] for r in res) / wall,
                                     statistics.median(lats), pct(lats, 0.99), statistics.median(r[1] for r in res),
                                     statistics.median(lats) / lone))  # fmt: skip
                        print(f"{name} r={replicas} c={c}: {len(res) / wall:.2f} req/s", file=sys.stderr)
                finally:
                    proc.terminate()
                    proc.wait(timeout=60)
    print(
        f"requests per level: {a.requests}, max_tokens: {a.max_tokens}, greedy, chat template, threads: {os.cpu_count()}\n"
    )
    print(
        "| setup | run | requests/s | tokens/s | p50 latency s | p99 latency s | p50 first text s | p50 latency / in-process |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        first = "" if r[6] != r[6] else f"{r[6]:.2f}"
        print(f"| {r[0]} | {r[1]} | {r[2]:.2f} | {r[3]:.1f} | {r[4]:.2f} | {r[5]:.2f} | {first} | {r[7]:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
