"""Few-shot evaluation with and without the warm prompt prefix: seconds per sample when each
generation starts from an empty cache ("cold") against one that keeps the previous prompt's
common prefix ("warm"), alternating sample by sample in one run.

    python benchmarks/prompt_prefix.py --task nq --samples 12
    python benchmarks/prompt_prefix.py --task nq --split-check   # batch-size numerics of llama.cpp
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from fuselm.config import GenerationConfig  # noqa: E402
from fuselm.eval.runner import task_generation  # noqa: E402
from fuselm.eval.task import default_data_dir, load_rows  # noqa: E402
from fuselm.eval.tasks import get_task  # noqa: E402
from fuselm.fusion.loop import generate  # noqa: E402
from fuselm.models.loading import load_model  # noqa: E402

SETUPS = [
    ("single", ["smollm2-135m"]),
    ("single", ["qwen2.5-coder-0.5b"]),
    ("single", ["qwen2.5-coder-1.5b"]),
    ("adafuse", ["smollm2-135m", "qwen2.5-coder-0.5b"]),
]


def split_check(prompt: str, backend: str) -> None:
    """The same prompt prefilled on a fresh cache in one batch and in two: how far apart are the
    next-token log-probs? (Keeping a warm prefix changes this split.)"""
    import torch

    b = load_model("smollm2-135m", backend=backend).backend
    ids = b.tokenize(prompt)
    whole = b.extend(b.new_cache(), ids)
    top = torch.topk(whole, 10).indices
    print(f"| split of {len(ids)} tokens | max diff, top-10 log-probs | max diff, all | same argmax |")
    print("|---|---|---|---|")
    for cut in (50, 100, 150, len(ids) - 14, len(ids) - 4):
        cache = b.new_cache()
        b.extend(cache, ids[:cut])
        split = b.extend(cache, ids[cut:])
        del cache
        print(
            f"| {cut} + {len(ids) - cut} | {float((split[top] - whole[top]).abs().max()):.4f} "
            f"| {float((split - whole).abs().max()):.4f} | {int(split.argmax()) == int(whole.argmax())} |"
        )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="nq")
    ap.add_argument("--samples", type=int, default=12)
    ap.add_argument("--backend", default="llamacpp")
    ap.add_argument("--split-check", action="store_true", help="only the batch-split numerics check")
    a = ap.parse_args()
    task = get_task(a.task)
    data_dir = default_data_dir()
    prefix = task.prompt_prefix(data_dir)
    prompts = [task.build_prompt(prefix, row) for row in load_rows(task, None, data_dir)[: a.samples]]
    if a.split_check:
        split_check(prompts[5], a.backend)
        return 0
    gen = task_generation(task, GenerationConfig(), set())
    loaded = {}
    print("| method | models | cold s/sample | warm s/sample | cold / warm | prompt tokens kept (warm) | same texts |")
    print("|---|---|---|---|---|---|---|")
    for method, names in SETUPS:
        models = [loaded.setdefault(n, load_model(n, backend=a.backend)) for n in names]
        generate(models, prompts[0], method, gen)  # first touch of the weights, not timed
        cold = warm = 0.0
        kept = total = 0
        cold_texts, warm_texts = {}, {}
        # Pairs: prompt i from an empty cache, then prompt i + 1 right after it (warm, as in an eval).
        for i in range(len(prompts) - 1):
            for m in models:
                m.prefix_cache.clear()  # the next run starts cold
            t = time.perf_counter()
            cold_texts[i] = generate(models, prompts[i], method, gen).text
            cold += time.perf_counter() - t
            t = time.perf_counter()
            w = generate(models, prompts[i + 1], method, gen)
            warm += time.perf_counter() - t
            warm_texts[i + 1] = w.text
            kept += sum(w.stats.cached_prompt_tokens.values())
            total += sum(w.stats.prompt_tokens.values())
        same = all(warm_texts[i] == cold_texts[i] for i in warm_texts if i in cold_texts)
        n = len(prompts) - 1
        print(
            f"| {method} | {'+'.join(names)} | {cold / n:.2f} | {warm / n:.2f} | {cold / warm:.1f}x "
            f"| {kept / total:.0%} | {'yes' if same else 'NO'} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
