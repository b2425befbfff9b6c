"""Words, stop strings and token choice."""

from __future__ import annotations

import doctest

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fuselm.sampling
import fuselm.text.words
from fuselm.eval import flores_spm, metrics
from fuselm.sampling import Sampler, Temperature, TopK, TopP
from fuselm.text.words import earliest_stop, first_word_end, split_words, take_words

TEXT = st.lists(st.sampled_from(list("ab ,.\n\t-=+7é東😀") + ["\r\n", "  ", "\u00a0"]), max_size=40).map("".join)


@given(TEXT)
def test_split_join_loses_nothing(text):
    words = split_words(text)
    assert "".join(words) == text
    assert all(w for w in words)
    # every piece but a trailing whitespace one ends in a non-space character
    assert all(not w[-1].isspace() for w in words[:-1])


@given(TEXT, st.integers(0, 5))
def test_take_words_is_a_prefix_of_whole_words(text, n):
    prefix, count = take_words(text, n)
    assert text.startswith(prefix) and count <= n
    assert len(split_words(prefix)) == count
    if prefix:
        assert text[len(prefix)].isspace()  # the word was complete


@given(TEXT)
def test_first_word_end(text):
    end = first_word_end(text)
    if end is not None:
        assert text[:end].strip() and " " not in text[:end].strip() and text[end].isspace()


def test_earliest_stop():
    assert earliest_stop("abc\n\nxyz", ["\n\n", "y"]) == 3
    assert earliest_stop("abc", ["d"]) is None
    assert earliest_stop("ab\n\ncd", ["\n\n"], start=4) is None  # the match ended before `start`
    assert earliest_stop("ab\n\ncd", ["\n\n"], start=3) == 2


def test_doctests():
    for mod in (fuselm.text.words, fuselm.sampling, flores_spm, metrics):
        assert doctest.testmod(mod).failed == 0


def test_processors_validate():
    with pytest.raises(ValueError):
        Temperature(0)
    with pytest.raises(ValueError):
        TopK(0)
    with pytest.raises(ValueError):
        TopP(0)
    with pytest.raises(ValueError):
        Sampler(temperature=-1)


def test_sampler_seeded_and_restricted():
    lp = torch.log_softmax(torch.randn(1000, generator=torch.Generator().manual_seed(1)), -1)
    a = [Sampler(1.0, seed=3)(lp) for _ in range(1)] + [Sampler(1.0, seed=3)(lp)]
    assert a[0] == a[1]
    s = Sampler(1.0, top_k=5, seed=0)
    top5 = set(torch.topk(lp, 5).indices.tolist())
    assert {s(lp) for _ in range(200)} <= top5
    nucleus = Sampler(1.0, top_p=1e-6, seed=0)
    assert {nucleus(lp) for _ in range(20)} == {int(lp.argmax())}


def test_a_tiny_temperature_samples_the_argmax():
    """Found by fuzzing the server: 1e-300 overflowed the scores to nan and crashed sampling."""
    import torch

    from fuselm.sampling import Sampler

    lp = torch.log_softmax(torch.tensor([0.1, 2.0, 1.9, -3.0]), -1)
    for t in (1e-300, 5e-324, 1e-30):
        assert all(Sampler(temperature=t, seed=s)(lp) == 1 for s in range(5))
    for p in (1e-300, 5e-324, 1e-10):  # a nucleus smaller than float32 resolves keeps the best token
        assert all(Sampler(temperature=t, top_p=p, seed=s)(lp) == 1 for s in range(5) for t in (1e-300, 1.0, 50.0))
