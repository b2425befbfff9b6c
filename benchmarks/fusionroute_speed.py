"""Cost of FusionRoute per token against the selected expert alone, measured in the same run.

    python benchmarks/fusionroute_speed.py --router runs/router-qwen/router --tokens 32

For each prompt: every expert decodes alone (single-model s/token), then FusionRoute and
expert-route decode with the router, once per router engine (transformers float32, llama.cpp
with the LoRA as a GGUF adapter). "Selected expert alone" is the experts' single-model s/token
weighted by how many tokens FusionRoute routed to each; the experts run on the backend given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from fuselm.config import GenerationConfig  # noqa: E402
from fuselm.fusion.loop import decode, generate  # noqa: E402
from fuselm.fusion.methods import build_method  # noqa: E402
from fuselm.models.loading import load_model  # noqa: E402

PROMPTS = [
    "Write a Python function that returns the factorial of n.",
    "What is the capital of France? Answer in one sentence.",
    "Explain what a hash table is in two sentences.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
]


def per_token(result) -> float:
    return result.stats.seconds / max(result.stats.new_tokens, 1)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--router", required=True)
    ap.add_argument("--backend", default="llamacpp", help="experts' backend")
    ap.add_argument("--engines", default="transformers,llamacpp", help="router engines to time, comma-separated")
    ap.add_argument("--tokens", type=int, default=32)
    a = ap.parse_args()
    meta = json.loads(open(os.path.join(a.router, "router.json")).read())
    experts = [load_model(n, backend=a.backend) for n in meta["experts"]]
    engines = a.engines.split(",")
    gen = GenerationConfig(max_new_tokens=a.tokens)
    methods = {}
    for engine in engines:  # each router loaded once per method, as a run does
        opts = {"router": a.router, "router_backend": engine}
        methods[engine] = {m: build_method(m, experts, opts) for m in ("fusionroute", "expert-route")}
        decode(methods[engine]["fusionroute"], PROMPTS[0], GenerationConfig(max_new_tokens=2))  # first touch
    rows = []
    for prompt in PROMPTS:
        alone = [per_token(generate([m], prompt, "single", gen)) for m in experts]
        per_engine = {}
        for engine in engines:
            fused = decode(methods[engine]["fusionroute"], prompt, gen)
            routed = decode(methods[engine]["expert-route"], prompt, gen)
            picks = [sum(t.source == m.name for t in fused.trace) for m in experts]
            base = sum(p * s for p, s in zip(picks, alone)) / max(sum(picks), 1)
            changed = sum(bool(t.changed) for t in fused.trace) / max(len(fused.trace), 1)
            per_engine[engine] = (base, per_token(fused), per_token(routed), picks, changed)
            print(f"{engine} {prompt[:40]!r}: {fused.text[:70]!r}", file=sys.stderr)
        rows.append((alone, per_engine))
    names = [m.name for m in experts]
    print(f"experts: {', '.join(names)} ({a.backend}), router: {a.router}, tokens: {a.tokens}\n")
    print(
        "| prompt | router on | "
        + " | ".join(f"{n} alone s/tok" for n in names)
        + " | selected expert alone s/tok | fusionroute s/tok | ratio | expert-route s/tok "
        "| tokens routed to each | complementary logits changed the token |"
    )
    print("|---" * (len(names) + 8) + "|")
    for i, (alone, per_engine) in enumerate(rows):
        for engine, (base, fr, er, picks, changed) in per_engine.items():
            print(
                f"| {i + 1} | {engine} | "
                + " | ".join(f"{x:.3f}" for x in alone)
                + f" | {base:.3f} | {fr:.3f} | {fr / base:.2f} | {er:.3f} | {'/'.join(map(str, picks))} | {changed:.0%} |"
            )
    print()
    for engine in engines:
        tb = sum(r[1][engine][0] for r in rows) / len(rows)
        tf = sum(r[1][engine][1] for r in rows) / len(rows)
        print(
            f"router on {engine}: selected expert alone {tb:.3f} s/token, fusionroute {tf:.3f} s/token, ratio {tf / tb:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
