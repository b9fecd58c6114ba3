"""Run folders written before the package was restructured (config keys moved into eval/checkpoint/speed sections)
still evaluate, predict, report and resume.

tests/data/legacy/ holds two folders written by lorafit 0.1.0 as it was before the restructure, trained on the
tiny random BERT of conftest.make_tiny_model and 240 rows of the builtin AG News sample (paths in their configs are
relative, so the test recreates `tiny-bert/` and `small.csv` beside a copy of them):
- legacy-complete: 12 fp32 steps, a checkpoint every 4 (its report files were dropped to keep the fixture small);
- legacy-interrupted: the same config, stopped by an exception after the evaluation at step 8, so its newest
  checkpoint is step 4's and it is marked INCOMPLETE.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import make_tiny_model, untimed
from lorafit.cli import main
from lorafit.runs import is_complete, read_run_config

LEGACY = Path(__file__).parent / "data" / "legacy"


@pytest.fixture()
def legacy(tmp_path, ag_sample, monkeypatch, one_thread) -> Path:
    shutil.copytree(LEGACY, tmp_path, dirs_exist_ok=True)
    make_tiny_model(tmp_path / "tiny-bert", "bert")
    ag_sample.groupby("label", group_keys=False).head(60).reset_index(drop=True).to_csv(
        tmp_path / "small.csv", index=False
    )
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_fixture_uses_the_old_key_names():
    """Guards the fixture itself: were it rewritten by a newer lorafit, the test would prove nothing."""
    text = (LEGACY / "legacy-complete" / "config.yaml").read_text()
    assert (
        "eval_every: 4" in text
        and "checkpoint_every: 4" in text
        and "fast_dropout: true" in text
        and "\neval:" not in text
    )


def test_an_old_run_reads_into_the_new_sections(legacy):
    cfg = read_run_config(Path("legacy-complete"))
    assert (cfg.eval.every, cfg.eval.batch_size, cfg.checkpoint.every, cfg.speed.num_threads) == (4, 32, 4, 1)
    assert cfg.eval.early_stopping.metric == "val_loss" and cfg.speed.pad_to_multiple_of == 8
    assert cfg.train.cache_frozen_layers is False  # written before the cache: its frozen layers kept their dropout


def test_an_old_run_evaluates_predicts_and_reports(legacy, capsys):
    saved = json.loads(Path("legacy-complete/metrics.json").read_text())
    assert main(["eval", "legacy-complete", "--data", "small.csv", "--json", "eval.json"]) == 0
    scored = json.loads(Path("eval.json").read_text())
    assert scored["samples"] == saved["test"]["samples"] == 240
    # merged fp32 logits: a borderline row at most
    assert abs(scored["accuracy"] - saved["test"]["accuracy"]) <= 1 / 240
    assert main(["predict", "legacy-complete", "--input", "small.csv", "--output", "pred.csv"]) == 0
    assert len(Path("pred.csv").read_text().splitlines()) == 241
    assert main(["report", "legacy-complete"]) == 0
    assert Path("legacy-complete/report.html").is_file()


def test_an_old_interrupted_run_resumes_to_the_same_result(legacy, capsys):
    """Resumed by today's code from the old checkpoint, it ends exactly as the old code's uninterrupted twin."""
    assert main(["train", "--resume", "legacy-interrupted"]) == 0
    assert "resuming from legacy-interrupted/checkpoints/step-0000004.pt: step 4 of 12" in capsys.readouterr().out
    a, b = Path("legacy-complete"), Path("legacy-interrupted")
    assert is_complete(b)
    wa, wb = (
        load_file(a / "adapter" / "adapter_model.safetensors"),
        load_file(b / "adapter" / "adapter_model.safetensors"),
    )
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)
    resumed = json.loads((b / "metrics.json").read_text())
    assert "baseline" in resumed  # today's lorafit adds the baseline, which the old code never trained
    resumed.pop("baseline")
    assert untimed(json.loads((a / "metrics.json").read_text())) == untimed(resumed)
    history = [untimed(json.loads(line)) for line in (a / "history.jsonl").read_text().splitlines()]
    resumed_history = [untimed(json.loads(line)) for line in (b / "history.jsonl").read_text().splitlines()]
    # The fixture was written on a CPU with AVX-512. A batch's mean loss is a float32 sum whose order follows the
    # CPU's vector width, so a machine without AVX-512 logs the same step's train loss a rounding apart (the
    # gradients, taken per example, are the same: the weights above are equal bit for bit). Everything else is exact.
    train_loss = [row.pop("train_loss") for row in history]
    assert resumed_history[0]["train_loss"] == train_loss[0]  # logged by the old code before it stopped
    assert [row.pop("train_loss") for row in resumed_history] == pytest.approx(train_loss, rel=1e-6)
    assert history == resumed_history
    assert "\neval:" in (b / "config.yaml").read_text()  # saved again in the current layout
