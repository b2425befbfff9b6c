"""What `fuselm serve` serves: setups (each one model id) and the server's limits, from YAML.

host: 127.0.0.1
port: 8000
limits: {max_concurrent: 2, max_queue: 8, max_tokens: 512}
setups:
  - id: fused-qa
    models: [{name: smollm2-135m}, {name: qwen2.5-coder-0.5b}]
    method: adafuse
    method_options: {theta: 0.7}
    generation: {max_new_tokens: 64}
  - id: qwen-0.5b
    models: [{name: qwen2.5-coder-0.5b}]
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from pydantic import Field, model_validator

from ..config import GenerationConfig, ModelConfig, StrictModel


class Limits(StrictModel):
    """What one request, and the server as a whole, may ask for."""

    max_prompt_tokens: int = Field(8192, ge=1, description="longest prompt, in tokens (of the longest tokenization)")
    max_tokens: int = Field(1024, ge=1, description="largest max_tokens a request may ask for")
    max_n: int = Field(4, ge=1, description="most choices (n) per request")
    max_concurrent: int = Field(2, ge=1, description="requests generating at once")
    max_queue: int = Field(8, ge=0, description="requests waiting for a slot; beyond it: 429 with Retry-After")
    request_timeout_s: float = Field(300.0, gt=0, description="a request's deadline, waiting included (408 after it)")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="largest request body (413 beyond it)")
    retry_after_s: int = Field(1, ge=1, description="the Retry-After of a 429")
    max_stop_chars: int = Field(200, ge=1, description="longest stop string a request may give, in characters")
    option_factor: float = Field(
        2.0,
        ge=1.0,
        description="a request's work options (branches, top_k, ...) up to this multiple of the setup's own values",
    )
    option_max: dict[str, int] = Field(
        default_factory=dict, description="a work option's largest value per request, instead of the factor"
    )

    @model_validator(mode="after")
    def _known_options(self) -> Limits:
        from ..fusion.methods import METHODS
        from ..fusion.options import WORK, marked

        known = {name for cls in METHODS.values() for name in marked(cls.Options, WORK)}
        unknown = sorted(set(self.option_max) - known)
        if unknown:
            raise ValueError(f"option_max: {', '.join(unknown)} not a work option (known: {', '.join(sorted(known))})")
        if any(v < 1 for v in self.option_max.values()):
            raise ValueError("option_max: each bound is at least 1")
        return self


class Setup(StrictModel):
    """One served model id: its models, method, method options and default generation settings."""

    id: str = Field(description="the model id clients ask for")
    models: list[ModelConfig] = Field(min_length=1)
    method: str = "single"
    method_options: dict[str, Any] = Field(default_factory=dict)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    replicas: int = Field(
        1, ge=1, le=64, description="copies of the models: requests run side by side on free copies (memory x N)"
    )
    calibration: str | None = Field(
        None, description="a `fuselm calibrate` file: the setup it chose (models, method, options)"
    )

    @model_validator(mode="before")
    @classmethod
    def _calibrated(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("calibration"):
            from ..calibration import apply_calibration

            method = data.get("method")
            data = apply_calibration({**data, "method": None if method == "single" else method}, data["calibration"])
        return data

    @model_validator(mode="after")
    def _id_chars(self) -> Setup:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:/+-]{0,127}", self.id):
            raise ValueError(f"setup id {self.id!r}: letters, digits and ._:/+- only, up to 128 characters")
        return self


class ServeConfig(StrictModel):
    host: str = Field("127.0.0.1", description="address to bind (127.0.0.1: this machine only)")
    port: int = Field(8000, ge=0, le=65535, description="port (0: any free one)")
    api_key: str | None = Field(None, description="required as `Authorization: Bearer KEY` on /v1 (or FUSELM_API_KEY)")
    allowed_hosts: list[str] | None = Field(
        None,
        description="Host header values served (a request naming another host: 400); default: the loopback names"
        " when bound to a loopback address (no DNS rebinding), any host otherwise",
    )
    limits: Limits = Field(default_factory=Limits)
    setups: list[Setup] = Field(min_length=1)

    @model_validator(mode="after")
    def _key_not_empty(self) -> ServeConfig:
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key is empty: give a key, or leave it out to serve without one")
        return self

    def loopback(self) -> bool:
        """Whether the server listens on this machine only."""
        return is_loopback(self.host)

    def hosts(self) -> list[str] | None:
        """The Host names served (None: any)."""
        if self.allowed_hosts is not None:
            return self.allowed_hosts
        return list(LOOPBACK_NAMES) if self.loopback() else None

    @model_validator(mode="after")
    def _unique_ids(self) -> ServeConfig:
        ids = [s.id for s in self.setups]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"setup ids must be unique; repeated: {', '.join(dup)}")
        return self


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]", "::1")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
