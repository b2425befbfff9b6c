"""Cost of a router SFT step with the LM head on the answer window only, against the LM head at
every position, measured in the same run on the same examples.

    fuselm train-router --config configs/router-qwen.yaml    # writes runs/router-qwen/data/sft.jsonl
    python benchmarks/router_train_step.py --data runs/router-qwen/data/sft.jsonl --examples 8 --repeats 3

The router is the real backbone (`qwen2.5-coder-0.5b`, transformers, float32) with LoRA r=8, as
in the configs. For each example, forward + SFT loss + backward run twice: once as training
does it (LM logits from the position predicting the first answer token on) and once with the LM
logits of every position computed and the same window then cut out of them (the cost before the
window was introduced, less the log-softmax over the prompt that it also paid). Each example runs
`--repeats` pairs, the two orders alternating, and the median of each is kept, so that drift and
bursts on a busy machine hit both alike; the result is the ratio of the summed medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from fuselm.models.loading import load_model  # noqa: E402
from fuselm.router.losses import sft_loss  # noqa: E402
from fuselm.router.model import RouterModel, RouterOutput, add_lora  # noqa: E402
from fuselm.training.router_train import answer_window, sft_tensors  # noqa: E402


def every_position(router: RouterModel, ids: torch.Tensor, start: int) -> RouterOutput:
    out = router(input_ids=ids)  # LM logits at all T positions
    return RouterOutput(out.lm_logits[:, start:], out.route_logits[:, start:])


def step(router: RouterModel, item: dict, forward) -> float:
    x = sft_tensors(item)
    t0 = time.perf_counter()
    out = forward(router, x["ids"], x["start"])
    loss, _ = sft_loss(out, x["window_ids"], x["target_mask"], x["expert_lp"], x["informative"])
    loss.backward()
    router.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="an annotated sft.jsonl written by `fuselm train-router`")
    ap.add_argument("--backbone", default="qwen2.5-coder-0.5b")
    ap.add_argument("--examples", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    with open(a.data, encoding="utf-8") as f:
        items = [json.loads(line) for _, line in zip(range(a.examples + 1), f)]
    backbone = load_model(a.backbone, backend="transformers").backend.model
    router = add_lora(RouterModel(backbone, len(items[0]["expert_greedy"])), r=8, alpha=16)
    router.train()
    step(router, items[0], answer_window)  # warm-up
    window = full = 0.0
    tokens = 0
    for item in items[1:]:
        times: dict[str, list[float]] = {"window": [], "full": []}
        for r in range(a.repeats):
            pair = [("window", answer_window), ("full", every_position)]
            for which, forward in pair if r % 2 == 0 else pair[::-1]:
                times[which].append(step(router, item, forward))
        window += statistics.median(times["window"])
        full += statistics.median(times["full"])
        tokens += len(item["prompt_ids"]) + len(item["target_ids"])
    n = len(items) - 1
    print(
        f"backbone {a.backbone} + LoRA r=8, {torch.get_num_threads()} torch threads, {n} examples from {a.data} "
        f"({tokens / n:.0f} tokens each on average), median of {a.repeats} steps each"
    )
    print(f"LM head at every position: {full / n:.3f} s/example")
    print(f"LM head on the answer window: {window / n:.3f} s/example")
    print(f"speed-up: {full / window:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
