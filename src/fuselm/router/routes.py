"""Routing logits recorded by a router's forward passes (shared by both router engines)."""

from __future__ import annotations

import weakref

import torch

from ..errors import FuselmError
from .model import RouterMeta


class RouteRecorder:
    """What both router backends add to a plain backend: the routing head's logits, recorded per
    cache and position by the forward passes that compute them, dropped with the positions they
    belong to. Each cache (so each session) has its own: two generations on one router never see
    each other's routes. Scoring and branching are the base backend's, as for any model."""

    meta: RouterMeta

    def _init_routes(self) -> None:
        # cache -> {position -> routing logits [E] for the token at that position}
        self._routes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @property
    def n_experts(self) -> int:
        return len(self.meta.experts)

    def _record_route(self, cache, position: int, route: torch.Tensor) -> None:
        self._routes.setdefault(cache, {})[position] = route

    def truncate(self, cache, length: int) -> None:
        super().truncate(cache, length)
        routes = self._routes.get(cache)
        if routes:
            for k in [k for k in routes if k > length]:
                del routes[k]

    def route_logits(self, cache, position: int) -> torch.Tensor:
        """Routing logits [E] for the token at `position` of `cache` (computed by the pass that
        ran position - 1)."""
        try:
            return self._routes[cache][position]
        except KeyError:
            raise FuselmError(f"no routing logits for position {position}: the router has not run there") from None
