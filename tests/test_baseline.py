"""The TF-IDF + linear SVM baseline beside every run: metrics.json, report, end-of-run summary, switch."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import TINY_RUN_SETTINGS
from lorafit import baseline
from lorafit.config import load_config
from lorafit.data import Data, Split, load_data


def _split(texts, labels):
    return Split(list(texts), np.array(labels, dtype=np.int64))


def test_the_baseline_figures_are_its_own_predictions_on_the_runs_rows(tiny_run):
    """metrics.json's baseline is the recipe trained on the run's training split, scored on its val and test rows."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.svm import LinearSVC

    metrics = json.loads((tiny_run / "metrics.json").read_text())
    cfg = load_config(tiny_run / "config.yaml")
    data = load_data(cfg.data, cfg.train.seed)
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    svm = LinearSVC(C=0.5).fit(vec.fit_transform(data.train.texts), data.train.labels)
    base = metrics["baseline"]
    assert base["name"] == baseline.NAME and base["train_seconds"] >= 0
    for split, rows in (("val", data.val), ("test", data.test)):
        expected = float((svm.predict(vec.transform(rows.texts)) == rows.labels).mean())
        assert base[split]["accuracy"] == pytest.approx(expected, abs=1e-12)
        assert base[split]["samples"] == metrics[split]["samples"] == len(rows)
        assert "loss" not in base[split] and len(base[split]["confusion_matrix"]) == len(data.label_names)


def test_the_report_shows_the_baseline_beside_the_run(tiny_run):
    page = (tiny_run / "report.html").read_text()
    base = json.loads((tiny_run / "metrics.json").read_text())["baseline"]
    assert (
        "val, baseline" in page and "test, baseline" in page and baseline.NAME.replace("+", "") in page.replace("+", "")
    )
    assert f"{base['val']['accuracy']:.4f}" in page


def test_the_summary_says_where_the_bar_is_and_the_switch_turns_it_off(tiny_bert, small_csv, tmp_path, capsys):
    from lorafit.training.recipe import run

    settings = [f"model.name={tiny_bert}", f"data.source={small_csv}", *TINY_RUN_SETTINGS, "train.max_steps=4"]
    res = run(load_config(None, settings), tmp_path / "with")
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    verdict = next(line for line in lines if line.startswith("baseline ("))
    assert f"val accuracy {res.metrics['baseline']['val']['accuracy']:.4f}" in verdict
    # a tiny model after 4 steps does not beat TF-IDF on AG News: the user is told so, in plain words
    assert res.metrics["val"]["accuracy"] <= res.metrics["baseline"]["val"]["accuracy"]
    assert any(line.startswith("warning: the adapter") and "does not beat the baseline" in line for line in lines)
    assert lines[-1].startswith("accuracy: ")  # the last line stays the one scripts read

    res = run(load_config(None, [*settings, "eval.baseline=false"]), tmp_path / "without")
    printed = capsys.readouterr().out
    assert "baseline" not in res.metrics and "baseline (" not in printed
    assert "No baseline" in (tmp_path / "without" / "report.html").read_text()


def test_verdict_says_by_how_much_the_adapter_wins():
    metrics = {"val": {"accuracy": 0.93}, "baseline": {"name": "B", "val": {"accuracy": 0.91}}}
    line = baseline.verdict(metrics)
    assert line == "baseline (B): val accuracy 0.9100; the adapter is 2.00 points better on validation"
    assert baseline.verdict({"val": {"accuracy": 0.9}}) is None


def test_a_class_missing_from_training_never_wins_and_tiny_data_still_fits():
    names = ["a", "b", "c"]
    train = _split(["apple pie", "apple tart", "boat sail", "boat oar"], [0, 0, 1, 1])
    val = _split(["apple crumble", "boat race"], [0, 2])
    out = baseline.fit_and_score(Data(train, val, None, names))
    assert out["val"]["accuracy"] == 0.5 and out["val"]["confusion_matrix"][2] == [0, 1, 0]
    assert "test" not in out
