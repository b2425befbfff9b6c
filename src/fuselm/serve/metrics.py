"""Prometheus metrics of one server (its own registry, served at /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "fuselm_requests", "Requests by endpoint, model id and status.", ["endpoint", "model", "status"], registry=r
        )
        self.prompt_tokens = Counter(
            "fuselm_prompt_tokens", "Prompt tokens (longest tokenization).", ["model"], registry=r
        )
        self.generated_tokens = Counter("fuselm_generated_tokens", "Generated tokens.", ["model"], registry=r)
        self.forward_passes = Counter(
            "fuselm_forward_passes", "Forward passes per session model.", ["model", "session"], registry=r
        )
        self.models_loaded = Gauge("fuselm_models_loaded", "Distinct models loaded (shared by setups).", registry=r)
        self.running = Gauge("fuselm_requests_running", "Requests holding a generation slot.", registry=r)
        self.queued = Gauge("fuselm_queue_depth", "Requests waiting for a slot.", registry=r)
        self.latency = Histogram(
            "fuselm_request_seconds", "Request latency.", ["endpoint", "model"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.first_token = Histogram(
            "fuselm_time_to_first_token_seconds",
            "Time to the first streamed text.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
