"""The trained router as a backend: its LM log-probs go through a normal DecodingSession, and
each forward pass also records the routing head's logits per position."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import FuselmError
from ..models.hf import TransformersBackend
from .model import RouterMeta, RouterModel, load_router


class RouterBackend(TransformersBackend):
    """A :class:`RouterModel` behind the backend interface (extend/truncate only: a router
    neither scores candidates nor branches)."""

    def __init__(self, router: RouterModel, tokenizer, meta: RouterMeta, name: str = "router", source: str = ""):
        super().__init__(router.backbone, tokenizer, name=name, source=source)
        self.router = router.eval()
        self.meta = meta
        # (cache identity, position) -> routing logits [E] for the token at that position
        self._routes: dict[tuple[int, int], torch.Tensor] = {}

    @classmethod
    def load(cls, path: str | Path) -> RouterBackend:
        """Load a router saved by `fuselm train-router` (its backbone comes from `meta.backbone`)."""
        import json

        from ..models.loading import load_model

        path = Path(path)
        meta_file = path / "router.json"
        if not meta_file.is_file():
            raise FuselmError(f"not a router directory (no router.json): {path}")
        backbone_ref = json.loads(meta_file.read_text()).get("backbone", "")
        base = load_model(backbone_ref, backend="transformers").backend
        router, meta = load_router(path, base.model)
        return cls(router, base.tokenizer, meta, name=f"router:{path.name}", source=str(path))

    def new_cache(self, warm: bool = False):
        # A router follows one generation at a time: routes of earlier caches are dropped (their
        # ids could be reused by the new cache).
        self._routes.clear()
        return super().new_cache(warm)

    @property
    def n_experts(self) -> int:
        return self.router.n_experts

    def truncate(self, cache, length: int) -> None:
        super().truncate(cache, length)
        key = id(cache)
        for k in [k for k in self._routes if k[0] == key and k[1] > length]:
            del self._routes[k]

    def _forward(self, cache, input_ids: torch.Tensor, logits_to_keep: int) -> torch.Tensor:
        # The shared extend() with the router's pass, which also records every position's routes.
        start = cache.get_seq_length()
        out = self.router(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=logits_to_keep)
        routes = out.route_logits[0].float().cpu()
        for i in range(input_ids.shape[1]):  # the hidden state at position p routes the token at p + 1
            self._routes[(id(cache), start + i + 1)] = routes[i]
        return out.lm_logits[0]

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
