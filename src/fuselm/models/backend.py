"""The backend interface: what a decoding session needs from an inference engine.

A backend owns one model and its tokenizer. It knows nothing about committed text, words or
fusion; it turns text into token ids and runs forward passes against an opaque KV cache.
Log-probabilities always come back as float32 torch tensors over the full vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import FuselmError


@dataclass(frozen=True)
class ModelInfo:
    name: str
    backend: str
    architecture: str
    vocab_size: int
    context_length: int
    eos_token_ids: frozenset[int]
    bos_token_id: int | None
    has_chat_template: bool
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Forks:
    """Scored branches' states, kept until one is adopted or another branch call replaces them."""

    keep: int
    lengths: list[int]
    branches: list[list[int]] = field(default_factory=list)  # the branches' token ids
    next_logprobs: list[torch.Tensor] = field(default_factory=list)  # after each branch, when kept
    state: Any = None  # backend-specific

    def available(self, j: int) -> bool:
        return self.state is not None and j < len(self.next_logprobs)


class Backend(ABC):
    """One model behind a small token-level interface (see :class:`fuselm.models.session.DecodingSession`)."""

    info: ModelInfo
    # CPU threads of this backend's forward passes when it can run beside other models (it
    # releases the GIL and runs its passes on a thread of its own: llama.cpp); None: it shares
    # one thread pool with every model of the process (torch), so models run in turn.
    threads_apart: int | None = None

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text`, with the model's BOS if it uses one and special tokens parsed."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens included as text."""

    @abstractmethod
    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The prompt text for a conversation, ending where the assistant's answer starts."""

    @abstractmethod
    def new_cache(self) -> Any:
        """An empty KV cache, owned by the caller until :meth:`release`."""

    def cached_ids(self, cache: Any) -> list[int]:
        """Token ids `cache` holds (a cache handed on by a :class:`fuselm.models.prefix.PrefixCache`
        starts with an earlier session's); a session keeps their common prefix with its prompt."""
        return []

    def release(self, cache: Any) -> None:
        """Free `cache` now (a cache dropped without it is freed when garbage-collected)."""

    def can_keep(self, cache: Any) -> bool:
        """Whether a finished session's cache may be kept for the next session on this backend."""
        return False

    def revive(self, cache: Any) -> bool:
        """Make a kept cache ready for a new session; False when it cannot be reused (then the
        caller releases it and starts from an empty one)."""
        return False

    @abstractmethod
    def truncate(self, cache: Any, length: int) -> None:
        """Keep only the first `length` positions of `cache`."""

    @abstractmethod
    def extend(self, cache: Any, ids: Sequence[int], all_logits: bool = False) -> torch.Tensor:
        """Run `ids` on top of `cache` (which grows by len(ids)).

        Returns next-token log-probs: shape [V] for the last position, or [len(ids), V] when
        `all_logits`.
        """

    @abstractmethod
    def score_branches(self, cache: Any, keep: int, branches: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Score several token sequences that each continue the first `keep` cached positions.

        For branch j, returns a tensor of len(branches[j]) - 1 values: value i is
        log p(branch[i + 1] | cache[:keep] + branch[: i + 1]). The cache content up to its
        current length is left as it was. Implementations batch all branches in one pass.
        """

    @abstractmethod
    def branch_next_logprobs(
        self, cache: Any, keep: int, branches: Sequence[Sequence[int]], batch: Any = None
    ) -> tuple[list[torch.Tensor], Any]:
        """Next-token log-probs [V] after each branch (each non-empty, continuing cache[:keep]),
        all branches in one batched pass; the cache is left as it was.

        Also returns the batch's state, which the caller owns and passes back as `batch` on the
        next call with every branch one token longer: the branches' key/values then carry over
        and only the new token of each branch runs (None, or a stale state, runs them whole)."""

    def fork_branches(
        self, cache: Any, keep: int, branches: Sequence[Sequence[int]]
    ) -> tuple[list[torch.Tensor], Forks]:
        """Like :meth:`score_branches`, and keep each branch's state so that one of them can be
        adopted into `cache` afterwards with no forward pass (see :meth:`adopt`).

        Backends that cannot keep branch states return an empty :class:`Forks`; adoption then fails
        and the session runs the tokens itself.
        """
        return self.score_branches(cache, keep, branches), Forks(keep, [len(b) for b in branches])

    def adopt(self, cache: Any, forks: Forks, j: int) -> torch.Tensor | None:
        """Make `cache` = cache[:forks.keep] + branch `j`; return the next-token log-probs after it,
        or None (cache untouched) when the branch's state is not available any more."""
        return None

    def close(self) -> None:  # pragma: no cover - optional
        """Release resources held outside Python's memory management."""


_VOCAB_PROBE = "Hello, world! 123 \n\tcafé 東京 def f(x):\n    return x"


def probe_fingerprint(vocab_size: int | None, tokenize: Callable[[str], list[int]]) -> str:
    """A vocabulary's size (None: not told) and the ids of a probe text, hashed."""
    return "probe:" + hashlib.sha256(json.dumps([vocab_size, tokenize(_VOCAB_PROBE)]).encode()).hexdigest()[:32]


def vocab_fingerprint(backend: Backend) -> str:
    """What identifies a vocabulary across engines (transformers and llama.cpp agree on it): its
    size and the ids of a probe text, hashed. Stored with a trained router, checked at load."""
    return probe_fingerprint(backend.info.vocab_size, backend.tokenize)


@dataclass(frozen=True)
class Vocabulary:
    """What the vocabulary check reads of a model (an Expert has the same three): a name for the
    error, the vocabulary's size (None where it is not told: an engine's) and the tokenizer."""

    name: str
    vocab_size: int | None
    tokenize: Callable[[str], list[int]]

    @classmethod
    def of(cls, backend: Backend, name: str | None = None) -> Vocabulary:
        return cls(name or backend.info.name, backend.info.vocab_size, backend.tokenize)


def require_one_vocabulary(what: str, models: Sequence[Any]) -> None:
    """Refuse models (Experts, or Vocabulary) that do not share one vocabulary (methods that mix
    token ids need one): the same size and the same ids for a probe text, or the ids alone where
    a model does not tell its size (an engine)."""
    sized = all(m.vocab_size is not None for m in models)

    def key(m) -> str:
        return probe_fingerprint(m.vocab_size if sized else None, m.tokenize)

    want = key(models[0])
    for m in models[1:]:
        if key(m) != want:
            raise FuselmError(f"{what} needs models with one vocabulary; {models[0].name!r} and {m.name!r} differ")


def require_same_vocabulary(what: str, backends: Sequence[Backend]) -> None:
    """:func:`require_one_vocabulary` of backends."""
    require_one_vocabulary(what, [Vocabulary.of(b) for b in backends])


def log_softmax_f32(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1)


def usable_cpus() -> int:
    """CPUs this process may run on (respects taskset / container CPU sets, unlike cpu_count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def side_by_side(backends: Sequence[Backend]) -> bool:
    """Whether these models' forward passes may run at once: each on threads of its own, and
    all their threads on free cores (spinning OpenMP teams on shared cores cost more than
    running in turn)."""
    threads = [b.threads_apart for b in backends]
    distinct = len({id(b) for b in backends}) == len(backends)  # one model twice shares its context
    return len(threads) > 1 and distinct and all(threads) and sum(threads) <= usable_cpus()  # type: ignore[arg-type]
