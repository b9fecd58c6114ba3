"""Shared fixtures: a tiny random BERT saved like a hub model (MiniLM's tokenizer), small data files."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

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
        cfg = AutoConfig.for_model("distilbert", dim=32, hidden_dim=64, n_layers=2, n_heads=2, max_position_embeddings=256, **common)
    else:
        extra = {"max_position_embeddings": 260, "type_vocab_size": 1} if model_type == "roberta" else {"max_position_embeddings": 256}
        cfg = AutoConfig.for_model(model_type, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=2, **extra, **common)
    torch.manual_seed(0)
    AutoModel.from_config(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture()
def one_thread():
    """Tiny models run fastest on one thread, and on a shared machine two busy-waiting threads can be 30x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run tests marked slow (real MiniLM, longer training); CI does")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --slow (CI does)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


TINY_RUN_SETTINGS = [  # a few fp32 steps on the tiny BERT: seconds, yet a real run folder
    "model.max_length=32", "lora.r=4", "lora.alpha=8", "lora.target_modules=[query,value]", "train.batch_size=16",
    "eval.batch_size=32", "train.max_steps=12", "eval.every=4", "train.precision=fp32", "train.lr=5e-3",
    "data.val_fraction=0.2", "speed.num_threads=1",  # one thread: tiny matmuls gain nothing from two, and lose a lot on a busy machine
]


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
    cfg = load_config(None, [f"model.name={tiny_bert}", f"data.source={data}", f"data.test_source={data}", *TINY_RUN_SETTINGS])
    run(cfg, root / "run")
    torch.set_num_threads(threads)
    return root / "run"


# Comparing runs: everything but the wall-clock fields must match (tests/test_resume.py, tests/test_distributed.py).
TIMING_KEYS = {"elapsed_s", "train_seconds", "train_samples_per_s"}


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
