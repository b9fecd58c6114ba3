"""The server's limits and budgets (`lorafit serve --help`), in a module of their own: the command line reads
their defaults without importing the web stack and torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Limits:
    max_texts: int = 256  # texts in one request
    max_body_bytes: int = 1 << 20
    max_batch: int = 32  # texts in one forward pass
    max_wait_ms: float = 5.0  # how long the first request of a batch waits for others
    max_queue: int = 4096  # texts waiting; beyond it requests get 503 + Retry-After
    drain_seconds: float = 30.0  # on SIGTERM, how long in-flight requests may take
    merge_budget_mb: float = 128.0  # memory for merged copies of busy runs on a shared base (serve.merging)
    workers: int | None = None  # forward passes that may run at once, sharing the cores; None: 2 on a CPU, 1 on a GPU
