"""Blending a run's adapter with a TF-IDF model: the model reloads exactly, the weight is chosen on validation, the
budget holds, and predict, eval and `lorafit blend` all answer with the same blend."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import TINY_RUN_SETTINGS
from lorafit import blend
from lorafit.cli import main as cli
from lorafit.config import load_config
from lorafit.data import load_data
from lorafit.inference.loaded import load_run
from lorafit.inference.predict import load


@pytest.fixture(scope="module")
def news(ag_sample):
    texts, labels = ag_sample["text"].tolist(), np.array(ag_sample["label"])
    return texts, labels


def test_the_tfidf_model_reloads_to_the_same_scores(news, tmp_path):
    texts, labels = news
    model = blend.TfidfModel.fit(texts[:400], labels[:400], 4)
    assert model.parameters == model.terms * 4 + 4
    model.save(tmp_path)
    assert not list(tmp_path.glob("*.pkl")) and not list(tmp_path.glob("*.pickle"))
    again = blend.TfidfModel.load(tmp_path, 4)
    np.testing.assert_array_equal(again.scores(texts[400:]), model.scores(texts[400:]))
    # and the scores mean something: the linear model beats chance on rows it did not see
    assert (model.scores(texts[400:]).argmax(1) == labels[400:]).mean() > 0.5


def test_the_weight_is_chosen_on_validation_and_zero_when_the_linear_model_adds_nothing():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 200)
    adapter = rng.normal(size=(200, 4))
    adapter[np.arange(100), labels[:100]] += 5  # the adapter is right on half the rows
    assert blend.choose_weight(adapter, np.zeros((200, 4)), labels) == 0.0
    helpful = np.eye(4)[labels]  # a linear model that is right everywhere
    assert blend.choose_weight(adapter, helpful, labels) > 0.0


def test_the_linear_model_fits_what_the_budget_leaves(news):
    texts, labels = news
    names = ["World", "Sports", "Business", "Sci/Tech"]
    val = (texts[400:500], labels[400:500], np.zeros((100, 4)))  # an adapter that knows nothing: the blend helps
    left = 4 * 1500 + 4
    kept, figures = blend.make(texts[:400], labels[:400], val, None, names, left)
    assert kept is not None and figures["parameters"] <= left and figures["terms"] <= 1500
    assert figures["val"]["accuracy"] > 0.5 and "test" not in figures
    none, figures = blend.make(texts[:400], labels[:400], val, None, names, 4 * 999)
    assert none is None and "fewer than 1,000" in figures["skipped"]


def test_a_run_trained_with_blend_predicts_and_evaluates_with_it(tiny_bert, ag_sample, tmp_path, capsys):
    data = tmp_path / "small.csv"
    ag_sample.groupby("label", group_keys=False).head(60).reset_index(drop=True).to_csv(data, index=False)
    cfg = load_config(
        None,
        [f"model.name={tiny_bert}", f"data.source={data}", f"data.test_source={data}", *TINY_RUN_SETTINGS]
        + ["eval.blend=true"],
    )
    import torch

    from lorafit.training.recipe import run

    folder, threads = tmp_path / "run", torch.get_num_threads()
    run(cfg, folder)
    torch.set_num_threads(threads)  # training sets the thread count; give later tests back what they had
    metrics = json.loads((folder / "metrics.json").read_text())
    figures = metrics["blend"]
    # the tiny model learns next to nothing in 12 steps; the linear model does: the blend is kept
    assert figures["weight"] > 0 and (folder / "blend" / "tfidf.safetensors").is_file()
    assert figures["val"]["accuracy"] > metrics["val"]["accuracy"]
    # the temperature is the one of the lowest validation loss: calibrated scores, the same labels
    raw = blend.Blend(blend.TfidfModel.load(folder / "blend", 4), figures["weight"])
    data_val = load_data(cfg.data, cfg.train.seed).val
    adapter_val = load_run(folder, merge=True)
    raw_logits = raw.logits(data_val.texts, adapter_val.predict_logits(adapter_val.encode(data_val.texts)))
    assert figures["temperature"] == pytest.approx(blend.choose_temperature(raw_logits, data_val.labels), rel=1e-3)
    budget = json.loads((folder / "budget.json").read_text())
    assert budget["total"] + figures["parameters"] <= cfg.budget.max_trainable

    # predict answers with the blend: the adapter's log-probabilities plus weight x the linear model's scores
    classifier = load(folder)
    val = load_data(cfg.data, cfg.train.seed).val
    adapter_only = load_run(folder, merge=True)
    adapter_logits = adapter_only.predict_logits(adapter_only.encode(val.texts))
    blended = blend.log_softmax(adapter_logits) + figures["weight"] * classifier.run.blend.model.scores(val.texts)
    expected = blended / figures["temperature"]
    np.testing.assert_allclose(classifier.logits(val.texts), expected, rtol=0, atol=1e-5)
    assert (classifier.logits(val.texts).argmax(1) == val.labels).mean() == pytest.approx(figures["val"]["accuracy"])
    # lorafit eval on the training file scores the blend, as metrics.json's test figures do (test = the same file)
    out = tmp_path / "eval.json"
    capsys.readouterr()
    assert cli(["eval", str(folder), "--data", str(data), "--json", str(out)]) == 0
    assert "note: the run answers with its adapter blended with a TF-IDF model" in capsys.readouterr().out
    assert json.loads(out.read_text())["accuracy"] == pytest.approx(figures["test"]["accuracy"])
    assert "blend" in (folder / "adapter" / "README.md").read_text()


def test_lorafit_blend_adds_a_blend_to_a_finished_run(tiny_run, tmp_path, capsys):
    folder = shutil.copytree(tiny_run, tmp_path / "run")
    before = load(folder).predict_proba(["Stocks fell sharply on Monday"])
    assert cli(["blend", str(folder)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    figures = json.loads((folder / "metrics.json").read_text())["blend"]
    assert line.startswith("blend with a TF-IDF model") and f"weight {figures['weight']:g}" in line
    assert (folder / "blend").is_dir() and "blend" in (folder / "report.html").read_text()
    after = load(folder).predict_proba(["Stocks fell sharply on Monday"])
    assert not np.allclose(before, after)  # predict now answers with the blend
    assert not list(tmp_path.glob("run/.blend*"))  # nothing half-written left beside it


def test_a_broken_blend_or_folder_fails_in_one_line(tiny_run, tmp_path, capsys):
    folder = shutil.copytree(tiny_run, tmp_path / "run")
    assert cli(["blend", str(folder)]) == 0
    (folder / "blend" / "blend.json").write_text("{not json")
    capsys.readouterr()
    (tmp_path / "in.csv").write_text("text\nStocks fell sharply on Monday\n")
    assert cli(["predict", str(folder), "--input", str(tmp_path / "in.csv"), "--output", str(tmp_path / "o.csv")]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "blend" in err and "lorafit blend" in err
    assert cli(["blend", str(tmp_path / "nowhere")]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not found" in err


def test_runs_blended_on_the_same_rows_share_one_vocabulary(tiny_run, tmp_path):
    """A server of many blended runs holds each distinct vocabulary once: it is most of a blend's memory."""
    a, b = (shutil.copytree(tiny_run, tmp_path / name) for name in ("a", "b"))
    assert cli(["blend", str(a)]) == 0 and cli(["blend", str(b)]) == 0
    first, second = load_run(a), load_run(b)
    assert first.blend is not None and first.blend.model.vectorizer is second.blend.model.vectorizer
    assert first.blend.model.coef is not second.blend.model.coef  # the weights stay each run's own


def test_the_temperature_calibrates_without_changing_labels():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 400)
    logits = rng.normal(size=(400, 4))
    logits[np.arange(300), labels[:300]] += 2.0  # right on three rows of four, but four times too sure of itself
    logits *= 4
    t = blend.choose_temperature(logits, labels)
    assert t > 2  # it softens over-confident scores
    from lorafit.metrics import cross_entropy

    assert cross_entropy((logits / t).astype(np.float32), labels) < cross_entropy(logits.astype(np.float32), labels)
