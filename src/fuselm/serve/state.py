"""What every route reads: the server's config, its engine, its metrics and each setup's bounds,
held on `app.state.server` and handed to a route by the `server_state` dependency."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from ..errors import FuselmError
from .bounds import RequestBounds
from .config import Limits, ServeConfig
from .engine import Engine
from .errors import APIError
from .metrics import Metrics

log = logging.getLogger("fuselm.serve")


@dataclass
class ServerState:
    config: ServeConfig
    engine: Engine
    metrics: Metrics
    bounds: dict[str, RequestBounds]  # setup id -> what a request may choose on it

    @classmethod
    def of(cls, config: ServeConfig) -> ServerState:
        bounds = {s.id: RequestBounds.of(s, config.limits) for s in config.setups}
        return cls(config, Engine(config), Metrics(), bounds)

    @property
    def limits(self) -> Limits:
        return self.config.limits

    def load(self) -> None:
        """Load every setup (in a thread after startup); a failure is reported by /ready, and
        the server stays up to say so."""
        try:
            self.engine.load()
            log.info("ready: %s", ", ".join(self.engine.setups.names()))
        except Exception as e:  # noqa: BLE001 - reported by /ready, the server stays up
            self.engine.load_error = str(e) if isinstance(e, FuselmError) else f"{type(e).__name__}: {e}"
            log.error("loading failed: %s", self.engine.load_error)

    def require_ready(self) -> None:
        if self.engine.load_error:  # what failed (paths, addresses) is in the server's log, not for clients
            raise APIError(503, "the server failed to load its models (its log says why)", type="unavailable")
        if not self.engine.ready:
            raise APIError(503, "the models are still loading; see /ready", type="unavailable",
                           headers={"Retry-After": "5"})  # fmt: skip

    def model_label(self, model: str) -> str:
        """A metrics label from a request's model id: only ids this server serves (nothing else a
        client sends is stored)."""
        return model if any(s.id == model for s in self.config.setups) else "unknown"


def server_state(request: Request) -> ServerState:
    """The route dependency that gives a route the server's state."""
    return request.app.state.server


Server = Annotated[ServerState, Depends(server_state)]  # a route's parameter that receives the state
