"""The server's routes, on one APIRouter; each route receives the server's state through the
`Server` dependency (`serve.state`) and hands the work to its serving module. The API key, the Host, the
content type, the body's size and its JSON are checked before any route, at the edge
(`serve.edge`): a route's dependencies run only after FastAPI has read and parsed the body.

How to add an endpoint: docs/architecture.md, Serving."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from ..result import unique_names
from .config import Setup
from .playground import PLAYGROUND_HTML
from .protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
)
from .serving import serve_generation
from .serving_chat import ChatResponses
from .serving_completion import CompletionResponses
from .state import Server, ServerState

router = APIRouter()


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready")
async def ready(server: Server):
    engine = server.engine
    if engine.load_error:
        return JSONResponse({"status": "failed"}, status_code=503)
    if not engine.ready:
        return JSONResponse({"status": "loading"}, status_code=503)
    return {"status": "ready", "models": engine.setups.names()}


@router.get("/metrics")
async def prometheus(server: Server) -> Response:
    engine, metrics = server.engine, server.metrics
    metrics.models_loaded.set(len(engine.pool.models()))
    metrics.running.set(engine.scheduler.running)
    metrics.queued.set(engine.scheduler.waiting)
    return Response(metrics.render(), media_type="text/plain; version=0.0.4")


@router.get("/", response_class=HTMLResponse)
async def playground() -> str:
    return PLAYGROUND_HTML


@router.get("/v1/models", response_model=ModelList)
async def models(server: Server) -> ModelList:
    return ModelList(data=[model_card(server, s) for s in server.config.setups])


def model_card(server: ServerState, s: Setup) -> ModelCard:
    """A setup's card: its models as the traces name them once loaded (as configured before),
    and what a request may choose on it."""
    setups = server.engine.setups
    served = setups[s.id] if s.id in setups else None
    names = unique_names([m.name for m in served.models]) if served else [m.name for m in s.models]
    b = server.bounds[s.id]
    return ModelCard(id=s.id, created=server.engine.started, method=s.method, models=names,
                     request_methods=list(b.methods), option_max=b.option_max)  # fmt: skip


@router.post("/v1/completions", response_model=CompletionResponse)
async def completions(request: Request, body: CompletionRequest, server: Server):
    return await serve_generation(server, request, body, CompletionResponses)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse)
async def chat_completions(request: Request, body: ChatCompletionRequest, server: Server):
    return await serve_generation(server, request, body, ChatResponses)
