"""Decode speed through fuselm's incremental session against each backend's own generation loop.

For every installed bundled model and backend, in the same process and interleaved:
  * own loop: transformers `generate` (greedy, KV cache) or llama.cpp `create_completion`
  * session: DecodingSession, one token per step with the text appended back, as `single` does
  * append cost: an append that splits the last token (forces re-tokenization and a rollback)

End of sequence is suppressed in all loops so that each produces exactly N tokens.

    python benchmarks/decode_speed.py --tokens 64 --repeats 3 > benchmarks/out/decode_speed.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from fuselm.config import GenerationConfig  # noqa: E402
from fuselm.fusion.single import complete_text  # noqa: E402
from fuselm.models import assets, llamacpp  # noqa: E402
from fuselm.models.catalog import BUNDLED  # noqa: E402
from fuselm.models.loading import load_model  # noqa: E402
from fuselm.models.session import DecodingSession  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def no_eos_greedy(eos):
    eos_list = list(eos)

    def choose(lp):
        lp = lp.clone()
        lp[eos_list] = float("-inf")
        return int(torch.argmax(lp))

    return choose


def session_loop(model, prompt_text, n):
    s = DecodingSession(model.backend, prompt_text)
    s.next_logprobs()  # prefill outside the timed region, as for the own loop's first token
    choose = no_eos_greedy(model.info.eos_token_ids)
    made = 0
    t0 = time.perf_counter()
    while made < n:
        roll = s.rollout(n - made, until=complete_text, choose=choose, margins=False)
        made += len(roll.token_ids)
        s.append(roll.text)
    s.next_logprobs()
    return (time.perf_counter() - t0) / n, s


def own_loop_hf(model, prompt_text, n):
    be = model.backend
    ids = torch.tensor([be.tokenize(prompt_text)])
    hf = be.model
    with torch.inference_mode():
        # prefill + first token, untimed, mirrors the session's untimed prefill
        t0 = time.perf_counter()
        hf.generate(ids, max_new_tokens=n + 1, min_new_tokens=n + 1, do_sample=False, pad_token_id=0)
        total = time.perf_counter() - t0
        t1 = time.perf_counter()
        hf.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=0)
        prefill = time.perf_counter() - t1
    return (total - prefill) / n


def own_loop_llamacpp(llama, prompt_text, n, eos):
    bias = {int(e): -1e9 for e in eos}
    llama.reset()
    t0 = time.perf_counter()
    llama.create_completion(prompt_text, max_tokens=n + 1, temperature=0.0, logit_bias=bias)
    total = time.perf_counter() - t0
    llama.reset()
    t1 = time.perf_counter()
    llama.create_completion(prompt_text, max_tokens=1, temperature=0.0, logit_bias=bias)
    prefill = time.perf_counter() - t1
    return (total - prefill) / n


def append_cost(model, prompt_text):
    """Seconds for an append that splits a word across two appends (re-tokenize + rollback + forward)."""
    s = DecodingSession(model.backend, prompt_text + " The lighthouse keeper")
    s.next_logprobs()
    s.append(" unbeliev")
    s.next_logprobs()
    t0 = time.perf_counter()
    s.append("ably")
    s.next_logprobs()
    split = time.perf_counter() - t0
    t0 = time.perf_counter()
    s.backend.tokenize(s.prompt + s.text)
    tok = time.perf_counter() - t0
    return split, tok


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", default=",".join(BUNDLED))
    ap.add_argument("--backends", default="transformers,llamacpp")
    a = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    rows = []
    for name in a.models.split(","):
        b = BUNDLED[name]
        if not b.installed() and not assets.assembled_path(b).is_file():
            print(f"skip {name}: not installed", file=sys.stderr)
            continue
        for kind in a.backends.split(","):
            if kind == "llamacpp" and not llamacpp.available():
                continue
            model = load_model(name, backend=kind)
            prompt_text = model.prompt_text(PROMPT, GenerationConfig())
            own_llama = None
            if kind == "llamacpp":
                from llama_cpp import Llama

                own_llama = Llama(str(assets.ensure_gguf(b)), n_ctx=2048, verbose=False, n_threads=os.cpu_count())
            own, mine = [], []
            for _ in range(a.repeats):
                if kind == "transformers":
                    own.append(own_loop_hf(model, prompt_text, a.tokens))
                else:
                    own.append(own_loop_llamacpp(own_llama, prompt_text, a.tokens, model.info.eos_token_ids))
                per, sess = session_loop(model, prompt_text, a.tokens)
                mine.append(per)
            split, tok = append_cost(model, prompt_text)
            o, m = statistics.median(own), statistics.median(mine)
            rows.append((name, kind, 1 / o, 1 / m, m / o, split * 1000, tok * 1000, sess.stats.reused_tokens))
            print(
                f"{name} {kind}: own {1 / o:.1f} tok/s, session {1 / m:.1f} tok/s, ratio {m / o:.3f}", file=sys.stderr
            )
            if own_llama is not None:
                own_llama.close()
            model.backend.close()
            del model
    print(f"tokens per run: {a.tokens}, repeats: {a.repeats} (median), threads: {os.cpu_count()}\n")
    print(
        "| model | backend | own loop tok/s | session tok/s | session time / own time | split-token append ms | re-tokenize ms |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.1f} | {r[3]:.1f} | {r[4]:.3f} | {r[5]:.1f} | {r[6]:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
