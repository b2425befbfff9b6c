"""The OpenAPI document of one server: FastAPI's, with what this server accepts (its model ids,
its limits, and what the `fuselm` extension may choose: the methods, their options and the
bounds per model id), so that a request generated from it is a real one."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from .._version import __version__
from ..fusion.methods import METHODS, PATH_OPTIONS
from .bounds import RequestBounds
from .state import ServerState


def openapi_document(app: FastAPI, server: ServerState) -> dict[str, Any]:
    """The schema (made once, then kept on the app)."""
    if app.openapi_schema is None:
        limits = server.limits
        schema = get_openapi(title=app.title, version=__version__, summary=app.summary, routes=app.routes)
        components = schema["components"]["schemas"]
        for name in ("CompletionRequest", "ChatCompletionRequest"):
            props = components[name]["properties"]
            props["model"]["enum"] = [s.id for s in server.config.setups]
            for field in ("max_tokens", "max_completion_tokens"):
                if field in props:
                    _set_maximum(props[field], limits.max_tokens)
            _set_maximum(props["n"], limits.max_n)
        if "FuselmExtension" in components:
            _describe_extension(components["FuselmExtension"], server.bounds)
        app.openapi_schema = schema
    return app.openapi_schema


def _set_maximum(prop: dict[str, Any], maximum: int) -> None:
    """Put a maximum on an integer property (which pydantic may have written as anyOf [int, null])."""
    for option in prop.get("anyOf", [prop]):
        if option.get("type") == "integer":
            option["maximum"] = maximum


def _describe_extension(schema: dict[str, Any], bounds: dict[str, RequestBounds]) -> None:
    """The `fuselm` extension as one variant per method a request may name, each with that
    method's options (path options left out: a request cannot name a file; each work option with
    the largest bound of any model id), so that a generated request is a real one; the bounds per
    model id under `x-fuselm-bounds`."""
    methods = sorted({m for b in bounds.values() for m in b.methods})
    top: dict[str, int] = {}
    for b in bounds.values():
        for option, maximum in b.option_max.items():
            top[option] = max(top.get(option, 0), maximum)
    trace = schema["properties"]["trace"]
    variants = []
    for name in methods:
        fields = {
            field: spec
            for field, spec in METHODS.get(name).Options.model_json_schema().get("properties", {}).items()
            if field not in PATH_OPTIONS
        }
        for field, spec in fields.items():
            if field in top:
                _set_maximum(spec, top[field])
        variants.append({
            "type": "object",
            "properties": {
                "method": {"type": "string", "enum": [name]},
                "options": {"type": "object", "properties": fields, "additionalProperties": False},
                "trace": trace,
            },
            "required": ["method"],
            "additionalProperties": False,
        })  # fmt: skip
    variants.append({"type": "object", "properties": {"trace": trace}, "additionalProperties": False})
    description = schema.get("description", "")
    schema.clear()
    schema.update({"description": description, "anyOf": variants})
    schema["x-fuselm-bounds"] = {
        sid: {"methods": list(b.methods), "option_max": b.option_max} for sid, b in bounds.items()
    }
