"""How llama.cpp models share this machine's cores: the facts behind `fuselm serve`'s replicas
and its one thread per replica.

    python benchmarks/llamacpp_threads.py --prompts 16 --max-tokens 32

(1) The same prompts decoded by one model from one thread, then from four threads in turn
(one at a time), then from the first thread again: llama.cpp's CPU backend (OpenMP) keeps a
team of spinning threads per calling thread. (2) One copy of a model with all cores, against
two copies with an equal share each, decoding side by side, each copy used from one thread
only. Each part runs in a fresh process, so that neither sees the other's threads.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

PROMPTS = ["Tell me about the sea.", "What is the capital of France?", "Write a poem about rain.", "Explain gravity."]


def main() -> int:
    from fuselm.config import GenerationConfig
    from fuselm.models.backend import usable_cpus

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--part", choices=["calls", "copies"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.part is None:
        rows = []
        for part in ("copies", "calls"):
            out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--part", part], check=True,
                                 capture_output=True, text=True).stdout  # fmt: skip
            rows += json.loads(out.strip().splitlines()[-1])
        print(f"model: {a.model}, prompts: {a.prompts}, max_tokens: {a.max_tokens}, cores: {usable_cpus()}\n")
        print("| models | calls from | requests/s |")
        print("|---|---|---|")
        for r in rows:
            print(f"| {r[0]} | {r[1]} | {r[2]:.2f} |")
        return 0
    prompts = (PROMPTS * a.prompts)[: a.prompts]
    gen = GenerationConfig(max_new_tokens=a.max_tokens)
    if a.part == "calls":
        print(json.dumps(calls(a, prompts, gen)))
    else:
        print(json.dumps(copies(a, prompts, gen)))
    return 0


def calls(a, prompts: list[str], gen) -> list:
    from fuselm.config import ModelConfig
    from fuselm.fusion.loop import decode
    from fuselm.fusion.methods import build_method
    from fuselm.models.loading import load_model

    rows = []
    model = load_model(ModelConfig(name=a.model, backend="llamacpp"))
    method = build_method("single", [model])
    first, others = ThreadPoolExecutor(1), [ThreadPoolExecutor(1) for _ in range(3)]
    first.submit(decode, method, "Hi", gen.model_copy(update={"max_new_tokens": 2})).result()
    for label, pools in (("one thread", [first]), ("four threads in turn", [first, *others]),
                         ("the first thread again", [first])):  # fmt: skip
        t = time.perf_counter()
        for i, p in enumerate(prompts):
            pools[i % len(pools)].submit(decode, method, p, gen).result()
        rows.append(("one model, all cores", label, len(prompts) / (time.perf_counter() - t)))
    model.close()
    return rows


def copies(a, prompts: list[str], gen) -> list:
    from fuselm.config import ModelConfig
    from fuselm.fusion.loop import decode
    from fuselm.fusion.methods import build_method
    from fuselm.models.backend import usable_cpus
    from fuselm.models.loading import load_model

    rows = []
    cores = usable_cpus()
    for copies in (1, 2):
        threads = max(1, cores // copies)
        models = [load_model(ModelConfig(name=a.model, backend="llamacpp", threads=threads)) for _ in range(copies)]
        methods = [build_method("single", [m]) for m in models]
        work, lock = list(prompts), threading.Lock()
        ready = threading.Barrier(copies + 1)

        def worker(meth, work=work, lock=lock, ready=ready) -> None:
            decode(meth, "Hi", gen.model_copy(update={"max_new_tokens": 2}))  # on this thread only
            ready.wait()
            while True:
                with lock:
                    if not work:
                        return
                    p = work.pop()
                decode(meth, p, gen)

        workers = [threading.Thread(target=worker, args=(m,)) for m in methods]
        for w in workers:
            w.start()
        ready.wait()
        t = time.perf_counter()
        for w in workers:
            w.join()
        rows.append((f"{copies} cop{'y' if copies == 1 else 'ies'}, {threads} thread(s) each", "side by side",
                     len(prompts) / (time.perf_counter() - t)))  # fmt: skip
        for m in models:
            m.close()
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
