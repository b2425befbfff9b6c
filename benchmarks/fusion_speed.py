"""Cost of fusion: AdaFuse wall time per generated token against the sum of its members'
single-model decode time per token, measured in the same run, per backend and policy.

    python benchmarks/fusion_speed.py --backend llamacpp --tokens 48 --repeats 2
    python benchmarks/fusion_speed.py --backend transformers --tokens 24 --prompts 2
    python benchmarks/fusion_speed.py --policies agree,anchored --short triviaqa --prompts 8
    python benchmarks/fusion_speed.py --threads 1 --ensembles 1     # llama.cpp experts side by side

`--threads N` gives each llama.cpp model N threads; where the ensemble's threads then fit on the
free cores, its rounds run the models side by side (fusion.experts), and each policy is also
timed in turn (one model after the other, as torch models run) in the same run. `--single-threads
M` times the members alone on their own copies with M threads each (default: `--threads`), so
that the ensemble side by side on one thread per model is set against each member alone on all
cores, the fastest way to run either here.

`--pass-cost` prints instead what one forward pass of 1, 2, 4 and 8 new tokens costs each model
(median of `--repeats`, after a 200-token prompt): the fused rounds batch several tokens into
one pass where the members alone run one token per pass, so how a pass's cost grows with its
tokens sets how far apart the two are on a given machine.

`--policies` runs AdaFuse under each policy in the same run (anchored: the anchor is the last
model of each ensemble, `--anchor` to choose; `anchored+draft8`: the anchor drafts 8 words, which
the others read in one pass each; `anchored@0.5`: theta 0.5 instead of AdaFuse's 0.7; `+ctrl`
after any of them: steered by the learned controller `--controller FILE`, e.g. `agree+ctrl`
(every scored round) against `anchored@0.8+ctrl` (only where the anchor is unsure)). The last
column is the cost per token against the anchor (or last member) alone. With
`--repeats R` the ratio's range over the R passes through the prompts is printed beside it: the
spread of this machine's timings. `--short TASK` uses the task's few-shot prompts
(rows of its test file) and its stop strings and token budget: short answers. Each prompt is
run once untimed by every member first, so the prompt is in every model's prefix cache and the
timed runs (singles and fused alike) exclude its prefill.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from fuselm.config import GenerationConfig  # noqa: E402
from fuselm.fusion.loop import generate  # noqa: E402
from fuselm.models.backend import side_by_side  # noqa: E402
from fuselm.models.loading import load_model  # noqa: E402
from fuselm.text.words import split_words  # noqa: E402

PROMPTS = [
    "Explain in three sentences why the sky is blue.",
    "Write a short paragraph about the history of Paris.",
    "List three tips for writing readable Python code.",
    "What happens to water when it freezes? Answer briefly.",
]
ENSEMBLES = [["smollm2-135m", "qwen2.5-coder-0.5b"], ["smollm2-135m", "qwen2.5-coder-0.5b", "gemma3-270m"]]


def task_prompts(task_name: str, n: int) -> tuple[list[str], GenerationConfig]:
    """The first `n` few-shot prompts of a task's test file, with its stops and token budget."""
    from fuselm.eval.runner import task_generation
    from fuselm.eval.task import default_data_dir, load_rows
    from fuselm.eval.tasks import get_task

    task = get_task(task_name)
    data_dir = default_data_dir()
    prefix = task.prompt_prefix(data_dir)
    rows = load_rows(task, None, data_dir)[:n]
    return [task.build_prompt(prefix, r) for r in rows], task_generation(task, GenerationConfig(), set())


def per_token(result) -> float:
    return result.stats.seconds / max(result.stats.new_tokens, 1)


def pass_cost(a) -> int:
    """Milliseconds of one pass of k new tokens after a prompt, per model (median of repeats)."""
    import statistics
    import time

    names = list(dict.fromkeys(n for e in ENSEMBLES[: a.ensembles] for n in e))
    sizes = [1, 2, 4, 8]
    print(f"backend: {a.backend}, threads per model: {a.threads or 'all'}, median of {max(a.repeats, 3)}\n")
    print("| model | " + " | ".join(f"{k} token{'s' * (k > 1)}" for k in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for name in names:
        backend = load_model(name, backend=a.backend, threads=a.threads).backend
        prompt = backend.tokenize(" ".join(PROMPTS) * 8)[:200]
        cache = backend.new_cache()
        backend.extend(cache, prompt)
        cells = []
        for k in sizes:
            times = []
            for _ in range(max(a.repeats, 3)):
                t = time.perf_counter()
                backend.extend(cache, prompt[:k])  # k more tokens, as a scoring pass runs them
                times.append(time.perf_counter() - t)
                backend.truncate(cache, len(prompt))
            cells.append(f"{1000 * statistics.median(times):.0f} ms")
        backend.release(cache)
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="llamacpp")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--prompts", type=int, default=len(PROMPTS), help="how many of the built-in prompts")
    ap.add_argument("--repeats", type=int, default=1, help="runs per prompt (single and fused interleaved)")
    ap.add_argument("--policies", default="agree", help="AdaFuse policies to time, comma-separated")
    ap.add_argument("--anchor", help="policy anchored: the anchor (default: each ensemble's last model)")
    ap.add_argument("--short", metavar="TASK", help="few-shot prompts of TASK (short answers), e.g. triviaqa")
    ap.add_argument("--ensembles", type=int, default=len(ENSEMBLES), help="how many of the built-in ensembles")
    ap.add_argument("--threads", type=int, help="threads of each llama.cpp model (default: all usable)")
    ap.add_argument("--single-threads", type=int, help="threads of each member timed alone (default: --threads)")
    ap.add_argument("--pass-cost", action="store_true", help="time passes of 1-8 tokens per model instead")
    ap.add_argument("--controller", help="a controller file (`fuselm train-controller`) for policies with +ctrl")
    a = ap.parse_args()
    if a.pass_cost:
        return pass_cost(a)
    gen = GenerationConfig(max_new_tokens=a.tokens)
    prompts = PROMPTS[: a.prompts]
    if a.short:
        prompts, gen = task_prompts(a.short, a.prompts)
    prompts = prompts * a.repeats
    policies = a.policies.split(",")
    cache = {}
    rows = []
    for names in ENSEMBLES[: a.ensembles]:
        models = [cache.setdefault(n, load_model(n, backend=a.backend, threads=a.threads)) for n in names]
        alone = models  # the members timed alone: the same objects unless --single-threads differs
        if a.single_threads is not None and a.single_threads != a.threads:
            alone = [cache.setdefault((n, "alone"), load_model(n, backend=a.backend, threads=a.single_threads))
                     for n in names]  # fmt: skip
        backends = [m.backend for m in models]
        apart = side_by_side(backends)
        runs = [(p, True) for p in policies] + ([(p, False) for p in policies] if apart else [])
        # seconds per token summed per pass through the prompts (pass r: prompts r*n .. r*n+n-1)
        single_by = [0.0] * a.repeats
        anchor_by = [0.0] * a.repeats  # the anchor alone (the last member unless --anchor)
        anchor_name = a.anchor or names[-1]
        fused_by = {run: [0.0] * a.repeats for run in runs}
        passes = dict.fromkeys(runs, 0)
        words = dict.fromkeys(runs, 0)
        for i, prompt in enumerate(prompts):
            rep = i // max(len(prompts) // a.repeats, 1)
            if a.short:  # the prompt into every prefix cache: no prefill in the timed runs
                for m in {id(m): m for m in models + alone}.values():
                    generate([m], prompt, "single", gen)
            # Singles and the ensemble alternate, so drifts in machine speed hit both sides alike.
            for name, m in zip(names, alone):
                t = per_token(generate([m], prompt, "single", gen))
                single_by[rep] += t
                if name == anchor_name:
                    anchor_by[rep] += t
            for run in runs:
                policy, together = run
                steered = policy.endswith("+ctrl")
                base, _, draft = policy.removesuffix("+ctrl").partition("+draft")
                base, _, theta = base.partition("@")
                opts = {"policy": base}
                if theta:
                    opts["theta"] = float(theta)
                if base == "anchored":
                    opts["anchor"] = a.anchor or names[-1]
                if draft:
                    opts["draft_words"] = int(draft)
                if steered:
                    if not a.controller:
                        ap.error(f"policy {policy}: give --controller FILE")
                    opts["controller"] = a.controller
                threads = [b.threads_apart for b in backends]
                if not together:  # as a torch model: the calling thread, one model after the other
                    for b in backends:
                        b.threads_apart = None
                res = generate(models, prompt, "adafuse", gen, opts)
                for b, t in zip(backends, threads):
                    b.threads_apart = t
                fused_by[run][rep] += per_token(res)
                passes[run] += sum(res.stats.forward_passes.values())
                words[run] += max(len(split_words(res.text)), 1)
                print(f"{'+'.join(names)} {policy}: {res.text[:80]!r}", file=sys.stderr)
        k = len(prompts)
        single_sum = sum(single_by)
        for run in runs:
            label = run[0] + ("" if not apart else " side by side" if run[1] else " in turn")
            each_ratio = [f / s for f, s in zip(fused_by[run], single_by) if s]
            spread = f" ({min(each_ratio):.2f}-{max(each_ratio):.2f})" if a.repeats > 1 and each_ratio else ""
            fused = sum(fused_by[run])
            rows.append(("+".join(names), label, single_sum / k, fused / k, f"{fused / single_sum:.2f}{spread}",
                         passes[run] / words[run], fused / max(sum(anchor_by), 1e-9)))  # fmt: skip
    print(
        f"backend: {a.backend}, max_new_tokens: {gen.max_new_tokens}, prompts: {a.prompts} x {a.repeats}"
        f"{' (' + a.short + ', short answers)' if a.short else ''}, cores: {os.cpu_count()},"
        f" threads per model: {a.threads or 'all'}"
        f"{'' if a.single_threads is None else f', alone: {a.single_threads}'}\n"
    )
    print(
        f"| ensemble | policy | sum of members' single s/token | AdaFuse s/token | ratio{' (range)' if a.repeats > 1 else ''} |"
        " forward passes per committed word (all models) | against the anchor alone |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.3f} | {r[3]:.3f} | {r[4]} | {r[5]:.1f} | {r[6]:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
