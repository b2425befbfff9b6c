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
    limits: Limits = Field(default_factory=Limits)
    setups: list[Setup] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_ids(self) -> ServeConfig:
        ids = [s.id for s in self.setups]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"setup ids must be unique; repeated: {', '.join(dup)}")
        return self
