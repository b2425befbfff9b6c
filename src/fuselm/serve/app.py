"""The HTTP server: an OpenAI-compatible API over fuselm setups (FastAPI, uvicorn, sse-starlette).

`build_app` puts the parts together: the server's state (`serve.state`: config, engine, metrics,
bounds), the routes (`serve.routes`, one APIRouter; each endpoint's answers in its serving
module), the error handlers (`serve.errors`), the edge that every request meets first
(`serve.edge`: Host, API key before the body, content type, size, strict JSON) and the OpenAPI
document with the server's bounds (`serve.openapi`).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

from fastapi import FastAPI
from fastapi.routing import APIRoute

from .config import ServeConfig
from .edge import Edge
from .errors import install_handlers
from .openapi import openapi_document
from .routes import router
from .state import ServerState


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Models load in a thread after startup, so /health answers at once and /ready once every
    setup has answered a first token; at shutdown every generation stops at its next model call."""
    server: ServerState = app.state.server
    loader = threading.Thread(target=server.load, name="fuselm-load", daemon=True)
    loader.start()
    yield
    server.engine.cancel_all.set()
    loader.join(timeout=1)
    await asyncio.to_thread(server.engine.close)


def build_app(config: ServeConfig) -> FastAPI:
    """The app that serves `config`."""
    server = ServerState.of(config)
    app = FastAPI(title="fuselm", summary="Fused language models behind the OpenAI API", lifespan=lifespan)
    app.state.server = server
    app.include_router(router)
    install_handlers(app, config.limits)
    app.openapi = partial(openapi_document, app, server)
    posts = frozenset(r.path for r in router.routes if isinstance(r, APIRoute) and "POST" in r.methods)
    app.add_middleware(Edge, config=config, metrics=server.metrics, posts=posts)
    return app
