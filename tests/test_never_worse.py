"""Fusion that never loses to its best member: anchored AdaFuse, on constructed models whose
next-token distributions are fixed (tests/test_fusion.py's `constant_model`)."""

from __future__ import annotations

import pytest

from fuselm import GenerationConfig
from fuselm.errors import FuselmError
from fuselm.fusion.loop import generate

from .test_fusion import as_model, constant_model, smol_tokenizer_dir  # noqa: F401 - the fixture


def anchored(models, max_new_tokens=6, **opts):
    gen = GenerationConfig(max_new_tokens=max_new_tokens, chat="raw")
    return generate(models, "start", "adafuse", gen, {"policy": "anchored", **opts})


def test_a_confident_anchor_commits_alone_and_the_others_are_never_asked(smol_tokenizer_dir):  # noqa: F811
    sure = constant_model(smol_tokenizer_dir, {" a": 8.0, " b": 1.0}, "sure")
    other = constant_model(smol_tokenizer_dir, {" b": 8.0, " a": 1.0}, "other")
    res = anchored([sure, other], max_new_tokens=9)
    assert res.text == " a" * 9 and all(t.confident and t.source == "sure" for t in res.trace)
    assert res.stats.forward_passes["other"] == 0  # it only read the committed text, lazily
    # the same models with the anchor named: the other one decides now
    res = anchored([sure, other], max_new_tokens=3, anchor="other")
    assert res.text == " b b b" and res.trace[0].margins == {"other": pytest.approx(0.998, abs=1e-3)}


def test_an_unsure_anchor_is_overridden_only_by_the_margin(smol_tokenizer_dir):  # noqa: F811
    unsure = constant_model(smol_tokenizer_dir, {" a": 2.0, " b": 1.9, " c": 0.5}, "unsure")
    sure = constant_model(smol_tokenizer_dir, {" b": 6.0, " a": 1.0}, "sure")
    first = anchored([unsure, sure], max_new_tokens=2).trace[0]
    assert not first.confident and first.overridden and first.text.startswith(" b")
    own = next(c for c in first.candidates if c.kind == "proposal" and "unsure" in c.proposers)
    assert own.text == " a" and first.candidates[first.winner].score < own.score
    gap = own.score - first.candidates[first.winner].score
    kept = anchored([unsure, sure], max_new_tokens=2, override_margin=gap + 0.01).trace[0]
    assert kept.text == " a" and kept.overridden is False and kept.source == "unsure"
    # the equal vote of policy "agree" picks the same candidate as the overriding anchor above
    agree = generate([unsure, sure], "start", "adafuse", GenerationConfig(max_new_tokens=2, chat="raw"))
    assert agree.trace[0].text == first.text and agree.trace[0].overridden is None


def test_the_anchor_must_be_one_of_the_models(smol_tokenizer_dir):  # noqa: F811
    a = constant_model(smol_tokenizer_dir, {" a": 8.0, " b": 1.0}, "alpha")
    b = constant_model(smol_tokenizer_dir, {" b": 8.0, " a": 1.0}, "beta")
    with pytest.raises(FuselmError, match="Did you mean 'alpha'"):
        anchored([a, b], anchor="alpah")
    with pytest.raises(FuselmError, match="0..1"):
        anchored([a, b], anchor=2)
    assert anchored([a, b], max_new_tokens=1, anchor=1).text == " b"


@pytest.mark.parametrize("options", [{}, {"anchor": 1, "theta": 1.0}])
def test_anchored_fusion_of_identical_models_is_the_single_greedy_text(tiny_backends, options):
    """With theta 1.0 the anchor is unsure (but where its top-2 has no mass), so both models propose; being the same model, they
    propose the same word, which is committed unscored: the anchor's greedy text, unchanged.
    (The llama tiny model: a random byte-level model's greedy text cuts UTF-8 characters, which
    no word-level method commits as the token stream does.)"""
    if "llama" not in tiny_backends:
        pytest.skip("the llama tokenizer (smollm2) is not installed")
    m = as_model(tiny_backends["llama"])
    gen = GenerationConfig(max_new_tokens=20, chat="raw")
    for prompt in ["The capital of France is", "def add(a, b):"]:
        single = generate([m], prompt, "single", gen)
        fused = generate([m, m], prompt, "adafuse", gen, {"policy": "anchored", **options})
        assert fused.text == single.text and fused.finish_reason == single.finish_reason
        assert all(len(t.candidates) == 1 and not t.overridden for t in fused.trace)
        if options:  # rounds where the anchor was unsure asked both models
            assert any(len(t.margins or {}) == 2 for t in fused.trace)
