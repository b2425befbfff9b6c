"""Clients of serving engines that hold an expert model in another process (the remote-experts
issue). An engine offers top-k log-probs, not full distributions, and keeps its own KV cache:
fuselm sends token ids (tokenized by the engine itself, so that client and server never
disagree about BOS, special tokens or merges) and keeps no model state of its own.

So far: vLLM's OpenAI server (`/tokenize`, `/v1/completions` on token-id prompts with
`logprobs` and `prompt_logprobs`), checked against vLLM 0.32.0 (CPU build).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx  # the `remote` extra

from ..errors import FuselmError


class EngineError(FuselmError):
    """An engine that did not answer, or answered something fuselm cannot use."""


@dataclass
class EngineRollout:
    token_ids: list[int]
    token_logprobs: list[float]
    top: list[dict[int, float]]  # the top-k before each token
    finished: bool  # the engine stopped on an end-of-sequence token (not in token_ids)


class VLLMEngine:
    """One model on a vLLM server: `url` is its base (http://host:port), `model` its model id
    there (default: the only one it serves)."""

    kind = "vllm"

    def __init__(self, url: str, model: str | None = None, timeout_s: float = 60.0, api_key: str | None = None):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, timeout=timeout_s, headers=headers)
        self.model = model or self._only_model()

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            r = self._http.post(path, json=body)
        except httpx.HTTPError as e:
            raise EngineError(f"vLLM at {self.url}: {type(e).__name__}: {e}") from None
        if r.status_code != 200:
            raise EngineError(f"vLLM at {self.url} answered {r.status_code} to {path}: {r.text[:300]}")
        return r.json()

    def _only_model(self) -> str:
        try:
            models = [m["id"] for m in self._http.get("/v1/models").json()["data"]]
        except (httpx.HTTPError, KeyError, ValueError) as e:
            raise EngineError(f"vLLM at {self.url}: cannot list its models ({e})") from None
        if len(models) != 1:
            raise EngineError(f"vLLM at {self.url} serves {models}; say which with `model:`")
        return models[0]

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The engine's own token ids of `text` (with BOS where the model uses one)."""
        body = {"model": self.model, "prompt": text, "add_special_tokens": add_special_tokens}
        return list(self._post("/tokenize", body)["tokens"])

    def next_topk(self, ids: Sequence[int], k: int) -> dict[int, float]:
        """The k most likely next tokens after `ids` and their log-probs."""
        body = {"model": self.model, "prompt": list(ids), "max_tokens": 1, "temperature": 0, "logprobs": k,
                "return_tokens_as_token_ids": True}  # fmt: skip
        top = self._post("/v1/completions", body)["choices"][0]["logprobs"]["top_logprobs"][0]
        return {_token_id(key): float(lp) for key, lp in top.items()}

    def rollout(self, ids: Sequence[int], max_tokens: int, k: int = 2) -> EngineRollout:
        """Greedy tokens after `ids` (up to `max_tokens`; fewer where the model ends), each with
        its log-prob and the top-k before it (k >= 2 gives the top-1/top-2 margin)."""
        body = {"model": self.model, "prompt": list(ids), "max_tokens": max_tokens, "temperature": 0,
                "logprobs": k, "return_tokens_as_token_ids": True}  # fmt: skip
        choice = self._post("/v1/completions", body)["choices"][0]
        lp = choice["logprobs"]
        return EngineRollout(
            token_ids=[_token_id(t) for t in lp["tokens"]],
            token_logprobs=[float(x) for x in lp["token_logprobs"]],
            top=[{_token_id(key): float(v) for key, v in row.items()} for row in lp["top_logprobs"]],
            finished=choice["finish_reason"] == "stop",
        )

    def score(self, sequences: Sequence[Sequence[int]], start: int) -> list[list[float]]:
        """For each token-id sequence, log p(token i | tokens before it) for every i >= start
        (start >= 1), all sequences in one request (the engine batches them and reuses their
        shared prefix from its own cache)."""
        if start < 1:
            raise ValueError("start must be >= 1: the first token has no context to be scored in")
        body = {"model": self.model, "prompt": [list(s) for s in sequences], "max_tokens": 1, "temperature": 0,
                "prompt_logprobs": 1}  # fmt: skip
        choices = sorted(self._post("/v1/completions", body)["choices"], key=lambda c: c["index"])
        out = []
        for seq, choice in zip(sequences, choices):
            rows = choice["prompt_logprobs"]
            out.append([float(rows[i][str(seq[i])]["logprob"]) for i in range(start, len(seq))])
        return out

    def close(self) -> None:
        self._http.close()


def _token_id(key: str) -> int:
    """A log-prob key of `return_tokens_as_token_ids` ("token_id:7042")."""
    if not key.startswith("token_id:"):
        raise EngineError(f"expected a token id key, got {key!r}")
    return int(key[len("token_id:") :])
