"""The server's Prometheus metrics (prometheus-client), in a registry of the server's own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServerMetrics:
    def __init__(self, run_names: list[str]):
        self.run_names = set(run_names)
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "lorafit_requests",
            "HTTP requests answered, by route, run and status code.",
            ["route", "run", "code"],
            registry=r,
        )
        self.errors = Counter(
            "lorafit_request_errors",
            "Requests answered with a 4xx or 5xx, by route and code.",
            ["route", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "lorafit_request_seconds",
            "Time from request to response, by route.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "lorafit_batch_size", "Texts per forward pass, by run.", ["run"], buckets=BATCH_BUCKETS, registry=r
        )
        self.texts = Counter("lorafit_texts", "Texts classified, by run.", ["run"], registry=r)
        self.queue_depth = Gauge("lorafit_queue_depth", "Texts waiting for a forward pass.", registry=r)
        self.merged_runs = Gauge(
            "lorafit_merged_runs",
            "Runs answering from a merged model (merged at load, or busy runs' copies).",
            registry=r,
        )
        self.rejected = Counter("lorafit_rejected", "Requests refused because the queue was full (503).", registry=r)

    def observe_request(self, route: str, run: str | None, code: int, seconds: float) -> None:
        run = run if run in self.run_names else ""  # names that are not served would make unbounded label sets
        self.requests.labels(route, run, str(code)).inc()
        if code >= 400:
            self.errors.labels(route, str(code)).inc()
        self.latency.labels(route).observe(seconds)

    def observe_batch(self, run: str, size: int) -> None:
        self.batch_size.labels(run).observe(size)
        self.texts.labels(run).inc(size)

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
