"""Ensemble methods: agreement with single-model greedy, exact cross-tokenizer scoring,
AdaFuse's confident/uncertain branching and tie-breaking on models with constructed weights."""

from __future__ import annotations

import html as html_lib
import json
import math
import re

import pytest
import torch

from fuselm import Ensemble, GenerationConfig
from fuselm.errors import FuselmError
from fuselm.fusion.loop import decode, generate
from fuselm.fusion.methods import build_method
from fuselm.models import assets, llamacpp
from fuselm.models.catalog import BUNDLED
from fuselm.models.loading import Model
from fuselm.models.session import DecodingSession, common_prefix_len

from .conftest import run_cli
from .support import as_model, constant_model

# --- in-process experts side by side ----------------------------------------------------------------


@pytest.mark.integration
def test_llamacpp_experts_on_a_thread_each_run_side_by_side_with_the_same_text():
    """Two llama.cpp models of one thread each on a machine with two free cores: a round's calls
    run at once (on pool threads, overlapping), and AdaFuse gives the text it gives in turn."""
    import threading
    import time

    from fuselm.fusion.base import StepContext
    from fuselm.fusion.experts import each
    from fuselm.models.backend import side_by_side, usable_cpus
    from fuselm.sampling import Sampler

    if not llamacpp.available() or not BUNDLED["smollm2-135m"].installed():
        pytest.skip("needs llama-cpp-python and the smollm2 package")
    if usable_cpus() < 2:
        pytest.skip("needs two cores")
    gguf = assets.ensure_gguf(BUNDLED["smollm2-135m"])
    backends = [llamacpp.LlamaCppBackend(gguf, name=n, n_ctx=1024, n_threads=1) for n in ("smol-a", "smol-b")]
    models = [as_model(b) for b in backends]
    try:
        assert side_by_side(backends) and not side_by_side([backends[0], backends[0]])
        gen = GenerationConfig(max_new_tokens=16)

        def spans(sessions) -> dict[int, tuple[str, float, float, str]]:
            ctx = StepContext(sessions, 16, "", 1, gen, Sampler())

            def roll(m, s):
                t0 = time.perf_counter()
                text = s.rollout(12).text
                return threading.current_thread().name, t0, time.perf_counter(), text

            return each(ctx, roll)

        prompt = "Write one sentence about the sea."
        with DecodingSession(backends[0], prompt) as sa, DecodingSession(backends[1], prompt) as sb:
            (na, a0, a1, ta), (nb, b0, b1, tb) = spans([sa, sb]).values()
        assert na.startswith("fuselm-expert") and nb.startswith("fuselm-expert")
        assert a0 < b1 and b0 < a1, "the two rollouts did not overlap"
        assert ta == tb  # one model's weights twice: the same greedy text
        side = generate(models, "What is the capital of France?", "adafuse", gen)
        for b in backends:
            b.threads_apart = None  # as a torch model: in turn, on the calling thread
        with DecodingSession(backends[0], prompt) as sa, DecodingSession(backends[1], prompt) as sb:
            (na, a0, a1, _), (nb, b0, b1, _) = spans([sa, sb]).values()
        assert na == nb == threading.current_thread().name and (a1 <= b0 or b1 <= a0)
        in_turn = generate(models, "What is the capital of France?", "adafuse", gen)
        assert side.text == in_turn.text and side.text
        assert [t.candidates for t in side.trace] == [t.candidates for t in in_turn.trace]
    finally:
        for b in backends:
            b.close()


@pytest.mark.integration
def test_prompt_nll_of_a_prompt_longer_than_one_candidate_is_its_whole_log_likelihood(smollm_llamacpp):
    """Per-prompt weights score a few-shot prompt of more than 512 tokens (llama.cpp's limit for
    one candidate) in pieces: the same NLL per byte as summing every token's log-prob after the
    first word from one pass over the whole prompt."""
    from fuselm.fusion.ensemble import prompt_nll
    from fuselm.text.words import first_word_end

    prompt = " ".join(f"Question {i}: how many legs do {i} spiders have? Answer: {8 * i}." for i in range(40))
    backend = smollm_llamacpp.backend
    ids = backend.tokenize(prompt)
    assert 600 < len(ids) < 1000  # more than one candidate may be, within the fixture's context
    head = len(backend.tokenize(prompt[: first_word_end(prompt)]))
    cache = backend.new_cache()
    try:
        rows = backend.extend(cache, ids, all_logits=True)  # row i: log-probs after ids[: i + 1]
        logprob = sum(float(rows[i - 1][ids[i]]) for i in range(head, len(ids)))
    finally:
        backend.release(cache)
    n_bytes = len(prompt[first_word_end(prompt) :].encode())
    assert prompt_nll(smollm_llamacpp, prompt) == pytest.approx(-logprob / n_bytes, rel=2e-3)


# --- identical models reproduce single-model greedy -------------------------------------------------


@pytest.fixture(scope="module")
def smollm_llamacpp():
    if not llamacpp.available() or not BUNDLED["smollm2-135m"].installed():
        pytest.skip("needs llama-cpp-python and the smollm2 package")
    backend = llamacpp.LlamaCppBackend(assets.ensure_gguf(BUNDLED["smollm2-135m"]), name="smollm2-135m", n_ctx=1024)
    return as_model(backend)


@pytest.mark.integration
@pytest.mark.parametrize(
    "method, options",
    [
        ("adafuse", {"branches": 1}),
        ("fixed-span", {}),
        ("fixed-span", {"n_words": 3}),
        ("token-average", {}),
        ("unite", {}),
        ("sequence-select", {}),
    ],
)
def test_identical_models_reproduce_single_greedy(smollm_llamacpp, method, options):
    gen = GenerationConfig(max_new_tokens=24)
    for prompt in ["What is the capital of France?", "List three colours."]:
        single = generate([smollm_llamacpp], prompt, "single", gen)
        fused = generate([smollm_llamacpp, smollm_llamacpp], prompt, method, gen, options)
        n = min(len(single.text), len(fused.text))
        assert fused.text[:n] == single.text[:n], (method, single.text, fused.text)
        assert n >= min(len(single.text), 40)
        if method != "token-average" and method != "unite" and single.finish_reason == fused.finish_reason == "eos":
            # A word-level step charges the tokens of its text against max_new_tokens, not the
            # lookahead token that showed the word's end (token-level methods also count the EOS).
            assert fused.stats.new_tokens == single.stats.new_tokens


@pytest.mark.integration
def test_identical_models_adafuse_default_confident_rounds_follow_greedy(smollm_llamacpp):
    """With diversity on, every round the ensemble called confident commits the shared greedy span."""
    res = generate(
        [smollm_llamacpp, smollm_llamacpp],
        "What is the capital of France?",
        "adafuse",
        GenerationConfig(max_new_tokens=24),
    )
    for t in res.trace:
        if t.confident:
            assert len(t.candidates) == 1 and t.candidates[0].kind == "proposal"


# --- cross-tokenizer scoring --------------------------------------------------------------------------

CANDIDATES = [" 42", "\n\nYes", ", well", "7", "-x", " café", "?!", "\tend"]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_candidate_score_is_full_minus_prefix(tiny_backends, arch):
    if arch not in tiny_backends:
        pytest.skip(f"{arch} tokenizer not installed")
    b = tiny_backends[arch]
    prefix = "Question: how many?\nThe answer is"
    s = DecodingSession(b, prefix)
    scores = s.score(CANDIDATES)
    pre = b.tokenize(prefix)
    for cand, sc in zip(CANDIDATES, scores):
        full = b.tokenize(prefix + cand)
        lp = b.extend(b.new_cache(), full, all_logits=True)

        def loglik(ids, lp=lp):
            return float(sum(lp[t - 1, ids[t]] for t in range(1, len(ids))))

        k = common_prefix_len(pre, full)
        if k == len(pre):
            expected = loglik(full) - loglik(pre)
        else:  # the candidate merged with the last prefix token: scored from the common prefix
            expected = loglik(full) - loglik(full[:k])
        assert sc.logprob == pytest.approx(expected, abs=1e-4), cand
        assert sc.n_tokens == len(full) - k


# --- constructed models: a fixed next-token distribution --------------------------------------------


def test_constant_model_distribution(smol_tokenizer_dir):
    m = constant_model(smol_tokenizer_dir, {" a": 5.0, " b": 3.0}, "c")
    lp = DecodingSession(m.backend, "x y").next_logprobs()
    top = torch.topk(lp, 2)
    assert m.backend.decode([int(top.indices[0])]) == " a"
    assert float(top.values[0].exp()) == pytest.approx(torch.softmax(torch.tensor([5.0, 3.0]), 0)[0].item(), abs=1e-3)


def test_a_stop_string_across_steps_is_cut_where_it_begins(smol_tokenizer_dir):
    """A stop that begins in text committed by earlier steps is removed with them (HumanEval's
    "\\ndef " arrives as "\\n", "def", " name": none of "def" may stay in the output)."""
    m = constant_model(smol_tokenizer_dir, {" a": 8.0, " b": 1.0}, "sure")  # greedy: " a a a ..."
    streamed: list[str] = []
    gen = GenerationConfig(max_new_tokens=8, chat="raw", stop=["a a"])
    res = generate([m], "start", "single", gen, on_text=streamed.append)
    assert res.text == " " and res.finish_reason == "stop"
    assert "".join(streamed) == res.text
    res = generate([m], "start", "single", GenerationConfig(max_new_tokens=8, chat="raw", stop=["b"]))
    assert res.text == " a" * 8 and res.finish_reason == "length"


def test_streamed_spans_carry_the_winner_of_each_piece(smol_tokenizer_dir):
    """`on_spans` cuts the streamed text by the model whose proposal won it: joined, the spans
    are the answer; each piece's source is its step's source in the trace; a stop cut applies."""
    a = constant_model(smol_tokenizer_dir, {" a": 2.0, " b": 1.9}, "a-ish")
    b = constant_model(smol_tokenizer_dir, {" b": 2.0, " a": 1.5}, "b-ish")
    spans, texts = [], []
    gen = GenerationConfig(max_new_tokens=6, chat="raw")
    res = generate([a, b], "start", "adafuse", gen, on_text=texts.append)
    method = build_method("adafuse", [a, b])
    res2 = decode(method, "start", gen, on_spans=spans.extend)
    assert res2.text == res.text == "".join(texts) == "".join(s.text for s in spans)
    by_char = [st.source for st in res2.trace for _ in st.text]
    assert [s.source for s in spans for _ in s.text] == by_char
    assert {s.source for s in spans} <= {"a-ish", "b-ish"} and len(spans) >= 1
    spans.clear()
    stop = res.text[-3:]
    cut = decode(method, "start", gen.model_copy(update={"stop": [stop]}), on_spans=spans.extend)
    assert cut.finish_reason == "stop" and "".join(s.text for s in spans) == cut.text
    assert cut.text == res.text[: res.text.find(stop)]


def adafuse(models, prompt="start", max_new_tokens=6, **opts):
    return generate(models, prompt, "adafuse", GenerationConfig(max_new_tokens=max_new_tokens, chat="raw"), opts)


def test_confident_model_commits_long_spans_without_scoring(smol_tokenizer_dir):
    m = constant_model(smol_tokenizer_dir, {" a": 8.0, " b": 1.0}, "sure")  # margin ~0.999
    res = adafuse([m], max_new_tokens=9)
    first = res.trace[0]
    assert first.confident and first.text == " a a a"  # max_words = 3
    assert len(first.candidates) == 1 and first.candidates[0].nll is None
    res2 = adafuse([m], max_new_tokens=9, max_words=2)
    assert res2.trace[0].text == " a a"


def test_uncertain_model_branches_on_top_b(smol_tokenizer_dir):
    m = constant_model(smol_tokenizer_dir, {" a": 2.0, " b": 1.9, " c": 1.8, " d": 1.0}, "unsure")
    res = adafuse([m], max_new_tokens=4)
    first = res.trace[0]
    assert not first.confident
    kinds = [c.kind for c in first.candidates]
    assert kinds == ["proposal", "branch", "branch"]  # B = 3: the proposal and two alternatives
    assert [c.text for c in first.candidates] == [" a", " b", " c"]
    assert first.text == " a"  # one word only when uncertain
    assert len(adafuse([m], branches=4).trace[0].candidates) == 4
    assert adafuse([m], branches=1).trace[0].confident  # a single candidate needs no scoring


def test_threshold_decides_confidence(smol_tokenizer_dir):
    m = constant_model(smol_tokenizer_dir, {" a": 3.0, " b": 1.0}, "mid")  # margin ~0.75
    assert adafuse([m], theta=0.7).trace[0].confident
    assert not adafuse([m], theta=0.8).trace[0].confident


def test_ties_go_to_the_earlier_candidate(smol_tokenizer_dir):
    x = constant_model(smol_tokenizer_dir, {" a": 2.0, " b": 1.0}, "x")
    y = constant_model(smol_tokenizer_dir, {" b": 2.0, " a": 1.0}, "y")
    res = adafuse([x, y], max_new_tokens=2, branches=1)
    first = res.trace[0]
    scores = [c.score for c in first.candidates]
    assert scores[0] == scores[1]  # symmetric models: an exact tie
    assert first.winner == 0 and first.text == " a"
    res = adafuse([y, x], max_new_tokens=2, branches=1)
    assert res.trace[0].text == " b"


def test_weights_break_the_symmetry(smol_tokenizer_dir):
    x = constant_model(smol_tokenizer_dir, {" a": 2.0, " b": 1.0}, "x")
    y = constant_model(smol_tokenizer_dir, {" b": 2.0, " a": 1.0}, "y")
    assert adafuse([x, y], max_new_tokens=2, branches=1, weights=[1, 3]).trace[0].text == " b"
    with pytest.raises(FuselmError, match="weights"):
        adafuse([x, y], weights=[1])


def test_token_average_refuses_different_vocabularies(tiny_backends):
    if {"llama", "qwen2"} - set(tiny_backends):
        pytest.skip("needs two tokenizers")
    with pytest.raises(FuselmError, match="one vocabulary"):
        generate([as_model(tiny_backends["llama"]), as_model(tiny_backends["qwen2"])], "hi", "token-average")


def test_method_model_counts_and_options():
    with pytest.raises(FuselmError, match="single"):
        Ensemble(["smollm2-135m", "smollm2-135m"], method="single")
    with pytest.raises(Exception, match="theta"):
        Ensemble(["smollm2-135m"], method="adafuse", theta=2.0)


def test_cross_tokenizer_adafuse_cli_trace_and_html(tiny_dirs, tmp_path):
    if len(tiny_dirs) < 2:
        pytest.skip("needs two tokenizers")
    names = ",".join(str(d) for d in list(tiny_dirs.values())[:3])
    html = tmp_path / "out.html"
    proc = run_cli(
        "generate",
        "--models",
        names,
        "--method",
        "adafuse",
        "--raw",
        "--max-new-tokens",
        "12",
        "--json",
        "--html",
        str(html),
        "The weather is",
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["method"] == "adafuse" and len(out["models"]) == len(tiny_dirs)
    assert out["trace"], "adafuse records one trace entry per round"
    joined = "".join(t["text"] for t in out["trace"])
    assert joined.startswith(out["text"])
    for t in out["trace"]:
        assert {"round", "confident", "margins", "candidates", "winner", "text", "source"} <= set(t)
        assert 0 <= t["winner"] < len(t["candidates"])
    assert abs(sum(out["stats"]["text_share"].values()) - 1) < 1e-3 or not out["text"]
    page = html.read_text()
    assert page.count('class="s"') >= len([t for t in out["trace"] if t["text"]])
    assert "hover" in page


@pytest.mark.parametrize("method", ["single", "adafuse", "fixed-span", "sequence-select", "token-average", "unite"])
def test_every_method_traces_each_step_and_renders_coloured(method, tiny_dirs):
    """Every step of every method is in the trace with its text and source, and the HTML view
    colours all of the answer by the model that won each span."""
    from fuselm.models.hf import TransformersBackend
    from fuselm.viz import PALETTE, render_html

    if "llama" not in tiny_dirs:
        pytest.skip("needs the smollm2 tokenizer")
    # two models with one vocabulary, so that every method can run them (token-average needs it)
    models = [as_model(TransformersBackend.from_directory(tiny_dirs["llama"], name=f"tiny-{k}")) for k in "ab"]
    if method == "single":
        models = models[:1]
    res = generate(models, "The weather is", method, GenerationConfig(max_new_tokens=10, chat="raw"))
    assert res.text and res.trace and res.stats.rounds == len(res.trace)
    assert [t.round for t in res.trace] == list(range(1, len(res.trace) + 1))
    assert all(t.source in res.stats.text_share for t in res.trace)
    assert "".join(t.text for t in res.trace).startswith(res.text)
    page = render_html(res)
    coloured = re.findall(r'<span class="s" style="background:(#\w+)" title="[^"]*">([^<]*)</span>', page)
    assert coloured and all(c in PALETTE for c, _ in coloured)
    assert "".join(text for _, text in coloured) == html_lib.escape(res.text)


# --- a warm prompt prefix changes nothing ------------------------------------------------------------

SHOTS = "Q: What is 2 + 2?\nA: 4\n\nQ: Who painted the Mona Lisa?\nA: Leonardo da Vinci\n\n"
QUESTIONS = ["Q: What is the capital of Italy?\nA:", "Q: How many legs has a spider?\nA:", "Q: Who wrote Hamlet?\nA:"]


def _tiny_pair(tiny_dirs) -> list[Model]:
    from fuselm.models.hf import TransformersBackend

    if not {"llama", "qwen2"} <= tiny_dirs.keys():
        pytest.skip("needs the smollm2 and qwen tokenizers")
    return [as_model(TransformersBackend.from_directory(tiny_dirs[a], name=f"tiny-{a}")) for a in ("llama", "qwen2")]


@pytest.mark.parametrize("method", ["single", "adafuse", "unite"])
def test_warm_prompt_prefix_gives_the_texts_of_cold_starts(method, tiny_dirs):
    """Prompts sharing a few-shot prefix, one after the other on the same loaded models (each
    session keeps the last one's prefix) give exactly the texts of fresh models per prompt.

    On transformers, where a kept prefix computes what a fresh prefill does (to float32
    rounding). llama.cpp 0.3.36's logits depend slightly on what its cache held before (seen
    here: a prompt run after truncating a longer one came out up to 0.77 nats from a fresh
    prefill on single tokens of SmolLM2's vocabulary), so exact texts are not promised there."""
    gen = GenerationConfig(max_new_tokens=12, stop=["\n"], chat="raw")
    warm_models = _tiny_pair(tiny_dirs)
    if method == "single":
        warm_models = warm_models[:1]
    warm = [generate(warm_models, SHOTS + q, method, gen) for q in QUESTIONS]
    cold = []
    for q in QUESTIONS:
        fresh = _tiny_pair(tiny_dirs)[: len(warm_models)]
        cold.append(generate(fresh, SHOTS + q, method, gen))
    assert [r.text for r in warm] == [r.text for r in cold]
    assert all(r.text for r in warm)
    for r in warm[1:]:
        for m in warm_models:  # each model kept (about) the shots in its own tokens
            assert r.stats.cached_prompt_tokens[m.name] >= len(m.backend.tokenize(SHOTS)) - 1
    assert all(n == 0 for r in cold for n in r.stats.cached_prompt_tokens.values())


def test_a_top_k_mixture_keeps_the_greedy_choice_of_the_whole_one():
    """token-average over top-k only (models on engines): the union of the known tokens, every
    other token at probability 0; its argmax is the whole mixture's when the winner is known."""
    from fuselm.fusion.token_average import mix, mix_tokens
    from fuselm.models.session import NextTokens

    torch.manual_seed(0)
    full = [torch.log_softmax(torch.randn(500) * 3, 0) for _ in range(2)]
    tops = [NextTokens(top=dict(zip(*[x.tolist() for x in reversed(torch.topk(f, 20))]))) for f in full]
    exact = mix(full, [2.0, 1.0])
    approx = mix_tokens(tops, [2.0, 1.0])
    assert int(approx.argmax()) == int(exact.argmax())
    known = [t for t in range(len(approx)) if approx[t] > -float("inf")]
    assert set(known) == {t for d in tops for t in d.top}
    for t in known:  # a lower bound of the whole mixture: the missing mass counts as 0
        assert float(approx[t]) <= float(exact[t]) + 1e-5
    assert mix_tokens([NextTokens(full=f) for f in full], [2.0, 1.0]).equal(exact)


def test_a_top_k_read_as_a_whole_distribution_keeps_its_mass_and_order():
    """FusionRoute on an engine: the top-k as given, the rest of the mass spread over the other
    tokens, never above the k-th; a whole distribution is returned as it is."""
    from fuselm.models.session import NextTokens

    torch.manual_seed(0)
    full = torch.log_softmax(torch.randn(500) * 3, 0)
    values, ids = torch.topk(full, 20)
    dense = NextTokens(top=dict(zip(ids.tolist(), values.tolist()))).dense(500)
    assert dense[ids].equal(values)
    assert float(dense.exp().sum()) == pytest.approx(1.0, abs=1e-4)
    others = torch.ones(500, dtype=torch.bool)
    others[ids] = False
    assert dense[others].unique().numel() == 1 and float(dense[others][0]) <= float(values.min())
    assert int(dense.argmax()) == int(full.argmax())
    flat = NextTokens(top={t: math.log(0.04) for t in range(20)}).dense(30)  # 0.2 left for 10 tokens
    assert float(flat[25]) == pytest.approx(math.log(0.02))
    peaked = NextTokens(top={0: math.log(0.5), 1: math.log(0.001)}).dense(3)  # 0.499 left: capped at the 2nd
    assert float(peaked[2]) == pytest.approx(math.log(0.001))
    assert NextTokens(full=full).dense(500) is full


def test_a_cancel_check_stops_a_step_between_its_model_calls(tiny_backends):
    """sequence-select decodes the whole answer in one step: the caller's check is asked before
    each model call inside it (`fuselm.cancel`), so the generation stops in the middle of the
    step; without the check the same step runs to the end."""
    from fuselm.cancel import GenerationCancelled

    if not {"llama", "qwen2"} <= tiny_backends.keys():
        pytest.skip("needs the smollm2 and qwen tokenizers")
    models = [Model(tiny_backends["llama"]), Model(tiny_backends["qwen2"])]
    built = build_method("sequence-select", models)
    gen = GenerationConfig(max_new_tokens=30, chat="raw")
    try:
        whole = decode(built, "Once upon a time", gen)
        assert whole.stats.rounds == 1 and sum(whole.stats.forward_passes.values()) > 10
        asked: list[int] = []

        def check() -> bool:
            asked.append(1)
            return len(asked) > 4  # the loop asks once before the step, then each model call

        with pytest.raises(GenerationCancelled):
            decode(built, "Once upon a time", gen, cancel=check)
        assert len(asked) == 5
    finally:
        built.close()


@pytest.mark.parametrize(
    "options, field",
    [
        ({"weights": [float("nan"), 1.0]}, "weights.0"),
        ({"weights": [1.0, float("inf")]}, "weights.1"),
        ({"weights": [1e308, 1e308]}, "weights.0"),  # their sum overflows: the average would be NaN
        ({"override_margin": float("inf")}, "override_margin"),
        ({"prompt_weights": float("nan")}, "prompt_weights"),
    ],
)
def test_option_numbers_must_be_finite_and_weights_bounded(options, field):
    from fuselm.fusion.methods import method_options

    for method in ("adafuse", "token-average"):
        if method == "token-average" and "override_margin" in options:
            continue
        with pytest.raises(FuselmError, match=rf"options of method '{method}': {re.escape(field)}: "):
            method_options(method, options)
