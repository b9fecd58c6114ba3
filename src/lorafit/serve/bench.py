"""The serving benchmark: `python -m lorafit.serve.bench [--run RUN] [--out docs/serving.md]`.

Side by side, in one run, on the same texts and the same request shape (one text per request, Hugging Face's
`{"inputs": text}` at /models/NAME):
- `lorafit serve` with three runs on one base (dynamic batching, shared base weights; by default busy runs get merged
  copies, serve.merging), and with `--no-merge` (every run unmerged on the shared base);
- the usual alternative: each run exported as a merged transformers model, one `pipeline` each, behind a plain
  FastAPI server that calls the pipeline per request (no batching), in the run's precision;
- the ceiling: lorafit predict's own throughput on the same texts (the model alone: length-sorted batches, no HTTP).
Throughput and p50/p99 latency at each concurrency (also with 16 texts per request for lorafit serve), and the
servers' resident memory with 1, 10 and 50 runs.
Without --run it first trains a short run of the default recipe on the embedded MiniLM (speed does not depend on
how long a run trained).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CONCURRENCY = (1, 8, 32)
MEMORY_RUNS = (1, 10, 50)
# texts each run gets before memory is read, in a burst that makes it busy (serve.merging.HOT_TEXTS), so that merged
# copies fill their budget: memory is read in the worst case the budget allows
MEMORY_TEXTS = 80
SERVED = 3  # runs served in the throughput comparison
PER_REQUEST = 16  # texts per request in the second set of lorafit serve rows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------------------------------
# The load generator. Hand-written on asyncio streams because the client shares the machine's two cores with the
# server it measures: keep-alive connections and pre-built requests cost a fraction of what a thread per client
# with urllib costs, so the figures are the server's. (No async HTTP client is among lorafit's dependencies.)


def _request_bytes(port: int, path: str, text: str | list[str]) -> bytes:
    body = json.dumps({"inputs": text}).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


async def _client(port: int, jobs: list[tuple[int, bytes]], next_job: list[int], latencies: list, answers: dict):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while next_job[0] < len(jobs):
            i = next_job[0]
            next_job[0] += 1
            start = time.perf_counter()
            writer.write(jobs[i][1])
            status = (await reader.readline()).split()[1]
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
            body = await reader.readexactly(length)
            latencies.append(time.perf_counter() - start)
            answers[i] = (int(status), body)
    finally:
        writer.close()


def load(
    port: int,
    paths: list[str],
    texts: list[str],
    concurrency: int,
    requests: int,
    per_request: int = 1,
    round_robin: bool = True,
) -> dict:
    """`requests` requests of `per_request` texts from `concurrency` keep-alive clients, round robin over the paths
    (or in their order, one request each, with round_robin=False)."""

    def inputs(i: int):
        if per_request == 1:
            return texts[i % len(texts)]
        return [texts[(i * per_request + k) % len(texts)] for k in range(per_request)]

    jobs = [(i, _request_bytes(port, paths[i % len(paths) if round_robin else i], inputs(i))) for i in range(requests)]
    latencies: list[float] = []
    answers: dict = {}

    async def go():
        next_job = [0]
        await asyncio.gather(*(_client(port, jobs, next_job, latencies, answers) for _ in range(concurrency)))

    start = time.perf_counter()
    asyncio.run(go())
    seconds = time.perf_counter() - start
    failed = sum(1 for status, _ in answers.values() if status != 200)
    lat = np.array(latencies) * 1000
    return {
        "concurrency": concurrency,
        "requests": requests,
        "per_request": per_request,
        "failed": failed,
        "texts_per_s": requests * per_request / seconds,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
    }


def get(port: int, path: str, timeout: float = 10) -> tuple[int, bytes]:
    """(status, body) of one GET on a connection of its own."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


# ---------------------------------------------------------------------------------------------------------------------
# The servers, as child processes


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class Child:
    def __init__(self, args: list[str], port: int, log: Path):
        self.port, self.log = port, log
        self._out = open(log, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(args, stdout=self._out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server {args[:4]} did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.2)

    def _ready(self) -> bool:
        try:
            return get(self.port, "/ready", timeout=1)[0] == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()


def lorafit_server(runs: dict[str, Path], log: Path, *flags: str) -> Child:
    port = free_port()
    args = [sys.executable, "-m", "lorafit", "serve", *(f"{n}={p}" for n, p in runs.items()), "--port", str(port)]
    return Child([*args, *flags], port, log)


def pipeline_server(models: dict[str, Path], dtype: str, log: Path) -> Child:
    port = free_port()
    spec = json.dumps({"models": {n: str(p) for n, p in models.items()}, "dtype": dtype, "port": port})
    return Child([sys.executable, "-m", "lorafit.serve.bench", "--pipeline-server", spec], port, log)


def run_pipeline_server(spec: str) -> None:
    """The plain alternative: one transformers pipeline per merged model, called once per request."""
    import torch
    import uvicorn
    from fastapi import Body, FastAPI
    from transformers import pipeline

    spec = json.loads(spec)
    dtype = getattr(torch, spec["dtype"])
    pipes = {n: pipeline("text-classification", model=p, dtype=dtype, device="cpu") for n, p in spec["models"].items()}
    app = FastAPI()

    @app.get("/ready")
    def ready():
        return {"status": "ready"}

    @app.post("/models/{name}")
    def classify(name: str, body: dict = Body(...)):  # noqa: B008 (FastAPI's way)
        return [pipes[name](body["inputs"], top_k=None)]

    uvicorn.run(app, host="127.0.0.1", port=spec["port"], log_level="warning")


# ---------------------------------------------------------------------------------------------------------------------


def settled_merges(port: int, quiet_seconds: float = 5.0, timeout: float = 300.0) -> int:
    """How many served runs answer merged, once that number has not changed for `quiet_seconds` (merged copies of
    busy runs are built one at a time, in the background)."""
    count, since, deadline = -1, time.monotonic(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = sum(r["merged"] for r in json.loads(get(port, "/v1/runs")[1])["runs"])
        if now != count:
            count, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_seconds:
            return count
        time.sleep(0.5)
    raise RuntimeError(f"merging did not settle within {timeout:g} s")


def quick_run(folder: Path) -> Path:
    """A short run of the default recipe on the embedded MiniLM."""
    from ..config import load_config
    from ..training.recipe import run

    run(load_config(None, ["train.max_steps=20", "eval.every=20", "data.max_train_samples=640"]), folder)
    return folder


def predict_ceiling(run: Path, texts: list[str]):
    """A function measuring lorafit predict's rows/s on these texts: the timed part of `lorafit predict` (encode and
    forward passes). The bench calls it just before each server measurement: this machine's speed drifts by more
    than the differences measured, and a ratio to a ceiling taken minutes apart would carry that drift."""
    from ..inference.predict import load

    clf = load(run)
    prepared = clf.prepare(texts)
    clf.logits_of_prepared(prepared[:256])  # warm up

    def measure() -> float:
        start = time.perf_counter()
        clf.logits_of_prepared(prepared)
        return len(texts) / (time.perf_counter() - start)

    return measure


def with_ceiling(ceiling, measure) -> dict:
    """A server measurement, with the ceiling measured just before it."""
    before = ceiling()
    return {**measure(), "ceiling": before}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m lorafit.serve.bench", description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, help="a run folder to serve (default: train a short default run)")
    p.add_argument("--requests", type=int, default=1200, help="requests per concurrency level")
    p.add_argument("--out", type=Path, default=Path("docs/serving.md"))
    p.add_argument("--pipeline-server", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.pipeline_server:
        run_pipeline_server(a.pipeline_server)
        return

    import pandas as pd

    from ..data import builtin_path
    from ..inference.export import export_merged
    from ..runs import read_run_config

    work = Path(tempfile.mkdtemp(prefix="lorafit-serve-bench-"))
    try:
        run = a.run or quick_run(work / "run")
        cfg = read_run_config(run)
        texts = pd.read_parquet(builtin_path("builtin:ag_news_sample_test"))["text"].tolist()[:2000]
        names = [f"run{i}" for i in range(max(MEMORY_RUNS))]
        copies = {n: work / "runs" / n for n in names}
        for folder in copies.values():
            shutil.copytree(run, folder, ignore=shutil.ignore_patterns("checkpoints", "*.png", "report.html"))
        served = dict(list(copies.items())[:SERVED])
        paths = [f"/models/{n}" for n in served]

        print("lorafit predict ceiling ...", file=sys.stderr, flush=True)
        ceiling = predict_ceiling(run, texts)

        rows = {}
        for label, flags in (("lorafit serve", ()), ("lorafit serve --no-merge", ("--no-merge",))):
            print(f"{label} ...", file=sys.stderr, flush=True)
            server = lorafit_server(served, work / "serve.log", *flags)
            try:
                load(server.port, paths, texts, 8, 200)  # warm up; by default the runs get busy and merged copies
                settled_merges(server.port)
                rows[label] = [
                    with_ceiling(ceiling, lambda c=c, port=server.port: load(port, paths, texts, c, a.requests))
                    for c in CONCURRENCY
                ]
                rows[label] += [
                    with_ceiling(
                        ceiling,
                        lambda c=c, port=server.port: load(
                            port, paths, texts, c, a.requests // PER_REQUEST, PER_REQUEST
                        ),
                    )
                    for c in CONCURRENCY
                ]
            finally:
                server.stop()

        print("merged models, one pipeline each ...", file=sys.stderr, flush=True)
        merged = work / "merged"
        export_merged(run, merged)
        dtype = "bfloat16" if _run_dtype(cfg) == "bfloat16" else "float32"
        pipes = pipeline_server(dict.fromkeys(served, merged), dtype, work / "pipe.log")
        try:
            load(pipes.port, paths, texts, 8, 100)
            rows["pipeline per run"] = [
                with_ceiling(ceiling, lambda c=c: load(pipes.port, paths, texts, c, max(200, a.requests // 3)))
                for c in CONCURRENCY
            ]
        finally:
            pipes.stop()

        def rss_after_requests(child: Child, served_names: list[str], lorafit: bool = True) -> tuple[float, int]:
            """(resident MB, runs answering merged) once every run has been busy, and merging has settled."""
            try:
                # each run in turn gets busy (MEMORY_TEXTS in a burst): the worst case for the merge budget
                paths = [f"/models/{k}" for k in served_names for _ in range(MEMORY_TEXTS // PER_REQUEST)]
                load(child.port, paths, texts, 4, len(paths), PER_REQUEST, round_robin=False)
                merged_runs = settled_merges(child.port) if lorafit else 0
                return rss_mb(child.proc.pid), merged_runs
            finally:
                child.stop()

        memory: dict[str, dict[int, tuple[float, int]]] = {"lorafit serve": {}, "--no-merge": {}, "pipeline": {}}
        for n in MEMORY_RUNS:
            print(f"memory with {n} runs ...", file=sys.stderr, flush=True)
            some = dict(list(copies.items())[:n])
            memory["lorafit serve"][n] = rss_after_requests(lorafit_server(some, work / f"mem{n}.log"), list(some))
            memory["--no-merge"][n] = rss_after_requests(
                lorafit_server(some, work / f"mem-nomerge{n}.log", "--no-merge"), list(some)
            )
        for n in (1, 10):
            some = dict(list(copies.items())[:n])
            pipes = pipeline_server(dict.fromkeys(some, merged), dtype, work / f"pipemem{n}.log")
            memory["pipeline"][n] = rss_after_requests(pipes, list(some), lorafit=False)
        report = render(rows, memory, cfg, dtype, a.requests)
        write_between_markers(a.out, report)
        print(report)
    finally:
        shutil.rmtree(work, ignore_errors=True)


START, END = "<!-- serve-bench:start -->", "<!-- serve-bench:end -->"


def write_between_markers(path: Path, table: str) -> None:
    """Replace what lies between the markers (the rest of the page is written by hand), or start the page."""
    block = f"{START}\n{table}{END}\n"
    text = path.read_text() if path.is_file() else ""
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + block + rest.split(END, 1)[1].lstrip("\n")
    else:
        text = (text + "\n" if text else "") + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _run_dtype(cfg) -> str:
    from ..fast.device import pick_device, resolve_precision

    return str(resolve_precision(cfg.train.precision, pick_device())).replace("torch.", "")


def render(rows: dict, memory: dict, cfg, dtype: str, requests: int) -> str:
    ceilings = [r["ceiling"] for results in rows.values() for r in results]
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} by `python -m lorafit.serve.bench` on this machine ({os.cpu_count()} cores), "
        f"{SERVED} runs of `{cfg.model.name}` (LoRA r {cfg.lora.r} on {cfg.lora.target_modules}, {dtype}), "
        "AG News test-sample texts, clients on keep-alive connections on the same machine.",
        "",
        "The ceiling is lorafit predict on the same texts (no HTTP, length-sorted batches), measured in the bench's "
        f"process just before each row: {min(ceilings):,.0f}–{max(ceilings):,.0f} texts/s over the rows. "
        "`lorafit serve` is the default (runs unmerged on the shared base, busy runs given merged copies within "
        "`--merge-budget-mb`), measured once its three runs are busy and their copies built.",
        "",
        "| server | concurrency | requests | texts per request | failed | texts/s | predict just before | of predict | p50 ms | p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for server, results in rows.items():
        for r in results:
            lines.append(
                f"| {server} | {r['concurrency']} | {r['requests']} | {r['per_request']} | {r['failed']} | {r['texts_per_s']:,.0f} | "
                f"{r['ceiling']:,.0f} | {r['texts_per_s'] / r['ceiling']:.0%} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} |"
            )
    default, unmerged, pipe = memory["lorafit serve"], memory["--no-merge"], memory["pipeline"]
    lines += [
        "",
        f"Resident memory of the server process (VmRSS once each run has had {MEMORY_TEXTS} texts in a burst, which "
        "makes it busy, and merging has settled; runs answering merged in brackets):",
        "",
        "| runs | lorafit serve MB | × 1 run | lorafit serve --no-merge MB | × 1 run | pipeline per run MB |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for n, (mb, merged) in default.items():
        plain = unmerged[n][0]
        piped = f"{pipe[n][0]:,.0f}" if n in pipe else "–"
        lines.append(
            f"| {n} | {mb:,.0f} ({merged} merged) | {mb / default[min(default)][0]:.2f} | {plain:,.0f} | "
            f"{plain / unmerged[min(unmerged)][0]:.2f} | {piped} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
