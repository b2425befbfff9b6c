"""Words: the unit of fusion across tokenizers.

A word is a run of non-whitespace characters together with the whitespace before it
(spaces, tabs and newlines kept exactly). Splitting and joining never loses a character:
``"".join(split_words(t)) == t`` for every string ``t``.

>>> split_words("The answer\\n\\nis  42.")
['The', ' answer', '\\n\\nis', '  42.']
>>> first_word_end("  Paris is")
7
>>> first_word_end(" Par") is None  # the word may still continue
True
"""

from __future__ import annotations

import re

_WORD = re.compile(r"\s*\S+|\s+")
_FIRST_WORD = re.compile(r"\s*\S+(?=\s)")


def split_words(text: str) -> list[str]:
    """Split `text` into words (leading whitespace attached); trailing whitespace is its own piece."""
    return _WORD.findall(text)


def first_word_end(text: str) -> int | None:
    """End index of the first word of `text` if it is complete (followed by whitespace), else None."""
    m = _FIRST_WORD.match(text)
    return m.end() if m else None


def word_ends(text: str, limit: int) -> list[int]:
    """End offsets of the first `limit` complete words of `text` (a word is complete when
    whitespace follows it; the last word of `text` is not).

    >>> word_ends(" a b c d", 2)
    [2, 4]
    >>> word_ends(" a", 3)
    []
    """
    ends: list[int] = []
    start = 0
    while len(ends) < limit:
        step = first_word_end(text[start:])
        if step is None:
            break
        start += step
        ends.append(start)
    return ends


def take_words(text: str, n: int) -> tuple[str, int]:
    """The longest prefix of `text` made of at most `n` complete words, and how many words it holds.

    >>> take_words(" a b c d", 2)
    (' a b', 2)
    """
    ends = word_ends(text, n)
    return text[: ends[-1] if ends else 0], len(ends)


def earliest_stop(text: str, stops: list[str] | tuple[str, ...], start: int = 0) -> int | None:
    """Index of the first occurrence in `text` of any stop string that ends at or after `start`."""
    best = None
    for s in stops:
        if not s:
            continue
        i = text.find(s, max(0, start - len(s) + 1))
        if i != -1 and (best is None or i < best):
            best = i
    return best
