"""The HTTP API of `lorafit serve` (FastAPI): the request and response shapes, errors, auth and metrics.

Routes:
  POST /models/{name}   Hugging Face Inference API text classification (huggingface_hub.InferenceClient works)
  POST /v1/classify     many texts for one run: labels in input order, every class probability on request
  GET  /v1/runs         the served runs: name, base, labels, trainable parameters, validation metrics
  GET  /health          liveness;  GET /ready: readiness (503 while loading or draining)
  GET  /metrics         Prometheus
  GET  /docs            the OpenAPI page

Every client error is a 4xx with one JSON line {"error": "..."}: what was found, what was expected.
"""

from __future__ import annotations

import hmac
import time
from contextlib import asynccontextmanager
from typing import Annotated, Literal

import numpy as np
import torch
from fastapi import FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import LorafitError
from ..fast.device import concurrent_passes
from ..inference.predict import softmax
from .batching import Batcher, QueueFull, ShuttingDown
from .limits import Limits
from .merging import MergedCopies
from .metrics import ServerMetrics
from .registry import ServedRun

# ---------------------------------------------------------------------------------------------------------------------
# Request and response shapes (they are also the OpenAPI page)


class HFParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    top_k: int | None = Field(None, ge=1, description="Only the k most probable classes (default: all).")
    function_to_apply: Literal["softmax", "sigmoid", "none"] | None = Field(
        None, description="How scores are made from the logits (default softmax)."
    )


class HFRequest(BaseModel):
    """The Hugging Face Inference API text-classification request."""

    model_config = ConfigDict(extra="forbid")
    inputs: StrictStr | list[StrictStr]
    parameters: HFParameters | None = None
    options: dict | None = Field(None, description="Accepted for compatibility (wait_for_model, use_cache); unused.")


class LabelScore(BaseModel):
    label: str
    score: float


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    run: StrictStr = Field(description="A served run's name (GET /v1/runs).")
    texts: list[StrictStr] = Field(description="The texts, as the run's text columns join them.")
    probabilities: StrictBool = Field(False, description="Also return every class probability.")


class ClassifyResponse(BaseModel):
    run: str
    labels: list[str] = Field(description="The most probable class of each text, in input order.")
    label_names: list[str] | None = Field(None, description="The columns of `probabilities`.")
    probabilities: list[list[float]] | None = None


class Problem(BaseModel):
    error: str


ERRORS = {code: {"model": Problem} for code in (400, 401, 404, 413, 415, 422, 503)}


class ClientError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        self.status, self.message, self.headers = status, message, headers


def _problem(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


UNION_BRANCHES = ("str", "list[str]")  # how pydantic names the branches of `str | list[str]` in an error's location


def _where(loc) -> str:
    out = ""
    for part in loc:
        if part == "body" or part in UNION_BRANCHES:
            continue
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out or "body"


def _validation_message(exc: RequestValidationError, content_type: str) -> tuple[int, str]:
    """pydantic's most specific complaint as one line; 400 for a body that is not JSON, 415 for a non-JSON type."""
    errors = exc.errors() or [{"type": "", "loc": (), "msg": "invalid request"}]
    if errors[0]["type"] == "json_invalid":
        why = errors[0].get("ctx", {}).get("error", "parse error")
        return 400, f"the body is not valid JSON ({why}); send a JSON object"
    if isinstance(errors[0].get("input"), bytes):  # FastAPI parses JSON bodies only when they are said to be JSON
        return 415, f"Content-Type {content_type or 'missing'}; send the JSON body with Content-Type: application/json"
    first = max(errors, key=lambda e: len(e["loc"]))
    message = first["msg"].lower()
    if first["loc"] and first["loc"][-1] in UNION_BRANCHES and len(first["loc"]) == 3:  # neither branch fits
        message = "expected a string or a list of strings"
    found = repr(first.get("input"))
    found = found if len(found) <= 60 else found[:57] + "..."
    return 422, f"{_where(first['loc'])}: {message}, found {found}; see /docs for the request shape"


# ---------------------------------------------------------------------------------------------------------------------
# Around every route

OPEN_PATHS = {"/health", "/ready", "/docs", "/openapi.json", "/docs/oauth2-redirect"}  # no token needed


class Guard:
    """Bearer token, body size, and the request metrics, around every route.

    Plain ASGI middleware rather than `@app.middleware("http")`: Starlette's BaseHTTPMiddleware runs every request
    through a task group and memory streams of its own, a fixed cost per request that a server of one-text requests
    pays on every text (docs/serving.md measures it)."""

    def __init__(self, app: ASGIApp, limits: Limits, token: str | None, metrics: ServerMetrics):
        self.app, self.limits, self.token, self.metrics = app, limits, token, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # what the client gets if the app fails before answering

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            problem, receive = await self._check(scope, receive)
            await (problem or self.app)(scope, receive, send_noting_status)
        finally:
            route = scope.get("route")
            self.metrics.observe_request(
                getattr(route, "path", "unmatched"),
                scope.get("path_params", {}).get("name"),
                status,
                time.perf_counter() - start,
            )

    async def _check(self, scope: Scope, receive: Receive) -> tuple[JSONResponse | None, Receive]:
        """(the error response, or None), and the receive channel to read the body from."""
        headers = Headers(scope=scope)
        limit = self.limits.max_body_bytes
        if self.token is not None and scope["path"] not in OPEN_PATHS:
            scheme, _, given = headers.get("authorization", "").partition(" ")
            # compare_digest: the time taken does not tell how much of a guessed token was right
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), self.token.encode()):
                return _problem(
                    401,
                    "missing or wrong bearer token; send Authorization: Bearer <token>",
                    {"WWW-Authenticate": "Bearer"},
                ), receive
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return _problem(
                413, f"the body has {length} bytes; at most {limit} are accepted (--max-body-bytes)"
            ), receive
        if scope["method"] != "POST" or length is not None:
            return None, receive
        # a chunked upload: read it (no further than the limit) to know its size, then hand the app what was read
        body, more = b"", True
        while more and len(body) <= limit:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        if len(body) > limit:
            return _problem(
                413, f"the body has over {limit} bytes; at most {limit} are accepted (--max-body-bytes)"
            ), receive
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return await receive()  # after the body: a disconnect
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return None, replay


# ---------------------------------------------------------------------------------------------------------------------
# The app


def worker_threads(workers: int | None, served: dict[str, ServedRun]) -> tuple[int, int | None]:
    """How many forward passes may run at once, and the compute threads they share (None: one pass at a time,
    torch's setting as it is). A GPU runs one pass at a time; a CPU by default two (serve.batching says why)."""
    on_gpu = any(r.run.device.type != "cpu" for r in served.values())
    if workers is None:
        workers = 1 if on_gpu else concurrent_passes(torch.device("cpu"))
    if on_gpu or workers == 1:
        return workers, None
    return workers, torch.get_num_threads()


def create_app(
    served: dict[str, ServedRun], limits: Limits, token: str | None = None, merged: MergedCopies | None = None
) -> FastAPI:
    metrics = ServerMetrics(list(served))
    workers, threads = worker_threads(limits.workers, served)
    batcher = Batcher(
        limits.max_batch,
        limits.max_wait_ms / 1000,
        limits.max_queue,
        workers,
        threads,
        on_batch=metrics.observe_batch,
        after_forward=merged.note if merged is not None else lambda run, texts: None,
    )
    metrics.queue_depth.set_function(lambda: batcher.queued)
    metrics.merged_runs.set_function(lambda: sum(r.run.merged for r in served.values()))
    state = {"ready": False}

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        state["ready"] = True
        yield
        # uvicorn has stopped accepting and waited for in-flight requests; anything still queued is finished
        state["ready"] = False
        batcher.close(limits.drain_seconds)

    app = FastAPI(
        title="lorafit serve",
        summary="Text classifiers trained with lorafit, many adapters on shared base models.",
        lifespan=lifespan,
        responses=ERRORS,
    )
    app.state.draining = lambda: state.update(ready=False)  # the server calls it on SIGTERM

    def run_named(name: str) -> ServedRun:
        if name not in served:
            raise ClientError(404, f"no run named {name!r} is served; served: {', '.join(served)}")
        return served[name]

    def check_texts(texts: list[str], where: str) -> None:
        if not texts:
            raise ClientError(422, f"{where}: empty list; expected at least one text")
        if len(texts) > limits.max_texts:
            raise ClientError(
                413,
                f"{where}: {len(texts)} texts; at most {limits.max_texts} per request (--max-texts): split the request",
            )
        for i, t in enumerate(texts):
            if not t.strip():
                raise ClientError(422, f"{where}[{i}]: empty text; expected a non-empty string")

    async def logits_of(run: ServedRun, texts: list[str]) -> np.ndarray:
        try:
            prepared = run.classifier.prepare(texts)
        except LorafitError as e:
            raise ClientError(422, str(e)) from None
        try:
            return await batcher.logits(run, prepared)
        except QueueFull:
            metrics.rejected.inc()
            raise ClientError(
                503, f"the queue is full ({limits.max_queue} texts waiting); retry shortly", {"Retry-After": "1"}
            ) from None
        except ShuttingDown:
            raise ClientError(
                503, "the server is shutting down; retry on another replica", {"Retry-After": "1"}
            ) from None

    @app.exception_handler(ClientError)
    async def client_error(request: Request, exc: ClientError):
        return _problem(exc.status, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        return _problem(*_validation_message(exc, request.headers.get("content-type", "")))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):  # 404 for unknown paths, 405 for wrong methods
        return _problem(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}; see /docs", exc.headers)

    app.add_middleware(Guard, limits=limits, token=token, metrics=metrics)

    @app.post(
        "/models/{name}",
        response_model=list[list[LabelScore]],
        summary="Hugging Face Inference API text classification",
        description="One list per input text of {label, score}, best first. "
        "`huggingface_hub.InferenceClient(model=URL).text_classification(text)` works against this URL.",
    )
    async def hf_classify(body: HFRequest, name: Annotated[str, Path(description="A served run's name")]):
        run = run_named(name)
        texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
        check_texts(texts, "inputs")
        params = body.parameters or HFParameters()
        logits = await logits_of(run, texts)
        scores = {
            "softmax": softmax,
            "sigmoid": lambda z: 1 / (1 + np.exp(-z.astype(np.float64))),
            "none": lambda z: z,
        }[params.function_to_apply or "softmax"](logits)
        k = min(params.top_k or len(run.label_names), len(run.label_names))
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return [
            [{"label": run.label_names[j], "score": float(row[j])} for j in best]
            for row, best in zip(scores, order, strict=True)
        ]

    @app.post("/v1/classify", response_model=ClassifyResponse, response_model_exclude_none=True)
    async def classify(body: ClassifyRequest):
        """Labels for many texts of one run, in input order; with `probabilities`, every class probability too."""
        run = run_named(body.run)
        check_texts(body.texts, "texts")
        logits = await logits_of(run, body.texts)
        labels = [run.label_names[i] for i in logits.argmax(-1)]
        if not body.probabilities:
            return {"run": body.run, "labels": labels}
        return {
            "run": body.run,
            "labels": labels,
            "label_names": run.label_names,
            "probabilities": softmax(logits).tolist(),
        }

    @app.get("/v1/runs")
    async def list_runs():
        """The served runs: name, base model, labels, trainable parameters, validation metrics."""
        return {"runs": [run.listing() for run in served.values()]}

    @app.get("/health")
    async def health():
        return {"status": "alive"}

    @app.get("/ready", responses={503: {"model": Problem}})
    async def ready():
        if not state["ready"]:
            return _problem(503, "not ready: loading or shutting down")
        return {"status": "ready", "runs": len(served)}

    @app.get("/metrics", include_in_schema=False)
    async def prometheus():
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    return app
