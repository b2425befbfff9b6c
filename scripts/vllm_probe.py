"""What fuselm's remote-expert backend needs from a running vLLM server, asked once each and
printed (see DEVELOPERS.md):

    python scripts/vllm_probe.py http://127.0.0.1:8100
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import sys
import time

import httpx


def main() -> None:
    url = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8100"
    c = httpx.Client(base_url=url, timeout=120)
    model = c.get("/v1/models").json()["data"][0]["id"]
    print("model", model)
    tok = c.post("/tokenize", json={"model": model, "prompt": "The capital of France is"}).json()
    print("tokenize", tok)
    ids = tok["tokens"]
    full = c.post("/tokenize", json={"model": model, "prompt": "The capital of France is Paris"}).json()["tokens"]
    print("full", full)
    # next-token top-k on token ids
    r = c.post(
        "/v1/completions", json={"model": model, "prompt": ids, "max_tokens": 1, "logprobs": 5, "temperature": 0}
    ).json()
    print("next top5", json.dumps(r["choices"][0]["logprobs"]["top_logprobs"]), r["choices"][0]["text"])
    # scoring with prompt_logprobs, batched prompts
    cands = [full, ids + [12095]]  # the answer, and an arbitrary other token after the prompt
    t = time.perf_counter()
    r = c.post(
        "/v1/completions",
        json={"model": model, "prompt": cands, "max_tokens": 1, "prompt_logprobs": 1, "temperature": 0},
    ).json()
    print("score secs", round(time.perf_counter() - t, 3))
    for ch in r["choices"]:
        pl = ch.get("prompt_logprobs")
        print("index", ch["index"], "last", json.dumps(pl[-1]) if pl else None, "first", pl[0] if pl else None)
    # rollout 6 tokens with top-2, return token ids
    r = c.post(
        "/v1/completions",
        json={
            "model": model,
            "prompt": ids,
            "max_tokens": 6,
            "logprobs": 2,
            "temperature": 0,
            "return_tokens_as_token_ids": True,
        },
    ).json()
    lp = r["choices"][0]["logprobs"]
    print(
        "rollout",
        repr(r["choices"][0]["text"]),
        lp["tokens"],
        [round(x, 3) for x in lp["token_logprobs"]],
        lp["top_logprobs"][:2],
    )
    print("usage", r["usage"])

    # concurrency
    def one(_):
        return c.post(
            "/v1/completions", json={"model": model, "prompt": ids, "max_tokens": 32, "temperature": 0}
        ).json()["usage"]

    for n in (1, 8):
        t = time.perf_counter()
        with cf.ThreadPoolExecutor(n) as ex:
            list(ex.map(one, range(n)))
        print(f"{n} concurrent 32-token: {time.perf_counter() - t:.2f}s")


if __name__ == "__main__":
    main()
