"""Shared fixtures: a tiny random BERT saved like a hub model (MiniLM's tokenizer), small data files."""

from __future__ import annotations

import contextlib
import locale
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def make_tiny_model(folder: Path, model_type: str = "bert", hidden: int = 32) -> Path:
    """A 2-layer random encoder of the given type with 2 heads (32 wide unless told), saved with the MiniLM tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from lorafit.models import builtin_model_dir

    tok = AutoTokenizer.from_pretrained(builtin_model_dir())
    common = dict(vocab_size=tok.vocab_size, pad_token_id=tok.pad_token_id)
    if model_type == "distilbert":
        cfg = AutoConfig.for_model(
            "distilbert", dim=32, hidden_dim=64, n_layers=2, n_heads=2, max_position_embeddings=256, **common
        )
    else:
        extra = (
            {"max_position_embeddings": 260, "type_vocab_size": 1}
            if model_type == "roberta"
            else {"max_position_embeddings": 256}
        )
        cfg = AutoConfig.for_model(
            model_type,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=2,
            **extra,
            **common,
        )
    torch.manual_seed(0)
    AutoModel.from_config(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def adapted_model(folder: Path, head: str = "default", **lora):
    """A tiny model with a LoRA adapter (r 4, all-linear, plus `lora` options) whose adapter and head are filled
    with random values, as if trained, so that they take part in the logits; in eval mode."""
    import torch

    from lorafit import models
    from lorafit.config import Config

    cfg = Config.model_validate(
        {"model": {"name": str(folder), "head": head}, "lora": {"target_modules": "all-linear", "r": 4, **lora}}
    )
    model = models.wrap(models.build_model(cfg, 4), cfg).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    return model


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's thread count set to n within the block, as it was after it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture()
def one_thread():
    """Tiny models run fastest on one thread, and on a shared machine two busy-waiting threads can be 30x slower."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-bert"), "bert")


@pytest.fixture(scope="session")
def ag_sample() -> pd.DataFrame:
    from lorafit.data import builtin_path

    return pd.read_parquet(builtin_path("builtin:ag_news_sample"))


@pytest.fixture()
def small_csv(tmp_path, ag_sample) -> Path:
    """240 AG News rows as CSV with title/description-like columns split from the text."""
    df = ag_sample.groupby("label", group_keys=False).head(60).reset_index(drop=True)
    path = tmp_path / "small.csv"
    df.to_csv(path, index=False)
    return path


# Inputs tried by the systematic bad-input tests (tests/test_bad_inputs.py), by kind; printed after the run.
CASES_TRIED: Counter = Counter()


@pytest.fixture(scope="session")
def cases_tried() -> Counter:
    return CASES_TRIED


def pytest_terminal_summary(terminalreporter):
    if CASES_TRIED:
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(CASES_TRIED.items()))
        terminalreporter.write_sep("-", f"bad input: {sum(CASES_TRIED.values())} cases tried ({kinds})")


def pytest_configure(config):
    """CI runs hypothesis derandomised: the same examples on every run, so a red build is reproducible."""
    from hypothesis import settings

    settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
    if os.environ.get("CI"):
        settings.load_profile("ci")


def pytest_addoption(parser):
    parser.addoption(
        "--slow", action="store_true", help="also run tests marked slow (real MiniLM, longer training); CI does"
    )


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --slow (CI does)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


# The tiny BERT's adapter and optimisation in fp32; each use adds its own number of steps and evaluations.
TINY_SETTINGS = [
    "model.max_length=32",
    "lora.r=4",
    "lora.alpha=8",
    "lora.target_modules=[query,value]",
    "train.batch_size=16",
    "eval.batch_size=32",
    "train.precision=fp32",
    "train.lr=5e-3",
    "data.val_fraction=0.2",
]
# two steps, an evaluation after each: the cheapest run a sweep or search test can prune or compare
TINY_SWEEP_SETTINGS = [*TINY_SETTINGS, "train.max_steps=2", "eval.every=1"]
# a few steps: seconds, yet a real run folder; one thread: tiny matmuls gain nothing from two, and lose a lot on a
# busy machine
TINY_RUN_SETTINGS = [*TINY_SETTINGS, "train.max_steps=12", "eval.every=4", "speed.num_threads=1"]


@pytest.fixture(scope="session")
def tiny_run(tiny_bert, ag_sample, tmp_path_factory) -> Path:
    """One trained tiny run (test split scored), shared by the predict, report and export tests: do not modify it."""
    import torch

    from lorafit.config import load_config
    from lorafit.training.recipe import run

    threads = torch.get_num_threads()  # training sets the thread count; give later tests back what they had
    root = tmp_path_factory.mktemp("tiny-run")
    data = root / "small.csv"
    ag_sample.groupby("label", group_keys=False).head(60).reset_index(drop=True).to_csv(data, index=False)
    cfg = load_config(
        None, [f"model.name={tiny_bert}", f"data.source={data}", f"data.test_source={data}", *TINY_RUN_SETTINGS]
    )
    run(cfg, root / "run")
    torch.set_num_threads(threads)
    return root / "run"


@pytest.fixture(scope="session")
def minilm_run(tmp_path_factory) -> SimpleNamespace:
    """The real embedded MiniLM trained briefly through the CLI (480 AG News rows, 30 steps, the test sample
    scored), shared by the train and predict tests, which only read it: `folder`, the CLI's `stdout`, `metrics`."""
    import json

    out = tmp_path_factory.mktemp("minilm-run") / "run"
    args = [sys.executable, "-m", "lorafit", "train", "-o", str(out)]
    settings = (
        "data.max_train_samples=480",
        "train.max_steps=30",
        "train.lr=2e-3",
        "data.test_source=builtin:ag_news_sample_test",
    )
    for setting in settings:
        args += ["--set", setting]
    p = run_child(args, "lorafit train on the embedded MiniLM", 540)  # under the per-test 600 s
    assert p.returncode == 0, p.stderr[-2000:]
    return SimpleNamespace(folder=out, stdout=p.stdout, metrics=json.loads((out / "metrics.json").read_text()))


# Comparing runs: everything but the wall-clock fields must match (tests/test_resume.py, tests/test_distributed.py).
TIMING_KEYS = {"elapsed_s", "train_seconds", "train_samples_per_s", "val_eval_seconds"}


def untimed(x):
    """Metrics or history without the wall-clock fields."""
    if isinstance(x, dict):
        return {k: untimed(v) for k, v in x.items() if k not in TIMING_KEYS}
    if isinstance(x, list):
        return [untimed(v) for v in x]
    return x


def history(folder: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (folder / "history.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------------------------
# Child processes: every wait has a deadline, no child can block on a full pipe, and a child that overstays is killed
# with everything it started and the test fails naming what it waited for, with the end of the child's output.


def _text(data: bytes | str | None) -> str:
    """Bytes as subprocess.run(text=True) would give them (locale encoding, universal newlines); '' for None."""
    if data is None:
        return ""
    if isinstance(data, bytes):
        data = data.decode(locale.getpreferredencoding(False), "replace")
    return data.replace("\r\n", "\n").replace("\r", "\n")


def output_tail(
    stdout: bytes | str | None = None, stderr: bytes | str | None = None, logs: Sequence[Path] = (), chars: int = 3000
) -> str:
    """The last `chars` characters of a child's stdout, stderr and log files, each under its own heading."""
    parts = [(name, _text(data)) for name, data in (("stdout", stdout), ("stderr", stderr))]
    parts += [(str(log), log.read_text(errors="replace") if log.exists() else "(no such file)") for log in logs]
    return (
        "\n".join(f"--- {name} (last {chars} characters) ---\n{text[-chars:]}" for name, text in parts if text)
        or "(no output)"
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A test failing on subprocess.run(..., timeout=N) shows what the child (killed by subprocess.run) had written."""
    report = yield
    error = call.excinfo.value if call.excinfo is not None else None
    if report.failed and isinstance(error, subprocess.TimeoutExpired) and (error.stdout or error.stderr):
        report.sections.append(
            (
                f"stdout and stderr of {error.cmd!r}, killed after {error.timeout:g} s",
                output_tail(error.stdout, error.stderr),
            )
        )
    return report


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a child still running and every process under it (torchrun's workers run in sessions of their own, so
    killing the child's process group would miss them), then reap it; nothing to do for a child that has ended."""
    if proc.poll() is None:  # not reaped, so its pid is still this child's
        try:
            import psutil

            tree = psutil.Process(proc.pid).children(recursive=True)
        except Exception:  # psutil missing, or the child just exited: kill what can be killed
            tree = []
        proc.kill()
        for descendant in tree:
            try:
                descendant.kill()  # psutil checks that the pid was not reused
            except Exception:
                pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:  # stuck in uninterruptible sleep: nothing more a test can do
        pass


def _logs(log: Path | Sequence[Path] | None) -> list[Path]:
    return [] if log is None else [log] if isinstance(log, Path) else list(log)


def wait_for(
    done: Callable[[], bool],
    proc: subprocess.Popen,
    what: str,
    timeout: float,
    log: Path | Sequence[Path] | None = None,
    every: float = 0.01,
) -> None:
    """Poll `done()` while `proc` runs; return when it is true or the child has exited (the caller asserts on what an
    early exit means). Past `timeout` seconds, kill the child and its descendants and fail naming `what`, with the end
    of the child's log file(s)."""
    deadline = time.monotonic() + timeout
    while not done():
        if proc.poll() is not None:
            return
        if time.monotonic() > deadline:
            kill_tree(proc)
            pytest.fail(
                f"waited {timeout:g} s for {what}; killed the child {proc.args!r}\n{output_tail(logs=_logs(log))}"
            )
        time.sleep(every)


def finish(proc: subprocess.Popen, what: str, timeout: float, log: Path | Sequence[Path] | None = None) -> int:
    """proc.wait(timeout) that, past the deadline, kills the child and its descendants and fails naming `what`, with
    the end of the child's log file(s)."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        pytest.fail(
            f"waited {timeout:g} s for {what} to exit; killed the child {proc.args!r}\n{output_tail(logs=_logs(log))}"
        )


def run_children(
    commands: Sequence[Sequence[str]], what: str, timeout: float, input: str | None = None, **kwargs
) -> list[subprocess.CompletedProcess]:
    """Run the commands at the same time and wait for all of them, `timeout` seconds in all; each one's text stdout and
    stderr as subprocess.run(capture_output=True, text=True) gives them. Output goes to unnamed temporary files, not
    pipes: a child never blocks on a full pipe however much it writes, and a grandchild that outlives a kill cannot
    keep a pipe open. Past the deadline every child is killed with its descendants and the test fails naming `what`,
    with the end of each child's output; if the wait is interrupted (the per-test timeout of pytest-timeout, Ctrl-C),
    the children are killed too and the end of their output goes to stderr, which pytest shows with the failure."""
    started: list[tuple[subprocess.Popen, tuple]] = []  # (child, (stdout, stderr) files)
    opened = []
    expired = False
    try:
        for args in commands:
            stdin = None
            if input is not None:
                stdin = tempfile.TemporaryFile()
                opened.append(stdin)
                stdin.write(input.encode(locale.getpreferredencoding(False)))
                stdin.seek(0)
            out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
            opened += [out, err]
            started.append((subprocess.Popen(args, stdin=stdin, stdout=out, stderr=err, **kwargs), (out, err)))
        deadline = time.monotonic() + timeout
        for proc, _ in started:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                for p, _ in started:
                    kill_tree(p)
                others = f" and the {len(started) - 1} other(s)" if len(started) > 1 else ""
                expired = True
                pytest.fail(f"waited {timeout:g} s for {what}; killed {proc.args!r}{others}\n{_tails(started)}")
        return [subprocess.CompletedProcess(proc.args, proc.returncode, *_read(files)) for proc, files in started]
    except BaseException:
        if not expired:  # interrupted (the per-test timeout, Ctrl-C), or one failed to start
            for p, _ in started:
                kill_tree(p)
            if started:
                print(
                    f"interrupted while waiting for {what}; killed the child(ren)\n{_tails(started)}", file=sys.stderr
                )
        raise
    finally:
        for handle in opened:
            handle.close()


def run_child(
    args: Sequence[str], what: str, timeout: float, input: str | None = None, **kwargs
) -> subprocess.CompletedProcess:
    """subprocess.run(args, input=input, capture_output=True, text=True, timeout=timeout, **kwargs), except that expiry
    kills the child's whole process tree and fails the test naming `what`, with the output so far (see run_children)."""
    return run_children([args], what, timeout, input=input, **kwargs)[0]


def _read(files: tuple) -> tuple[str, str]:
    texts = []
    for handle in files:
        handle.seek(0)
        texts.append(_text(handle.read()))
    return texts[0], texts[1]


def _tails(started: list[tuple[subprocess.Popen, tuple]]) -> str:
    return "\n".join(f"{p.args!r} (exit {p.returncode}):\n{output_tail(*_read(files))}" for p, files in started)


@pytest.fixture(scope="session")
def children() -> SimpleNamespace:
    """The helpers above, for test modules that do not import from conftest: children.run(args, what, timeout, ...),
    children.run_all, children.wait_for, children.finish, children.kill."""
    return SimpleNamespace(run=run_child, run_all=run_children, wait_for=wait_for, finish=finish, kill=kill_tree)
