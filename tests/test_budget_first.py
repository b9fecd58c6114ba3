"""An over-budget config stops before any data is read: the claim of `lorafit train` and the README."""

from __future__ import annotations

import pytest

import lorafit.data
from lorafit.cli import main
from lorafit.config import load_config
from lorafit.errors import BudgetExceeded
from lorafit.training.recipe import run


@pytest.fixture()
def data_must_not_be_read(monkeypatch):
    """Every way training reads data ends in lorafit.data.read_table: make it fail loudly."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the training data was read before the budget check")

    monkeypatch.setattr(lorafit.data, "read_table", forbidden)


OVER = ["budget.max_trainable=1000", "data.label_names=[a, b]"]  # 2 classes known from the config, no data needed


def test_over_budget_stops_before_reading_data(tiny_bert, small_csv, tmp_path, data_must_not_be_read):
    cfg = load_config(None, [f"model.name={tiny_bert}", f"data.source={small_csv}", *OVER])
    with pytest.raises(BudgetExceeded, match="exceed budget.max_trainable=1,000"):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_over_budget_on_the_builtin_data_stops_before_reading_it(tiny_bert, tmp_path, data_must_not_be_read, capsys):
    """The builtin AG News sample's 4 classes are known without reading it; the CLI exits 3."""
    code = main(
        ["train", "--set", f"model.name={tiny_bert}", "--set", "budget.max_trainable=1000", "-o", str(tmp_path / "run")]
    )
    assert code == 3
    err = capsys.readouterr().err.strip()
    assert err.startswith("lorafit: error:") and "exceed budget.max_trainable=1,000" in err and "\n" not in err
    assert not (tmp_path / "run").exists()


def test_without_known_labels_the_budget_waits_for_the_data(tiny_bert, small_csv, tmp_path, data_must_not_be_read):
    """The guard itself: with no label_names the class count needs the data, so the read happens (and is caught)."""
    cfg = load_config(None, [f"model.name={tiny_bert}", f"data.source={small_csv}", "budget.max_trainable=1000"])
    with pytest.raises(AssertionError, match="read before the budget check"):
        run(cfg, tmp_path / "run")
