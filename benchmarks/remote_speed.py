"""Experts on serving engines (vLLM or SGLang), against the same models in-process, in one run.

    python benchmarks/remote_speed.py --prompts 6 --max-tokens 32 --rows 16
    python benchmarks/remote_speed.py --engine sglang --prompts 4 --max-tokens 32 --rows 8

Starts two engine processes on 127.0.0.1 (vLLM from the venv of scripts/setup_vllm.sh, or
SGLang's CPU path from scripts/setup_sglang.sh), SmolLM2-135M and Qwen2.5-Coder-0.5B in
float32, each pinned to one core (`taskset`), and measures:

1. per-token cost of one model through its engine against the same weights in-process
   (transformers, float32, one thread: what the engine process gets), `single`, greedy;
2. AdaFuse over the two experts, each on its own engine, today's policy and anchored on the
   0.5B model, against the sum and the maximum of the members' own per-token time (each
   `single` on its engine), the same prompts;
3. `eval` rows (NQ) with AdaFuse over the two engines, 8 rows in flight against 1.

Prints a table and writes it as JSON (--out). A benchmark, not a test: ratios in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("FUSELM_VLLM_VENV", Path.home() / ".cache/fuselm/vllm-venv"))
SGLANG_VENV = Path(os.environ.get("FUSELM_SGLANG_VENV", Path.home() / ".cache/fuselm/sglang-venv"))

from serve_load import PROMPTS  # noqa: E402 - the same chat prompts as the server benchmark (this folder)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_command(engine: str, model_dir: Path, port: int, block_size: int) -> list[str]:
    if engine == "sglang":  # its radix cache reuses any cached prefix, to the token
        return [str(SGLANG_VENV / "bin" / "fuselm-sglang-server"), "--model-path", str(model_dir), "--host",
                "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-total-tokens", "16384"]  # fmt: skip
    return [str(VENV / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-logprobs", "20",
            "--kv-cache-memory-bytes", str(1 << 30), "--block-size", str(block_size)]  # fmt: skip


def start_engine(
    engine: str, model_dir: Path, core: int | None, log: Path, block_size: int = 32
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = engine_command(engine, model_dir, port, block_size)
    if core is not None and shutil.which("taskset"):
        cmd = ["taskset", "-c", str(core), *cmd]
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(procs: list[tuple[subprocess.Popen, str]], timeout: float = 900) -> None:
    deadline = time.time() + timeout
    for proc, url in procs:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"the engine at {url} exited (see its log)")
            try:
                if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline:
                raise SystemExit(f"the engine at {url} is not ready")
            time.sleep(1)


def per_token(models, method: str, prompts: list[str], gen, options: dict | None = None) -> tuple[float, int]:
    """Seconds per generated token over `prompts` (after one warm-up generation)."""
    from fuselm.fusion.loop import decode
    from fuselm.fusion.methods import build_method

    built = build_method(method, models, options)
    decode(built, prompts[0], gen)
    engines = [m.engine for m in models if getattr(m, "engine", None) is not None]
    before = [(Counter(e.requests), Counter(e.request_seconds)) for e in engines]
    seconds, tokens = 0.0, 0
    for p in prompts:
        t0 = time.perf_counter()
        r = decode(built, p, gen)
        seconds += time.perf_counter() - t0
        tokens += r.stats.new_tokens
    remote = [m for m in models if getattr(m, "engine", None) is not None]
    for m, e, (n0, s0) in zip(remote, engines, before):  # where a token's time goes, per expert
        n, s = e.requests - n0, e.request_seconds - s0
        paths = ", ".join(f"{p} {n[p] / max(tokens, 1):.2f}/token {1e3 * s[p] / max(n[p], 1):.0f} ms each"
                          for p in sorted(n))  # fmt: skip
        print(f"  {method} {options or ''} {m.name}: {paths}", file=sys.stderr, flush=True)
    return seconds / max(tokens, 1), tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rows", type=int, default=16, help="NQ rows for the eval concurrency part")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--out", default=None, help="write the results as JSON")
    ap.add_argument("--engine", choices=["vllm", "sglang"], default="vllm")
    ap.add_argument("--block-size", type=int, default=32, help="vLLM's KV block (its prefix cache keeps whole blocks)")
    args = ap.parse_args()
    if args.engine == "vllm" and not (VENV / "bin" / "python").is_file():
        raise SystemExit(f"vLLM not set up in {VENV}: run scripts/setup_vllm.sh")
    if args.engine == "sglang" and not (SGLANG_VENV / "bin" / "fuselm-sglang-server").is_file():
        raise SystemExit(f"SGLang not set up in {SGLANG_VENV}: run scripts/setup_sglang.sh")
    kind = args.engine

    import torch

    from fuselm.config import GenerationConfig, ModelConfig
    from fuselm.models import assets
    from fuselm.models.catalog import BUNDLED
    from fuselm.models.loading import load_model

    torch.set_num_threads(1)
    names = ["smollm2-135m", "qwen2.5-coder-0.5b"]
    dirs = [assets.ensure_converted(BUNDLED[n]) for n in names]
    tmp = Path(tempfile.mkdtemp(prefix="remote-speed-"))
    engines = [
        start_engine(kind, d, core, tmp / f"{kind}-{i}.log", args.block_size)
        for i, (d, core) in enumerate(zip(dirs, (0, 1)))
    ]
    prompts = (PROMPTS * 4)[: args.prompts]
    gen = GenerationConfig(max_new_tokens=args.max_tokens)
    rows: list[dict] = []

    def add(row: dict) -> None:  # printed as measured: a later part's failure loses nothing
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)

    try:
        t0 = time.perf_counter()
        wait_ready(engines)
        print(f"engines ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        remote = [
            load_model(ModelConfig(name=f"{n}@{kind}", engine=kind, url=url)) for n, (_, url) in zip(names, engines)
        ]
        # 1. one model: engine against in-process (same weights, one thread each)
        local = load_model(ModelConfig(name=names[0], backend="transformers"))
        t_local, n_local = per_token([local], "single", prompts, gen)
        local.close()
        t_remote, n_remote = per_token([remote[0]], "single", prompts, gen)
        add({"part": "1", "what": f"{names[0]} single, in-process (transformers, 1 thread)",
                     "ms_per_token": t_local * 1e3, "tokens": n_local})  # fmt: skip
        add({"part": "1", "what": f"{names[0]} single, on {kind} (1 core)", "ms_per_token": t_remote * 1e3,
                     "tokens": n_remote, "ratio": t_remote / t_local, "ratio_of": "in-process"})  # fmt: skip
        # 2. AdaFuse over two engines against its members alone on the same engines
        t_b, n_b = per_token([remote[1]], "single", prompts, gen)
        add({"part": "2", "what": f"{names[1]} single, on {kind} (1 core)", "ms_per_token": t_b * 1e3,
                     "tokens": n_b})  # fmt: skip
        t_fused, n_fused = per_token(remote, "adafuse", prompts, gen)
        add({"part": "2", "what": "adafuse over both engines", "ms_per_token": t_fused * 1e3,
                     "tokens": n_fused, "ratio": t_fused / max(t_remote, t_b), "ratio_of": "slowest member",
                     "ratio_sum": t_fused / (t_remote + t_b)})  # fmt: skip
        # the anchored policy: the stronger member drafts, the other objects only where it is unsure
        anchored = {"policy": "anchored", "anchor": remote[1].name}
        t_anch, n_anch = per_token(remote, "adafuse", prompts, gen, anchored)
        add({"part": "2", "what": f"adafuse, anchored on {names[1]}, over both engines", "ms_per_token": t_anch * 1e3,
                     "tokens": n_anch, "ratio": t_anch / max(t_remote, t_b), "ratio_of": "slowest member",
                     "ratio_sum": t_anch / (t_remote + t_b)})  # fmt: skip
        # the same two, every tokenization asked of the engines (above: tokenized here, with the
        # engines' own model directories, checked against them)
        asking = [
            load_model(ModelConfig(name=f"{n}@{kind}", engine=kind, url=url, tokenizer="engine"))
            for n, (_, url) in zip(names, engines)
        ]
        assert all(m.engine.tokenizes_here for m in remote) and not any(m.engine.tokenizes_here for m in asking)
        for label, opts in (("adafuse", None), (f"adafuse, anchored on {names[1]}", anchored)):
            t, n = per_token(asking, "adafuse", prompts, gen, opts)
            add({"part": "2", "what": f"{label}, tokenizing on the engines", "ms_per_token": t * 1e3,
                         "tokens": n, "ratio": t / max(t_remote, t_b), "ratio_of": "slowest member",
                         "ratio_sum": t / (t_remote + t_b)})  # fmt: skip
        # 3. eval rows in flight
        if Path(args.data_dir, "nq").is_dir():
            env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
            models = ",".join(f"{n}@{kind}={kind}:{url}" for n, (_, url) in zip(names, engines))
            times = {}
            for c in (1, args.concurrency):
                out = tmp / f"eval-c{c}"
                cmd = [sys.executable, "-m", "fuselm.cli", "eval", "--task", "nq", "--models", models,
                       "--method", "adafuse", "--limit", str(args.rows), "--concurrency", str(c), "--out", str(out),
                       "--no-progress", "--data-dir", args.data_dir]  # fmt: skip
                t0 = time.perf_counter()
                subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
                times[c] = time.perf_counter() - t0
                add({"part": "3", "what": f"eval nq adafuse, {args.rows} rows, concurrency {c}",
                             "seconds": times[c], "rows_per_s": args.rows / times[c]})  # fmt: skip
            rows[-1].update(ratio=times[1] / times[args.concurrency], ratio_of="speed-up over concurrency 1")
    finally:
        for proc, _ in engines:
            proc.terminate()
        for proc, _ in engines:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    print("| part | what | ms/token | ratio |\n|---|---|---|---|")
    for r in rows:
        cost = (
            f"{r['ms_per_token']:.1f}"
            if "ms_per_token" in r
            else f"{r['seconds']:.1f} s ({r['rows_per_s']:.2f} rows/s)"
        )
        ratio = f"{r['ratio']:.2f} ({r['ratio_of']})" if "ratio" in r else ""
        if "ratio_sum" in r:
            ratio += f"; {r['ratio_sum']:.2f} (sum of members)"
        print(f"| {r['part']} | {r['what']} | {cost} | {ratio} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
