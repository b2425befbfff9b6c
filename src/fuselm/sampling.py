"""Token choice: small composable processors over next-token log-probs, as in transformers.

>>> import torch
>>> lp = torch.log_softmax(torch.tensor([3.0, 2.0, 1.0, 0.0]), -1)
>>> TopK(2)(lp).isinf().tolist()
[False, False, True, True]
>>> Sampler(temperature=0.0)(lp)  # temperature 0 is greedy
0
"""

from __future__ import annotations

import torch

from .errors import FuselmError


class LogitsProcessor:
    """Maps log-probs [V] to (unnormalised) log-scores [V]; -inf removes a token."""

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class Temperature(LogitsProcessor):
    """Divide scores by a temperature > 0, shifted so that the best is 0 first: a tiny
    temperature then gives 0 and -inf (the argmax), never an overflow to nan.

    >>> Temperature(2.0)(torch.tensor([2.0, 0.0])).tolist()
    [0.0, -1.0]
    >>> Temperature(1e-300)(torch.tensor([2.0, 0.0])).tolist()
    [0.0, -inf]
    """

    def __init__(self, temperature: float):
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        shifted = scores - scores.max()
        # where(): a temperature that underflows float32 makes 0 / t a nan, not the best score's 0
        return torch.where(shifted == 0, shifted, shifted / self.temperature)


class TopK(LogitsProcessor):
    """Keep the k highest-scoring tokens.

    >>> TopK(1)(torch.tensor([0.1, 0.5, 0.2])).tolist()
    [-inf, 0.5, -inf]
    """

    def __init__(self, k: int):
        if not (isinstance(k, int) and k >= 1):
            raise ValueError(f"top_k must be a positive integer, got {k!r}")
        self.k = k

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        if self.k >= scores.shape[-1]:
            return scores
        kth = torch.topk(scores, self.k).values[-1]
        return scores.masked_fill(scores < kth, float("-inf"))


class TopP(LogitsProcessor):
    """Keep the smallest set of tokens whose probability mass reaches p (nucleus sampling).

    >>> TopP(0.5)(torch.log(torch.tensor([0.6, 0.3, 0.1]))).isinf().tolist()
    [False, True, True]
    """

    def __init__(self, p: float):
        if not 0 < p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {p}")
        self.p = float(p)

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        if self.p >= 1:
            return scores
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = torch.softmax(sorted_scores, -1)
        mass_before = torch.cumsum(probs, -1) - probs
        remove_sorted = mass_before >= self.p
        remove_sorted[..., 0] = False  # the best token always stays (a p that underflows float32 is 0)
        remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
        return scores.masked_fill(remove, float("-inf"))


class Sampler:
    """Chooses a token from log-probs: greedy when temperature is 0, else sampled after processors."""

    def __init__(self, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None):
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        self.greedy = temperature == 0
        # kept for engines that sample on their side (a remote expert's streams)
        self.temperature, self.top_k, self.top_p, self.seed = float(temperature), int(top_k), float(top_p), seed
        self.processors: list[LogitsProcessor] = []
        if not self.greedy:
            self.processors.append(Temperature(temperature))
            if top_k:
                self.processors.append(TopK(top_k))
            if top_p < 1:
                self.processors.append(TopP(top_p))
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(seed)
        else:
            self.generator.seed()

    @classmethod
    def from_config(cls, gen) -> Sampler:
        """The sampler of one generation (a GenerationConfig): its own generator, seeded by `gen.seed`."""
        return cls(gen.temperature, gen.top_k, gen.top_p, gen.seed)

    def __call__(self, logprobs: torch.Tensor) -> int:
        if self.greedy:
            return int(torch.argmax(logprobs))
        scores = logprobs
        for proc in self.processors:
            scores = proc(scores)
        probs = torch.softmax(scores, -1)
        if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
            raise FuselmError("the next-token distribution is not a distribution (NaN, or no mass): nothing to sample")
        return int(torch.multinomial(probs, 1, generator=self.generator))
