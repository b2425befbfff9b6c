"""The trained router as a backend: its LM log-probs go through a normal DecodingSession, and
each forward pass also records the routing head's logits for the positions it ran.

Two engines run a router: transformers (:class:`RouterBackend`, the model as trained, float32)
and llama.cpp (:class:`fuselm.router.llamacpp.LlamaCppRouterBackend`: the backbone's GGUF with
the LoRA adapters exported to a GGUF adapter, and the routing head applied to llama.cpp's final
hidden state). :func:`load_router_backend` picks one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import torch

from ..config import ModelConfig
from ..errors import FuselmError
from ..models.hf import TransformersBackend
from .llamacpp import PERMUTED_QK, LlamaCppRouterBackend, backbone_gguf, gguf_architecture
from .model import RouterMeta, RouterModel, load_router, read_meta
from .routes import RouteRecorder

log = logging.getLogger(__name__)

RouterEngine = Literal["auto", "transformers", "llamacpp"]


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
        from ..models.loading import load_in_process

        path = Path(path)
        meta = read_meta(path)
        base = load_in_process(ModelConfig(name=meta.backbone, backend="transformers")).backend
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


def llamacpp_unavailable_reason(meta: RouterMeta) -> str | None:
    """Why this router cannot run on llama.cpp here (None when it can)."""
    from ..models import llamacpp

    if not llamacpp.available():
        return "llama-cpp-python is not installed"
    if meta.lora is None:
        return "the router's whole backbone was trained (no LoRA adapters to put on the base GGUF)"
    gguf = backbone_gguf(meta.backbone)
    if gguf is None:
        return f"its backbone {meta.backbone!r} is neither a bundled model nor a .gguf file"
    arch = gguf_architecture(gguf)
    if arch not in PERMUTED_QK:
        return f"its LoRA cannot be exported for a {arch!r} GGUF (supported: {', '.join(sorted(PERMUTED_QK))})"
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
            return LlamaCppRouterBackend.load(path)
        if engine == "llamacpp":
            raise FuselmError(f"router {path} cannot run on llama.cpp: {reason}")
        log.info("router %s runs on transformers: %s", path, reason)
    return RouterBackend.load(path)
