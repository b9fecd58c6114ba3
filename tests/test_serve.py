"""`lorafit serve` through real HTTP on loopback: the same answers as `lorafit predict`, Hugging Face's client,
every bad request a 4xx, auth, a full queue, a bounded load test, SIGTERM draining, runs that travel.

The servers are real child processes (`python -m lorafit serve`); every wait on them has a deadline.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import TINY_RUN_SETTINGS, finish, run_child, wait_for
from lorafit.cli import main as cli
from lorafit.serve.bench import free_port

MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
START_TIMEOUT = 180  # loading MiniLM twice on a busy 2-core machine
REQUEST_TIMEOUT = 60


@pytest.fixture()
def inference_client(monkeypatch):
    """huggingface_hub.InferenceClient, allowed to call the loopback server although the suite runs with
    HF_HUB_OFFLINE=1 (which refuses every request the client makes, even to 127.0.0.1)."""
    import huggingface_hub.constants
    from huggingface_hub import InferenceClient

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return InferenceClient


def request(url: str, body=None, headers: dict | None = None, method: str | None = None, raw: bytes | None = None):
    """(status, headers, parsed JSON or text) of one HTTP request; 4xx/5xx answers are returned, not raised."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None and raw is None:
        req.add_header("Content-Type", "application/json")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT) as r:
            status, head, payload = r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        status, head, payload = e.code, dict(e.headers), e.read()
    text = payload.decode()
    try:
        return status, head, json.loads(text)
    except ValueError:
        return status, head, text


class Server:
    def __init__(self, args: list[str], log: Path, env: dict | None = None, cwd: Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self._log_file = open(log, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lorafit", "serve", *args, "--port", str(self.port), "--threads", "1"],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
        )

    def wait_ready(self, timeout: float = START_TIMEOUT) -> Server:
        wait_for(self._ready, self.proc, "the server to be ready", timeout, self.log, every=0.2)
        assert self.proc.poll() is None, (
            f"the server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}"
        )
        return self

    def _ready(self) -> bool:
        try:
            return request(self.url + "/ready")[0] == 200
        except OSError:
            return False

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = finish(self.proc, "the server", 60, self.log)
        self._log_file.close()
        return code


def train(name: str, data: Path, out: Path, *settings: str) -> Path:
    from lorafit.config import load_config
    from lorafit.training.recipe import run

    cfg = load_config(None, [f"model.name={name}", f"data.source={data}", *TINY_RUN_SETTINGS, *settings])
    run(cfg, out)
    return out


@pytest.fixture(scope="module")
def texts(ag_sample) -> list[str]:
    """48 AG News texts, long and short mixed, and two edge cases."""
    df = ag_sample.groupby("label", group_keys=False).tail(12).sample(frac=1, random_state=5)
    return [*df["text"], "Oil.", "ünïcödé — and emoji 🚀 in a headline"]


@pytest.fixture(scope="module")
def minilm_runs(ag_sample, tmp_path_factory) -> dict[str, Path]:
    """Two runs on the embedded MiniLM: LoRA q,v in fp32, and DoRA on every Linear in the CPU's best precision."""
    import torch

    threads = torch.get_num_threads()
    root = tmp_path_factory.mktemp("serve-minilm")
    data = root / "small.csv"
    ag_sample.groupby("label", group_keys=False).head(60).reset_index(drop=True).to_csv(data, index=False)
    runs = {
        "news-fp32": train("builtin:minilm", data, root / "news-fp32"),
        "news-dora": train(
            "builtin:minilm",
            data,
            root / "news-dora",
            "train.precision=auto",
            "lora.use_dora=true",
            "lora.target_modules=all-linear",
        ),
    }
    torch.set_num_threads(threads)
    return runs


def predicted(run: Path, texts: list[str], tmp_path: Path) -> pd.DataFrame:
    """`lorafit predict` on the texts, with probabilities."""
    inp, out = tmp_path / f"{run.name}-in.csv", tmp_path / f"{run.name}-out.csv"
    pd.DataFrame({"text": texts}).to_csv(inp, index=False)
    assert cli(["predict", str(run), "--input", str(inp), "--output", str(out), "--proba", "--overwrite"]) == 0
    return pd.read_csv(out, dtype={"label": str})  # label names such as "0" stay strings


# ---------------------------------------------------------------------------------------------------------------------
# Three runs on two bases, one server


@pytest.fixture(scope="module")
def server(minilm_runs, tiny_run, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    args = [f"{name}={path}" for name, path in minilm_runs.items()] + [f"tiny={tiny_run}"]
    # --no-merge: each run here is alone on its base (and precision), which by default would be served merged;
    # --workers 2: two passes at once, as on a CPU by default (Server gives every test server one thread)
    s = Server([*args, "--max-texts", "64", "--no-merge", "--workers", "2"], log).wait_ready()
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def served_runs(minilm_runs, tiny_run) -> dict[str, Path]:
    return {**minilm_runs, "tiny": tiny_run}


# bf16: the server adds an unmerged adapter to the bf16 base, predict merges it first in fp32 and then rounds the
# merged weights; the two roundings differ by bf16's precision, 2^-8 of each weight
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}


@pytest.mark.slow
def test_every_run_answers_as_lorafit_predict(server, served_runs, texts, tmp_path):
    listing = {r["name"]: r for r in request(server.url + "/v1/runs")[2]["runs"]}
    assert set(listing) == set(served_runs)
    assert {r["precision"] for r in listing.values()} >= {"float32"}
    for name, folder in served_runs.items():
        expected = predicted(folder, texts, tmp_path)
        status, _, got = request(server.url + "/v1/classify", {"run": name, "texts": texts, "probabilities": True})
        assert status == 200, got
        names = got["label_names"]
        assert names == json.loads((folder / "labels.json").read_text())
        proba = np.array(got["probabilities"])
        want = expected[[f"proba_{n}" for n in names]].to_numpy()
        tol = TOLERANCE[listing[name]["precision"]]
        assert np.abs(proba - want).max() <= tol, (name, np.abs(proba - want).max())
        margin = np.sort(want, axis=1)[:, -1] - np.sort(want, axis=1)[:, -2]
        clear = margin > 2 * tol  # where the two roundings cannot swap the top two classes
        assert clear.mean() > 0.5
        assert (np.array(got["labels"])[clear] == expected["label"].to_numpy()[clear]).all(), name
        assert got["labels"] == [names[i] for i in proba.argmax(1)]


@pytest.mark.slow
def test_listing_names_base_labels_budget_and_metrics(server, served_runs):
    runs = {r["name"]: r for r in request(server.url + "/v1/runs")[2]["runs"]}
    for name, folder in served_runs.items():
        r = runs[name]
        assert r["labels"] == json.loads((folder / "labels.json").read_text())
        assert r["trainable_parameters"] == json.loads((folder / "budget.json").read_text())["total"]
        assert r["validation"]["accuracy"] == json.loads((folder / "metrics.json").read_text())["val"]["accuracy"]
    assert runs["news-fp32"]["base"] == MINILM_HUB_ID and runs["news-dora"]["base"] == MINILM_HUB_ID
    tiny_base = yaml.safe_load((served_runs["tiny"] / "config.yaml").read_text())["model"]["name"]
    assert runs["tiny"]["base"] == tiny_base  # a local folder: nothing better to name it by
    assert all(r["base_shared"] and not r["merged"] for r in runs.values())


@pytest.mark.slow
def test_huggingface_inference_client(server, served_runs, texts, tmp_path, inference_client):
    expected = predicted(served_runs["news-fp32"], texts[:6], tmp_path)
    client = inference_client(model=f"{server.url}/models/news-fp32")
    for text, label in zip(texts[:6], expected["label"], strict=True):
        out = client.text_classification(text)
        assert out[0].label == label
        assert len(out) == 4 and [o.score for o in out] == sorted((o.score for o in out), reverse=True)
        assert abs(sum(o.score for o in out) - 1) < 1e-6
    assert len(client.text_classification(texts[0], top_k=2)) == 2
    # the raw API: a list of inputs gets one list per input, in order
    status, _, body = request(f"{server.url}/models/tiny", {"inputs": texts[:3], "parameters": {"top_k": 1}})
    assert status == 200 and [len(x) for x in body] == [1, 1, 1]


BAD_REQUESTS = [  # (path, body or raw bytes, status, words the one-line error must contain)
    ("/v1/classify", b'{"run": "tiny", "texts": [', 400, "not valid JSON"),
    ("/v1/classify", {"run": "tiny", "texts": ["ok", 3]}, 422, "texts[1]"),
    ("/v1/classify", {"run": "tiny", "texts": "one string"}, 422, "texts"),
    ("/v1/classify", {"run": "tiny", "texts": []}, 422, "empty list"),
    ("/v1/classify", {"run": "tiny", "texts": ["fine", "   "]}, 422, "texts[1]: empty text"),
    ("/v1/classify", {"run": "tiny", "texts": ["x"] * 65}, 413, "at most 64"),
    ("/v1/classify", {"run": "nobody", "texts": ["x"]}, 404, "served: news-fp32, news-dora, tiny"),
    ("/v1/classify", {"run": "tiny", "texts": ["x"], "path": "/etc/passwd"}, 422, "path"),
    ("/v1/classify", {"texts": ["x"]}, 422, "run"),
    ("/v1/classify", [1, 2], 422, "body"),
    ("/v1/classify", {"run": "tiny", "texts": ["x"], "probabilities": "yes"}, 422, "probabilities"),
    ("/models/tiny", {"inputs": 5}, 422, "expected a string or a list of strings"),
    ("/models/tiny", {"inputs": None}, 422, "inputs"),
    ("/models/tiny", {"inputs": "x", "parameters": {"top_k": 0}}, 422, "top_k"),
    ("/models/tiny", {"inputs": "x", "parameters": {"function_to_apply": "relu"}}, 422, "function_to_apply"),
    ("/models/tiny", {"inputs": ""}, 422, "empty text"),
    ("/models/nobody", {"inputs": "x"}, 404, "no run named 'nobody'"),
    ("/models/tiny", b'{"inputs": "' + b"a" * (1 << 20) + b'"}', 413, "at most 1048576"),
    ("/models/tiny", b"\xff\xfe not utf-8", 400, "not valid JSON"),
    ("/v1/nothing-here", {"inputs": "x"}, 404, "Not Found"),
]


@pytest.mark.slow
@pytest.mark.parametrize("path,body,status,words", BAD_REQUESTS, ids=[f"{s}-{w[:20]}" for _, _, s, w in BAD_REQUESTS])
def test_bad_requests_get_a_4xx_with_one_line(server, path, body, status, words, cases_tried):
    raw = body if isinstance(body, bytes) else None
    headers = {"Content-Type": "application/json"} if raw is not None else None
    try:
        got, head, answer = request(server.url + path, None if raw else body, headers, method="POST", raw=raw)
    except urllib.error.URLError as e:  # a server refusing an oversized body may close before reading all of it
        assert status == 413 and isinstance(e.reason, ConnectionResetError), e
        return
    cases_tried["HTTP request"] += 1
    assert got == status, answer
    assert isinstance(answer, dict) and list(answer) == ["error"], answer
    assert words in answer["error"] and "\n" not in answer["error"] and "Traceback" not in answer["error"]
    assert request(server.url + "/health")[0] == 200  # the server lives on


@pytest.mark.slow
def test_chunked_bodies_are_read_and_limited(server):
    """A body sent without Content-Length (chunked) is read to its end and answered, and refused with 413 once it
    passes --max-body-bytes."""
    import http.client

    def chunked(parts: list[bytes]) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=REQUEST_TIMEOUT)
        try:
            conn.request(
                "POST",
                "/v1/classify",
                body=iter(parts),
                headers={"Content-Type": "application/json"},
                encode_chunked=True,
            )
            reply = conn.getresponse()
            return reply.status, json.loads(reply.read())
        finally:
            conn.close()

    status, answer = chunked([b'{"run": "tiny", ', b'"texts": ["Stocks fell", ', b'"The striker scored"]}'])
    assert status == 200 and len(answer["labels"]) == 2
    try:
        status, answer = chunked([b'{"run": "tiny", "texts": ["', *([b"a" * 65536] * 17), b'"]}'])
    except (ConnectionResetError, BrokenPipeError):  # refused before the client finished sending
        return
    assert status == 413 and "at most 1048576" in answer["error"]
    assert request(server.url + "/health")[0] == 200


@pytest.mark.slow
def test_wrong_content_type_and_method(server):
    status, _, body = request(
        server.url + "/v1/classify",
        raw=b'{"run": "tiny", "texts": ["x"]}',
        headers={"Content-Type": "text/plain"},
        method="POST",
    )
    assert status == 415 and "application/json" in body["error"]
    status, _, body = request(server.url + "/v1/runs", method="DELETE")
    assert status == 405 and list(body) == ["error"]


@pytest.mark.slow
def test_bounded_load_mixed_runs_nothing_lost_or_misrouted(server, texts):
    """32 concurrent clients, 320 single-text requests across the three runs, in at most 120 s: every answer is
    200 and carries the label the same text got alone."""
    names = ["news-fp32", "news-dora", "tiny"]
    alone = {}
    for name in names:
        status, _, body = request(server.url + "/v1/classify", {"run": name, "texts": texts})
        assert status == 200
        alone[name] = body["labels"]
    jobs = [(names[i % 3], (i * 7) % len(texts)) for i in range(320)]
    deadline = time.monotonic() + 120

    def one(job):
        name, i = job
        assert time.monotonic() < deadline, "the load test ran past its 120 s"
        return job, request(server.url + "/v1/classify", {"run": name, "texts": [texts[i]]})

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, jobs, timeout=150))
    assert len(results) == len(jobs)
    for (name, i), (status, _, body) in results:
        assert status == 200, body
        assert body["run"] == name and body["labels"] == [alone[name][i]], (name, i)
    metrics = request(server.url + "/metrics")[2]
    assert "lorafit_batch_size_bucket" in metrics and "lorafit_queue_depth" in metrics
    counts = [float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("lorafit_batch_size_count")]
    batches = sum(counts)
    # batched: fewer forward passes than requests (every text counted once)
    assert 0 < batches < len(jobs) + 3 * len(texts) + 10
    assert 'lorafit_requests_total{code="404"' in metrics or "lorafit_requests_total" in metrics


# ---------------------------------------------------------------------------------------------------------------------
# Small servers on the tiny run: auth, a full queue, SIGTERM, the address check


@pytest.fixture()
def token_file(tmp_path) -> Path:
    f = tmp_path / "token"
    f.write_text("s3cret-token-for-tests-0123456789\n")
    return f


def test_bearer_token(tiny_run, token_file, tmp_path, inference_client):
    s = Server([f"tiny={tiny_run}", "--token-file", str(token_file)], tmp_path / "log").wait_ready()
    try:
        body = {"run": "tiny", "texts": ["Stocks fell"]}
        assert request(s.url + "/v1/classify", body)[0] == 401
        status, head, answer = request(s.url + "/v1/classify", body, {"Authorization": "Bearer wrong"})
        assert status == 401 and head.get("www-authenticate", head.get("WWW-Authenticate")) == "Bearer"
        assert "bearer token" in answer["error"]
        assert (
            request(s.url + "/v1/runs", headers={"Authorization": "Bearer s3cret-token-for-tests-0123456789"})[0] == 200
        )
        assert request(s.url + "/metrics")[0] == 401
        assert request(s.url + "/health")[0] == 200  # probes need no token

        out = inference_client(
            model=f"{s.url}/models/tiny", token="s3cret-token-for-tests-0123456789"
        ).text_classification("x")
        assert len(out) == 4
    finally:
        assert s.stop() == 0


def test_full_queue_answers_503_with_retry_after(tiny_run, tmp_path):
    s = Server([f"tiny={tiny_run}", "--max-queue", "4"], tmp_path / "log").wait_ready()
    try:
        status, head, body = request(s.url + "/v1/classify", {"run": "tiny", "texts": ["a"] * 5})
        assert status == 503 and head.get("Retry-After", head.get("retry-after")) == "1", body
        assert "queue is full" in body["error"]
        assert request(s.url + "/v1/classify", {"run": "tiny", "texts": ["a"] * 4})[0] == 200
        assert "lorafit_rejected_total 1.0" in request(s.url + "/metrics")[2]
    finally:
        assert s.stop() == 0


def test_sigterm_finishes_in_flight_requests_and_exits_0(tiny_run, tmp_path):
    # requests wait 1.5 s for company: SIGTERM arrives while all of them are in flight
    s = Server([f"tiny={tiny_run}", "--max-wait-ms", "1500", "--max-batch", "64"], tmp_path / "log").wait_ready()
    results = []

    def one(i):
        results.append(request(s.url + "/v1/classify", {"run": "tiny", "texts": [f"text number {i}"]}))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    s.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(timeout=REQUEST_TIMEOUT)
    assert not any(t.is_alive() for t in threads)
    assert s.stop() == 0
    assert [r[0] for r in results] == [200] * 8, results
    with pytest.raises(OSError):  # and it no longer listens
        request(s.url + "/health")


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("lorafit: error:") and "\n" not in err and "Traceback" not in err, err
    return err


def test_off_loopback_needs_a_token_or_trust(tiny_run, token_file, capsys):
    assert cli(["serve", str(tiny_run), "--host", "0.0.0.0"]) == 2
    err = one_line_error(capsys)
    assert "--token-file" in err and "--trusted-network" in err
    from lorafit.serve.server import check_address

    check_address("0.0.0.0", "a-token", False)  # either one lets it listen
    check_address("0.0.0.0", None, True)
    check_address("::1", None, False)


@pytest.mark.parametrize(
    "args,words",
    [
        (["/no/such/run"], "not a folder"),
        (["x y=/no/such/run"], "not a folder"),
        (["--max-batch", "0", "RUN"], "--max-batch 0"),
        (["--workers", "0", "RUN"], "--workers 0"),
        (["--token-file", "/no/such/token", "RUN"], "--token-file"),
        (["a=RUN", "a=RUN"], "two runs are named 'a'"),
        (["bad/name=RUN"], "cannot be a URL segment"),
    ],
)
def test_bad_command_lines_fail_in_one_line_before_loading(tiny_run, args, words, capsys):
    args = [a.replace("RUN", str(tiny_run)) for a in args]
    assert cli(["serve", *args]) == 2
    assert words in one_line_error(capsys)


def test_port_in_use_fails_in_one_line(tiny_run, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert cli(["serve", str(tiny_run), "--port", str(taken.getsockname()[1])]) == 2
    assert "cannot listen there" in one_line_error(capsys)


def test_incomplete_runs_and_sweep_folders(tiny_run, tmp_path, capsys):
    from lorafit.serve.registry import parse_specs

    sweep = tmp_path / "sweep"
    for name in ("r=4_alpha=8-abc123", "r=8_alpha=16-def456"):
        shutil.copytree(tiny_run, sweep / name)
    (sweep / "results.csv").write_text("point\n")
    shutil.copytree(tiny_run, sweep / "unfinished")
    (sweep / "unfinished" / "INCOMPLETE").write_text("")
    assert [n for n, _ in parse_specs([str(sweep)])] == ["r=4_alpha=8-abc123", "r=8_alpha=16-def456"]
    assert cli(["serve", str(sweep / "unfinished")]) == 2
    assert "incomplete run" in one_line_error(capsys)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli(["serve", str(empty)]) == 2
    assert "holds no finished run" in one_line_error(capsys)


# ---------------------------------------------------------------------------------------------------------------------
# A run folder that travels


def fake_hub_cache(home: Path) -> Path:
    """A Hugging Face cache in `home` holding the embedded MiniLM under its hub id, as an online machine would."""
    from lorafit.models import builtin_model_dir

    hub = home / ".cache" / "huggingface" / "hub"
    repo = hub / ("models--" + MINILM_HUB_ID.replace("/", "--"))
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for f in Path(builtin_model_dir()).iterdir():
        if f.is_file():
            (snapshot / f.name).symlink_to(f)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    return hub


PLAIN_PEFT = """
import json, sys, torch
from peft import AutoPeftModelForSequenceClassification, PeftConfig
from transformers import AutoTokenizer
run = sys.argv[1]
labels = json.load(open(run + "/labels.json"))
print(PeftConfig.from_pretrained(run + "/adapter").base_model_name_or_path)
model = AutoPeftModelForSequenceClassification.from_pretrained(
    run + "/adapter", num_labels=len(labels), id2label=dict(enumerate(labels))).eval()
tok = AutoTokenizer.from_pretrained(run + "/tokenizer")
texts = json.loads(sys.stdin.read())
with torch.no_grad():
    logits = model(**tok(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")).logits
print(json.dumps([labels[i] for i in logits.argmax(-1).tolist()]))
"""


@pytest.mark.slow
def test_a_copied_run_serves_from_a_new_home_and_plain_peft_reads_its_base(minilm_runs, texts, tmp_path):
    moved = tmp_path / "elsewhere" / "my-classifier"
    shutil.copytree(minilm_runs["news-fp32"], moved)
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HOME", None)
    env.pop("HF_HUB_CACHE", None)
    expected = predicted(moved, texts, tmp_path)
    s = Server([str(moved)], tmp_path / "log", env=env, cwd=tmp_path).wait_ready()
    try:
        status, _, body = request(s.url + "/v1/classify", {"run": "my-classifier", "texts": texts})
        assert status == 200 and body["labels"] == expected["label"].tolist()
    finally:
        assert s.stop() == 0

    fake_hub_cache(home)
    done = run_child(
        [sys.executable, "-c", PLAIN_PEFT, str(moved)], "plain peft", 300, input=json.dumps(texts), env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    base, labels = done.stdout.strip().splitlines()[-2:]
    assert base == MINILM_HUB_ID
    assert json.loads(labels) == expected["label"].tolist()


# ---------------------------------------------------------------------------------------------------------------------
# Loading many runs on one base


def _frozen_pointers(run) -> dict[str, int]:
    return {n: p.data_ptr() for n, p in run.model.named_parameters() if "lora_" not in n and "modules_to_save" not in n}


def test_runs_on_one_base_share_its_weights_and_answer_as_alone(tiny_run, tiny_bert, tmp_path, one_thread):
    from lorafit.inference.loaded import load_run, load_runs

    data = Path(yaml.safe_load((tiny_run / "config.yaml").read_text())["data"]["source"])
    other = train(str(tiny_bert), data, tmp_path / "dora", "lora.use_dora=true", "lora.target_modules=all-linear")
    pissa = train(str(tiny_bert), data, tmp_path / "pissa", "lora.init=pissa")
    a, b, c = load_runs([tiny_run, other, pissa], merge=False)
    shared = set(_frozen_pointers(a).items()) & set(_frozen_pointers(b).items())
    embeddings = {n for n, _ in shared if "word_embeddings" in n}
    assert embeddings and len(shared) > 10  # embeddings, layer norms, unadapted Linear weights: one copy
    assert a.shares_base and b.shares_base and not c.shares_base  # PiSSA rewrites its base: a copy of its own
    assert a.tokenizer is b.tokenizer
    texts = ["Stocks fell sharply on Monday", "The striker scored twice", "Oil."]
    for served, folder in ((a, tiny_run), (b, other), (c, pissa)):
        alone = load_run(folder)
        np.testing.assert_array_equal(
            served.predict_logits(served.encode(texts)), alone.predict_logits(alone.encode(texts))
        )


def test_merged_runs_answer_as_predict_and_share_what_the_merge_left(tiny_run, tiny_bert, tmp_path, one_thread):
    """`lorafit serve --merge`: each run merged exactly as predict merges it (the same logits, bit for bit), PiSSA
    included; embeddings and layer norms stay one copy across runs, the adapted layers are each run's own."""
    from lorafit.inference.loaded import load_run, load_runs
    from lorafit.serve.registry import load_served

    data = Path(yaml.safe_load((tiny_run / "config.yaml").read_text())["data"]["source"])
    pissa = train(str(tiny_bert), data, tmp_path / "pissa", "lora.init=pissa")
    a, b = load_runs([tiny_run, pissa], merge=True)
    assert a.merged and b.merged and a.shares_base and b.shares_base
    shared = set(_frozen_pointers(a).items()) & set(_frozen_pointers(b).items())
    assert any("word_embeddings" in n for n, _ in shared) and any("LayerNorm" in n for n, _ in shared)
    adapted = [n for n, _ in a.model.named_parameters() if n.endswith("query.weight")]
    assert adapted and not {n for n, _ in shared} & set(adapted)  # merged layers: each run's own
    texts = ["Stocks fell sharply on Monday", "The striker scored twice", "Oil."]
    for served, folder in ((a, tiny_run), (b, pissa)):
        alone = load_run(folder, merge=True)
        np.testing.assert_array_equal(
            served.predict_logits(served.encode(texts)), alone.predict_logits(alone.encode(texts))
        )
    listing = load_served([("tiny", tiny_run)], merge=True)["tiny"].listing()
    assert listing["merged"] is True and listing["base_shared"] is False  # alone: nothing to share with


def test_by_default_only_runs_alone_on_their_base_are_merged(tiny_run, tmp_path, one_thread):
    """Merging costs nothing for a run alone on its base (its copy replaces layers nobody else reads): served
    merged, it answers exactly as predict; two runs on one base stay unmerged and share it."""
    import shutil

    from lorafit.inference.loaded import load_run, load_runs

    (alone,) = load_runs([tiny_run])
    assert alone.merged and not alone.shares_base
    texts = ["Stocks fell sharply on Monday", "The striker scored twice", "Oil."]
    predicted_ = load_run(tiny_run, merge=True)
    np.testing.assert_array_equal(
        alone.predict_logits(alone.encode(texts)), predicted_.predict_logits(predicted_.encode(texts))
    )
    twin = shutil.copytree(tiny_run, tmp_path / "twin")
    pair = load_runs([tiny_run, twin])
    assert all(r.shares_base and not r.merged for r in pair)


def test_busy_runs_get_merged_copies_within_the_budget(tiny_run, tmp_path, one_thread):
    """serve.merging: a run that gets busy gets a merged copy (predict's exact logits) while the copies fit the
    budget; a busy run never takes another's copy; an idle copy is dropped and makes room for the next busy run."""
    from lorafit.inference.loaded import SharedBases, load_run, merged_copy_bytes
    from lorafit.serve.merging import MergedCopies
    from lorafit.serve.registry import load_served

    twin = shutil.copytree(tiny_run, tmp_path / "twin")
    loader = SharedBases()
    served = load_served([("a", tiny_run), ("b", twin)], loader=loader)
    a, b = served["a"], served["b"]
    size = merged_copy_bytes(a.loaded)
    assert size > 0 and a.loaded.shares_base and not a.loaded.merged
    copies = MergedCopies(loader, budget_bytes=size, idle_seconds=3600, hot_texts=8, window=3600)
    texts = ["Stocks fell sharply on Monday", "The striker scored twice", "Oil."]

    copies.note(a, 4)
    copies.wait(60)
    assert a.merged_copy is None  # not busy yet
    copies.note(a, 4)
    copies.wait(60)
    assert a.merged_copy is not None and a.run.merged and a.listing()["merged"] is True
    predicted_ = load_run(tiny_run, merge=True)
    np.testing.assert_array_equal(
        a.run.predict_logits(a.run.encode(texts)), predicted_.predict_logits(predicted_.encode(texts))
    )
    assert copies.used_bytes == size

    copies.note(b, 8)
    copies.wait(60)
    assert b.merged_copy is None and a.merged_copy is not None  # no room, and a busy run keeps its copy

    copies.idle_seconds = 0.0  # a's copy has now idled long enough
    time.sleep(0.01)
    copies.note(b, 1)
    copies.wait(60)
    assert a.merged_copy is None and not a.run.merged
    assert b.merged_copy is not None and copies.used_bytes == size
    np.testing.assert_array_equal(
        b.run.predict_logits(b.run.encode(texts)), predicted_.predict_logits(predicted_.encode(texts))
    )

    none = MergedCopies(loader, budget_bytes=size - 1, hot_texts=1)
    none.note(a, 100)
    none.wait(60)
    assert a.merged_copy is None  # its copy would not fit


def test_a_busy_run_answers_from_its_merged_copy_over_http(tiny_run, tmp_path):
    """The default server: two runs on one base start unmerged; once one has been busy it answers from a merged
    copy, which the listing says, with exactly predict's scores."""
    twin = shutil.copytree(tiny_run, tmp_path / "twin")
    server = Server([f"a={tiny_run}", f"b={twin}"], tmp_path / "serve.log").wait_ready()
    try:
        listing = {r["name"]: r for r in request(server.url + "/v1/runs")[2]["runs"]}
        assert not listing["a"]["merged"] and not listing["b"]["merged"]
        texts = [f"Stocks fell sharply on day {i}" for i in range(64)]  # serve.merging.HOT_TEXTS
        assert request(server.url + "/v1/classify", {"run": "a", "texts": texts})[0] == 200

        def a_merged() -> bool:
            request(server.url + "/v1/classify", {"run": "a", "texts": texts[:1]})  # the copy takes over at a pass
            return {r["name"]: r["merged"] for r in request(server.url + "/v1/runs")[2]["runs"]} == {
                "a": True,
                "b": False,
            }

        wait_for(a_merged, server.proc, "run a to get its merged copy", 120, server.log, every=0.5)
        status, _, answer = request(server.url + "/v1/classify", {"run": "a", "texts": texts, "probabilities": True})
        assert status == 200
        from lorafit.inference.predict import load

        np.testing.assert_allclose(answer["probabilities"], load(tiny_run).predict_proba(texts), rtol=0, atol=1e-6)
    finally:
        assert server.stop() == 0


def test_a_blended_run_answers_as_predict_beside_one_without(tiny_run, tmp_path):
    """A run with a blend (lorafit blend) and one without, on one base: each answers with predict's scores."""
    blended = shutil.copytree(tiny_run, tmp_path / "blended")
    assert cli(["blend", str(blended)]) == 0
    server = Server([f"plain={tiny_run}", f"blended={blended}"], tmp_path / "serve.log").wait_ready()
    try:
        listing = {r["name"]: r for r in request(server.url + "/v1/runs")[2]["runs"]}
        weight = json.loads((blended / "metrics.json").read_text())["blend"]["weight"]
        assert listing["plain"]["blend"] is None and listing["blended"]["blend"]["weight"] == weight
        texts = [f"Stocks fell sharply on day {i}" for i in range(8)] + ["The striker scored twice"]
        from lorafit.inference.predict import load

        for name, folder in (("plain", tiny_run), ("blended", blended)):
            status, _, answer = request(
                server.url + "/v1/classify", {"run": name, "texts": texts, "probabilities": True}
            )
            assert status == 200, answer
            np.testing.assert_allclose(answer["probabilities"], load(folder).predict_proba(texts), rtol=0, atol=1e-5)
        plain, mixed = (
            np.array(
                request(server.url + "/v1/classify", {"run": n, "texts": texts, "probabilities": True})[2][
                    "probabilities"
                ]
            )
            for n in ("plain", "blended")
        )
        assert not np.allclose(plain, mixed)  # the blend changed the answer
    finally:
        assert server.stop() == 0


def test_two_workers_answer_every_request_with_its_own_run_and_texts():
    """serve.batching with two workers sharing two threads (the default on a 2-core CPU): 300 concurrent requests
    over three runs, each answered with logits of its own texts and run, both workers used, never more threads at
    work than there are, every text noted once, closing drains the queue; lone requests get both threads, on the
    first worker, and a pass that fails fails its requests only.
    The model is replaced by a function of run and text, so what is checked is the queue's bookkeeping."""
    from types import SimpleNamespace

    import torch

    from lorafit.serve.batching import Batcher

    passes, noted, busy, lock = [], [], [0], threading.Lock()

    class FakeModelBatcher(Batcher):
        def _forward(self, served, texts):
            if served.name == "broken":
                raise RuntimeError("a bug in a pass")
            threads = torch.get_num_threads()
            with lock:
                busy[0] += threads
                assert busy[0] <= 2, f"{busy[0]} threads at work"
            time.sleep(0.002)  # a pass takes a while: requests pile up and both workers get some
            with lock:
                busy[0] -= threads
            passes.append((threading.current_thread().name, threads))
            return np.array([[served.index, float(t)] for t in texts])

    runs = [SimpleNamespace(name=f"run{i}", index=i) for i in range(3)]
    batcher = FakeModelBatcher(4, 0.001, 10_000, workers=2, threads=2, after_forward=lambda run, n: noted.append(n))
    batcher.start()

    async def one(i: int):
        run = runs[i % 3]
        texts = [str(i), str(i + 0.5)]
        assert (await batcher.logits(run, texts)).tolist() == [[run.index, i], [run.index, i + 0.5]]

    async def requests(n: int):
        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(n))), timeout=60)

    threads = torch.get_num_threads()
    try:
        asyncio.run(requests(300))
        assert {name for name, _ in passes} == {"lorafit-batcher-0", "lorafit-batcher-1"}
        assert 1 in {t for _, t in passes}  # passes side by side, on a thread each
        passes.clear()
        for _ in range(10):
            asyncio.run(requests(1))
        assert {threads for _, threads in passes} == {2}  # alone: every thread
        # one at a time: to the first worker (the second only where a request comes before the first is free again)
        assert [name for name, _ in passes].count("lorafit-batcher-0") >= 8, passes
        with pytest.raises(RuntimeError, match="a bug in a pass"):  # the request gets the error (a 500) ...
            asyncio.run(batcher.logits(SimpleNamespace(name="broken"), ["x"]))
        asyncio.run(requests(2))  # ... and the workers serve on
        batcher.close(timeout=10)
    finally:
        torch.set_num_threads(threads)
    assert sum(noted) == 624 and batcher.queued == 0
    assert not any(t.is_alive() for t in batcher._workers)


def test_workers_share_the_cores_on_a_cpu_and_a_gpu_runs_one_pass_at_a_time(monkeypatch):
    from types import SimpleNamespace

    import torch

    from lorafit.serve.app import worker_threads

    def on(device: str) -> dict:
        return {"a": SimpleNamespace(run=SimpleNamespace(device=torch.device(device)))}

    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    assert worker_threads(None, on("cpu")) == (2, 8)
    assert worker_threads(4, on("cpu")) == (4, 8)
    assert worker_threads(1, on("cpu")) == (1, None)  # one worker keeps every thread, as before
    assert worker_threads(None, on("cuda")) == (1, None)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert worker_threads(None, on("cpu")) == (1, None)  # one core: nothing to split
    assert worker_threads(2, on("cpu")) == (2, 1)  # asked for (the batcher gives each pass at least one thread)


def test_benchmark_rewrites_only_its_section(tmp_path):
    from lorafit.serve.bench import END, START, write_between_markers

    page = tmp_path / "serving.md"
    page.write_text(f"# Serving\n\nHand-written.\n\n{START}\nold table\n{END}\n\nAfter.\n")
    write_between_markers(page, "new table\n")
    assert page.read_text() == f"# Serving\n\nHand-written.\n\n{START}\nnew table\n{END}\nAfter.\n"
