"""Cost of fusion: AdaFuse wall time per generated token against the sum of its members'
single-model decode time per token, measured in the same run, per backend.

    python benchmarks/fusion_speed.py --backend llamacpp --tokens 48 --repeats 2
    python benchmarks/fusion_speed.py --backend transformers --tokens 24 --prompts 2
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from fuselm.config import GenerationConfig  # noqa: E402
from fuselm.fusion.loop import generate  # noqa: E402
from fuselm.models.loading import load_model  # noqa: E402
from fuselm.text.words import split_words  # noqa: E402

PROMPTS = [
    "Explain in three sentences why the sky is blue.",
    "Write a short paragraph about the history of Paris.",
    "List three tips for writing readable Python code.",
    "What happens to water when it freezes? Answer briefly.",
]
ENSEMBLES = [["smollm2-135m", "qwen2.5-coder-0.5b"], ["smollm2-135m", "qwen2.5-coder-0.5b", "gemma3-270m"]]


def per_token(result) -> float:
    return result.stats.seconds / max(result.stats.new_tokens, 1)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="llamacpp")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--prompts", type=int, default=len(PROMPTS), help="how many of the built-in prompts")
    ap.add_argument("--repeats", type=int, default=1, help="runs per prompt (single and fused interleaved)")
    a = ap.parse_args()
    prompts = PROMPTS[: a.prompts] * a.repeats
    gen = GenerationConfig(max_new_tokens=a.tokens)
    cache = {}
    rows = []
    for names in ENSEMBLES:
        models = [cache.setdefault(n, load_model(n, backend=a.backend)) for n in names]
        single_sum = fused = 0.0
        passes = words = 0
        for prompt in prompts:
            # Singles and the ensemble alternate, so drifts in machine speed hit both sides alike.
            for m in models:
                single_sum += per_token(generate([m], prompt, "single", gen))
            res = generate(models, prompt, "adafuse", gen)
            fused += per_token(res)
            passes += sum(res.stats.forward_passes.values())
            words += max(len(split_words(res.text)), 1)
            print(f"{'+'.join(names)}: {res.text[:80]!r}", file=sys.stderr)
        k = len(prompts)
        rows.append(("+".join(names), single_sum / k, fused / k, fused / single_sum, passes / words))
    print(
        f"backend: {a.backend}, max_new_tokens: {a.tokens}, prompts: {a.prompts} x {a.repeats}, "
        f"threads: {os.cpu_count()}\n"
    )
    print(
        "| ensemble | sum of members' single s/token | AdaFuse s/token | ratio | forward passes per committed word (all models) |"
    )
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.3f} | {r[2]:.3f} | {r[3]:.2f} | {r[4]:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
