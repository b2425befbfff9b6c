"""The trained router as a backend: its LM log-probs go through a normal DecodingSession, and
each forward pass also records the routing head's logits for the positions it ran.

Two engines run a router: transformers (:class:`RouterBackend`, the model as trained, float32)
and llama.cpp (:class:`fuselm.router.llamacpp.LlamaCppRouterBackend`: the backbone's GGUF with
the LoRA adapters exported to a GGUF adapter, and the routing head applied to llama.cpp's final
hidden state). :func:`load_router_backend` picks one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch

from ..errors import FuselmError
from ..models.hf import TransformersBackend
from .model import META_FILE, RouterMeta, RouterModel, load_router

log = logging.getLogger(__name__)

RouterEngine = Literal["auto", "transformers", "llamacpp"]


class RouteRecorder:
    """What both router backends add to a plain backend: routing logits recorded per (cache,
    position), dropped with the positions they belong to; no candidate scoring or branching."""

    meta: RouterMeta

    def _init_routes(self) -> None:
        # (cache identity, position) -> routing logits [E] for the token at that position
        self._routes: dict[tuple[int, int], torch.Tensor] = {}

    @property
    def n_experts(self) -> int:
        return len(self.meta.experts)

    def _record_route(self, cache, position: int, route: torch.Tensor) -> None:
        self._routes[(id(cache), position)] = route

    def new_cache(self, warm: bool = False):
        # A router follows one generation at a time: routes of earlier caches are dropped (their
        # ids could be reused by the new cache).
        self._routes.clear()
        return super().new_cache(warm)

    def truncate(self, cache, length: int) -> None:
        super().truncate(cache, length)
        key = id(cache)
        for k in [k for k in self._routes if k[0] == key and k[1] > length]:
            del self._routes[k]

    def route_logits(self, cache, position: int) -> torch.Tensor:
        """Routing logits [E] for the token at `position` (computed by the pass that ran position - 1)."""
        try:
            return self._routes[(id(cache), position)]
        except KeyError:
            raise FuselmError(f"no routing logits for position {position}: the router has not run there") from None

    def score_branches(self, cache, keep: int, branches: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        raise FuselmError("the router does not score candidates")

    def branch_next_logprobs(self, cache, keep: int, branches: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        raise FuselmError("the router does not branch")

    def fork_branches(self, cache, keep: int, branches: Sequence[Sequence[int]]):
        raise FuselmError("the router does not branch")


class RouterBackend(RouteRecorder, TransformersBackend):
    """A :class:`RouterModel` on transformers (records the routes of every position it runs)."""

    def __init__(self, router: RouterModel, tokenizer, meta: RouterMeta, name: str = "router", source: str = ""):
        super().__init__(router.backbone, tokenizer, name=name, source=source)
        self.router = router.eval()
        self.meta = meta
        self._init_routes()

    @classmethod
    def load(cls, path: str | Path) -> RouterBackend:
        """Load a router saved by `fuselm train-router` (its backbone comes from `meta.backbone`)."""
        from ..models.loading import load_model

        path = Path(path)
        meta = read_meta(path)
        base = load_model(meta.backbone, backend="transformers").backend
        router, meta = load_router(path, base.model)
        return cls(router, base.tokenizer, meta, name=f"router:{path.name}", source=str(path))

    def _forward(self, cache, input_ids: torch.Tensor, logits_to_keep: int) -> torch.Tensor:
        # The shared extend() with the router's pass, which also records every position's routes.
        start = cache.get_seq_length()
        out = self.router(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=logits_to_keep)
        routes = out.route_logits[0].float().cpu()
        for i in range(input_ids.shape[1]):  # the hidden state at position p routes the token at p + 1
            self._record_route(cache, start + i + 1, routes[i])
        return out.lm_logits[0]


def read_meta(path: Path) -> RouterMeta:
    meta_file = path / META_FILE
    if not meta_file.is_file():
        raise FuselmError(f"not a router directory (no {META_FILE}): {path}")
    try:
        return RouterMeta.from_dict(json.loads(meta_file.read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError) as e:
        raise FuselmError(f"cannot read {meta_file}: {e}") from e


def llamacpp_unavailable_reason(meta: RouterMeta) -> str | None:
    """Why this router cannot run on llama.cpp here (None when it can)."""
    from ..models import llamacpp
    from .llamacpp import backbone_gguf

    if not llamacpp.available():
        return "llama-cpp-python is not installed"
    if meta.lora is None:
        return "the router's whole backbone was trained (no LoRA adapters to put on the base GGUF)"
    if backbone_gguf(meta.backbone) is None:
        return f"its backbone {meta.backbone!r} is neither a bundled model nor a .gguf file"
    return None


def load_router_backend(path: str | Path, engine: RouterEngine = "auto"):
    """A router saved by `fuselm train-router`, on transformers or llama.cpp.

    ``auto`` takes llama.cpp when it can run this router (llama-cpp-python installed, LoRA
    adapters, a GGUF backbone), as models do; otherwise transformers.
    """
    path = Path(path)
    meta = read_meta(path)
    if engine not in ("auto", "transformers", "llamacpp"):
        raise FuselmError(f"unknown router engine {engine!r}; choose auto, transformers or llamacpp")
    if engine != "transformers":
        reason = llamacpp_unavailable_reason(meta)
        if reason is None:
            from .llamacpp import LlamaCppRouterBackend

            return LlamaCppRouterBackend.load(path)
        if engine == "llamacpp":
            raise FuselmError(f"router {path} cannot run on llama.cpp: {reason}")
        log.info("router %s runs on transformers: %s", path, reason)
    return RouterBackend.load(path)
