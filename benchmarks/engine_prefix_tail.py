"""What a vLLM engine recomputes per request: one-token completions after a cached prompt,
with a growing tail of tokens past the last whole KV block (only whole blocks are cached).

    python benchmarks/engine_prefix_tail.py http://127.0.0.1:8002

Each request is the kind fuselm scores with (`allowed_token_ids`, one token); "six at once"
is a scoring wave of six (prefix, token) pairs. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time

import httpx


async def main(url: str, trials: int) -> None:
    async with httpx.AsyncClient(timeout=120) as c:
        model = (await c.get(url + "/v1/models")).json()["data"][0]["id"]
        text = " ".join(["The quick brown fox jumps over the lazy dog."] * 10)
        ids = (await c.post(url + "/tokenize", json={"model": model, "prompt": text})).json()["tokens"]

        async def forced(prefix: list[int], token: int) -> float:
            body = {"model": model, "prompt": prefix, "max_tokens": 1, "temperature": 0, "logprobs": 1,
                    "allowed_token_ids": [token], "return_tokens_as_token_ids": True}  # fmt: skip
            r = await c.post(url + "/v1/completions", json=body)
            r.raise_for_status()
            return r.json()["choices"][0]["logprobs"]["token_logprobs"][0]

        await forced(ids, 100)  # the prompt enters the prefix cache
        rng = random.Random(0)
        print(f"prompt {len(ids)} tokens")
        for trial in range(trials):
            base = ids + [rng.randrange(1000, 5000) for _ in range(trial * 7 + 3)]
            await forced(base, 100)  # a "committed" prefix, as fuselm's streams leave one
            t0 = time.perf_counter()
            await forced(base + [42], 100)
            one = time.perf_counter() - t0
            t0 = time.perf_counter()
            await asyncio.gather(*(forced(base + [42] * i, 100) for i in range(1, 7)))
            six = time.perf_counter() - t0
            print(f"prefix {len(base) + 1}: one {one * 1e3:.0f} ms, six at once {six * 1e3:.0f} ms")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("url")
    ap.add_argument("--trials", type=int, default=3)
    args = ap.parse_args()
    asyncio.run(main(args.url.rstrip("/"), args.trials))
