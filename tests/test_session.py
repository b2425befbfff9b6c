"""The incremental decoding state agrees with a full recomputation, whatever is appended."""

from __future__ import annotations

import random

import pytest
import torch

from fuselm.models.prefix import PrefixCache
from fuselm.models.session import DecodingSession, common_prefix_len
from fuselm.text.words import first_word_end

from .conftest import BUNDLED, requires_bundled

PIECES = [
    " the",
    " cat",
    "s",
    " sat",
    ".",
    "\n",
    "\n\n",
    " 42",
    "7",
    ",",
    " über",
    "café",
    " 東京",
    "!",
    " (x",
    ")",
    "  ",
    "\t",
    "-",
    " =",
    "'s",
    " don",
    "'t",
    " re",
    "format",
    "ting",
    " 😀",
    "é",
]
PROMPTS = ["Question: what is 6 times 7?\nAnswer:", "Once upon a time", "def add(a, b):\n    return"]


def full_logprobs(backend, ids):
    """Reference: every position's next-token log-probs from one fresh forward pass."""
    return backend.extend(backend.new_cache(), ids, all_logits=True)


def smollm_llamacpp():
    """Real SmolLM2 on llama.cpp (the tests using it are marked integration and require the package)."""
    from fuselm.models import assets, llamacpp

    if not llamacpp.available():
        pytest.skip("llama-cpp-python not installed")
    return llamacpp.LlamaCppBackend(assets.ensure_gguf(BUNDLED["smollm2-135m"]), n_ctx=1024)


def reference_score(backend, prefix: str, cand: str) -> tuple[float, int]:
    target = backend.tokenize(prefix)
    full = backend.tokenize(prefix + cand)
    k = common_prefix_len(target, full)
    lp = full_logprobs(backend, full)
    start = max(k, 1)
    return float(sum(lp[t - 1, full[t]] for t in range(start, len(full)))), len(full) - start


def state_error(backend, session: DecodingSession) -> float:
    """Largest difference between the session's next-token log-probs and a full recomputation."""
    ids = backend.tokenize(session.prompt + session.text)
    if session.committed_ids() != ids:
        return float("inf")
    return float((session.next_logprobs() - full_logprobs(backend, ids)[-1]).abs().max())


def random_walk(backend, seed: int, steps: int) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """Random appends, rollouts and scorings; returns (op, state error) after each op and
    (candidate, score error) for every scored candidate."""
    rng = random.Random(seed)
    session = DecodingSession(backend, rng.choice(PROMPTS))
    errors = [("start", state_error(backend, session))]
    score_errors: list[tuple[str, float]] = []
    for _ in range(steps):
        op = rng.choice(["append", "append", "rollout", "rollout-commit", "score", "score-commit"])
        if op == "append":
            session.append("".join(rng.choice(PIECES) for _ in range(rng.randint(1, 3))))
        elif op == "rollout":
            session.rollout(rng.randint(1, 4))
        elif op == "rollout-commit":
            roll = session.rollout(8, until=lambda r: first_word_end(r.text))
            keep = roll.text[: rng.randint(0, len(roll.text))]  # commit part of it: may split a token
            if "\ufffd" not in keep:
                session.append(keep)
        else:
            cands = rng.sample(PIECES, 3) + [""]
            scores = session.score(cands)
            for cand, sc in zip(cands, scores):
                ref, n = reference_score(backend, session.prompt + session.text, cand)
                score_errors.append((cand, abs(sc.logprob - ref) if sc.n_tokens == n else float("inf")))
            if op == "score-commit":  # the committed candidate's key/values come from the scoring pass
                session.append(rng.choice(cands[:3]))
        errors.append((op, state_error(backend, session)))
    return errors, score_errors


def assert_walks_agree(backend, seeds, steps: int, atol: float) -> None:
    ops_seen = set()
    for seed in seeds:
        errors, score_errors = random_walk(backend, seed, steps)
        assert len(errors) == steps + 1
        bad = [(op, e) for op, e in errors if not e <= atol]
        assert not bad, f"seed {seed}: state differs from full recomputation: {bad}"
        bad = [(c, e) for c, e in score_errors if not e <= max(10 * atol, 1e-4)]
        assert not bad, f"seed {seed}: candidate scores differ: {bad}"
        ops_seen |= {op for op, _ in errors}
    assert {"append", "rollout", "rollout-commit", "score", "score-commit"} <= ops_seen


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_incremental_matches_full_recomputation(tiny_backends, arch):
    if arch not in tiny_backends:
        pytest.skip(f"tokenizer for {arch} not installed")
    assert_walks_agree(tiny_backends[arch], range(6), steps=14, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_split_token_append(tiny_backends, arch):
    """Appending a word in two halves gives the same state as appending it whole."""
    if arch not in tiny_backends:
        pytest.skip(f"tokenizer for {arch} not installed")
    b = tiny_backends[arch]
    s = DecodingSession(b, "The weather today is")
    s.append(" unbeliev")
    assert state_error(b, s) <= 1e-4
    s.append("ably warm")
    assert state_error(b, s) <= 1e-4


def test_prompt_is_forwarded_once(tiny_backends):
    b = tiny_backends.get("qwen2") or next(iter(tiny_backends.values()))
    s = DecodingSession(b, "A long prompt " * 20)  # no prefix cache: it starts empty
    s.next_logprobs()
    prompt_len = len(s.committed_ids())
    assert s.stats.tokens_forwarded == prompt_len
    for word in [" one", " two", " three", " four"]:
        s.append(word)
        s.next_logprobs()
    # Only the appended words were forwarded, never the prompt again.
    assert s.stats.tokens_forwarded - prompt_len <= len(s.committed_ids()) - prompt_len + 1


def test_committing_own_rollout_costs_no_forward(tiny_backends):
    for b in tiny_backends.values():
        s = DecodingSession(b, "Once upon a time")
        roll = s.rollout(6, until=lambda r: first_word_end(r.text))
        passes = s.stats.forward_passes
        s.append(roll.text)
        s.next_logprobs()
        assert s.stats.forward_passes == passes, b.info.name  # the rollout's own tokens are kept
        s.score([" x", " y z"])  # scoring candidates that are not in the cache is one batched pass
        assert s.stats.forward_passes == passes + 1, b.info.name
        s2 = DecodingSession(b, "Once upon a time")
        roll2 = s2.rollout(6, until=lambda r: first_word_end(r.text))
        before = s2.stats.forward_passes
        assert s2.score([roll2.text])[0].n_tokens >= 1
        assert s2.stats.forward_passes == before  # own proposal scored from kept log-probs


def _commit_scored_candidate(b) -> dict[str, float]:
    """Score three candidates, commit one; what it cost and how far the state is from a full recomputation."""
    s = DecodingSession(b, "The weather today is")
    s.next_logprobs()
    s.score([" rather cold", " sunny and warm", "\nIt"])
    before = s.stats.forward_passes
    s.append(" sunny and warm")
    after = s.next_logprobs()
    return {
        "passes": s.stats.forward_passes - before,
        "adopted": s.stats.adopted_tokens,
        "state_error": state_error(b, s),
        "next_error": float((after - full_logprobs(b, b.tokenize(s.prompt + s.text))[-1]).abs().max()),
    }


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_committing_a_scored_candidate_costs_no_forward(tiny_backends, arch):
    if arch not in tiny_backends:
        pytest.skip(f"tokenizer for {arch} not installed")
    r = _commit_scored_candidate(tiny_backends[arch])
    assert r["passes"] == 0 and r["adopted"] >= 3
    assert r["state_error"] <= 1e-4 and r["next_error"] <= 1e-4


@pytest.mark.integration
@requires_bundled("smollm2-135m")
def test_llamacpp_committing_a_scored_candidate_costs_no_forward():
    r = _commit_scored_candidate(smollm_llamacpp())
    assert r["passes"] == 0 and r["adopted"] >= 3
    assert r["state_error"] <= 1e-4 and r["next_error"] <= 1e-4


def test_rollout_margins_and_eos(tiny_backends):
    b = next(iter(tiny_backends.values()))
    s = DecodingSession(b, "Hello")
    roll = s.rollout(5)
    assert len(roll.token_ids) == len(roll.token_logprobs) <= 5
    assert all(0.0 <= m <= 1.0 for m in roll.margins)
    eos = next(iter(b.info.eos_token_ids))
    s2 = DecodingSession(b, "Hello")
    ended = s2.rollout(5, first_token=eos)
    assert ended.finished and ended.token_ids == [] and ended.text == ""


def test_context_overflow_is_a_clear_error(tiny_backends):
    from fuselm.errors import FuselmError

    b = next(iter(tiny_backends.values()))
    s = DecodingSession(b, "word " * 2000)
    with pytest.raises(FuselmError, match="longer than the context"):
        s.next_logprobs()


@pytest.mark.integration
@requires_bundled("smollm2-135m")
def test_llamacpp_incremental_matches_full_recomputation():
    assert_walks_agree(smollm_llamacpp(), range(3), steps=10, atol=1e-4)


def _branch_rollout_problems(b, prompt: str) -> list[str]:
    """Differences between batched branch rollouts and one-at-a-time rollouts (empty: none)."""
    s = DecodingSession(b, prompt)
    firsts = torch.topk(s.next_logprobs(), 3).indices.tolist()

    def until(r):
        return first_word_end(r.text)

    before = s.stats.forward_passes
    batched = s.rollout_branches(firsts, 6, until=until)
    problems = []
    passes = s.stats.forward_passes - before
    if passes > max(len(r.token_ids) for r in batched):  # one pass per step, not per branch and step
        problems.append(f"{passes} passes for {[len(r.token_ids) for r in batched]} tokens")
    for t, got in zip(firsts, batched):
        ref = DecodingSession(b, prompt).rollout(6, first_token=t, until=until, margins=False)
        if (got.text, got.token_ids, got.finished) != (ref.text, ref.token_ids, ref.finished):
            problems.append(f"branch {t}: {got.text!r} != {ref.text!r}")
        elif max((abs(x - y) for x, y in zip(got.token_logprobs, ref.token_logprobs)), default=0.0) > 1e-4:
            problems.append(f"branch {t}: log-probs differ")
    if state_error(b, s) > 1e-4:
        problems.append("the session's own cache was disturbed")
    return problems


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_batched_branch_rollouts_equal_single_rollouts(tiny_backends, arch):
    if arch not in tiny_backends:
        pytest.skip(f"tokenizer for {arch} not installed")
    problems = [p for prompt in PROMPTS for p in _branch_rollout_problems(tiny_backends[arch], prompt)]
    assert problems == []


@pytest.mark.integration
@requires_bundled("smollm2-135m")
def test_llamacpp_batched_branch_rollouts():
    b = smollm_llamacpp()
    problems = [p for prompt in PROMPTS for p in _branch_rollout_problems(b, prompt)]
    assert problems == []


WARM_SHOTS = "Q: What is 2 + 2?\nA: 4\n\nQ: What is the capital of France?\nA: Paris\n\n"
WARM_PROMPTS = [WARM_SHOTS + "Q: Who wrote Hamlet?\nA:", WARM_SHOTS + "Q: Which planet is largest?\nA:"]


def _fresh_session_view(b, prompt: str, prefix: PrefixCache) -> dict:
    """Open a session on `prompt` with the prefix cache, read its first next-token log-probs, and
    close it (its cache becomes the prefix cache's)."""
    with DecodingSession(b, prompt, prefix) as s:
        lp = s.next_logprobs()
    return {"lp": lp, "cached": s.stats.cached_prompt_tokens, "forwarded": s.stats.tokens_forwarded}


@pytest.mark.integration
@requires_bundled("smollm2-135m")
def test_llamacpp_new_session_keeps_the_warm_prompt_prefix():
    b = smollm_llamacpp()
    shots, prompts = WARM_SHOTS, list(WARM_PROMPTS)
    prompts.append(prompts[-1])  # the same prompt again: everything but its last token is kept
    prompts.append("Completely different text")  # nothing in common
    refs = [full_logprobs(b, b.tokenize(p))[-1] for p in prompts]
    prefix = PrefixCache(b)
    views = [_fresh_session_view(b, p, prefix) for p in prompts]
    n_shots = len(b.tokenize(shots))
    assert views[0]["cached"] == 0
    assert views[1]["cached"] >= n_shots - 1
    assert views[2]["cached"] == len(b.tokenize(prompts[2])) - 1 and views[2]["forwarded"] == 1
    assert views[3]["cached"] <= 1  # at most the BOS
    for view, ref in zip(views, refs):
        assert torch.allclose(view["lp"], ref, atol=1e-4)
    assert b.cached_ids(b.new_cache()) == []  # a plain new cache is empty


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_transformers_new_session_keeps_the_warm_prompt_prefix(tiny_backends, arch):
    if arch not in tiny_backends:
        pytest.skip(f"tokenizer for {arch} not installed")
    b = tiny_backends[arch]
    shots, prompts = WARM_SHOTS, WARM_PROMPTS
    refs = [full_logprobs(b, b.tokenize(p))[-1] for p in prompts]
    prefix = PrefixCache(b)
    views = [_fresh_session_view(b, p, prefix) for p in prompts]
    assert views[0]["cached"] == 0 and views[1]["cached"] >= len(b.tokenize(shots)) - 1
    assert views[1]["forwarded"] == len(b.tokenize(prompts[1])) - views[1]["cached"]
    for view, ref in zip(views, refs):
        assert torch.allclose(view["lp"], ref, atol=1e-4)
    assert b.cached_ids(b.new_cache()) == []


def _walk(s: DecodingSession) -> list:
    """A few steps of what methods do with a session, returning what each step saw."""
    seen = []
    for _ in range(3):
        lp = s.next_logprobs()
        firsts = torch.topk(lp, 2).indices.tolist()
        branches = s.rollout_branches(firsts, 3, until=lambda r: first_word_end(r.text))
        scores = s.score([b.text for b in branches if b.text] or [" x"])
        seen.append(([b.text for b in branches], [round(x.logprob, 3) for x in scores]))
        s.append(branches[0].text or " x")
    return seen


def _interleaved_sessions_problems(b) -> list[str]:
    """Two sessions on one backend and one prefix cache, stepped in turn, see what each sees alone."""
    alone = []
    for prompt in WARM_PROMPTS:
        with DecodingSession(b, prompt) as s:
            alone.append(_walk(s))
    prefix = PrefixCache(b)
    with DecodingSession(b, WARM_PROMPTS[0], prefix) as s:  # leaves a warm cache behind
        s.next_logprobs()
    a, c = DecodingSession(b, WARM_PROMPTS[0], prefix), DecodingSession(b, WARM_PROMPTS[1], prefix)
    problems = []
    if a.stats.cached_prompt_tokens or c.stats.cached_prompt_tokens:
        problems.append("a session opened before the first sync reports cached tokens")
    together: list[list] = [[], []]
    for _ in range(3):  # one step each, in turn, on the same backend
        for k, s in enumerate((a, c)):
            lp = s.next_logprobs()
            firsts = torch.topk(lp, 2).indices.tolist()
            branches = s.rollout_branches(firsts, 3, until=lambda r: first_word_end(r.text))
            scores = s.score([x.text for x in branches if x.text] or [" x"])
            together[k].append(([x.text for x in branches], [round(x.logprob, 3) for x in scores]))
            s.append(branches[0].text or " x")
    if a.stats.cached_prompt_tokens == 0:
        problems.append("the first session did not start from the warm prefix")
    if c.stats.cached_prompt_tokens != 0:
        problems.append("the second session shared the warm cache the first one took")
    a.close(), c.close()
    for k in range(2):
        if together[k] != alone[k]:
            problems.append(f"session {k}: {together[k]} != {alone[k]}")
    return problems


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_two_sessions_on_one_backend_do_not_disturb_each_other(tiny_backends, arch):
    if arch not in tiny_backends:
        pytest.skip(f"tokenizer for {arch} not installed")
    assert _interleaved_sessions_problems(tiny_backends[arch]) == []


@pytest.mark.integration
@requires_bundled("smollm2-135m")
def test_two_llamacpp_sessions_on_one_model_do_not_disturb_each_other():
    from fuselm.errors import FuselmError

    b = smollm_llamacpp()
    assert _interleaved_sessions_problems(b) == []
    # A session takes its sequence when it first runs; closed sessions give theirs back: as many
    # live sessions as before, again, and no more.
    for text in ("x", "y"):
        sessions = [DecodingSession(b, text) for _ in range(4)]
        for s in sessions:
            s.next_logprobs()
        with pytest.raises(FuselmError, match="at most 4 live sessions"):
            DecodingSession(b, "z").next_logprobs()
        for s in sessions:
            s.close()
