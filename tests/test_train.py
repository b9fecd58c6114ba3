"""End-to-end training on a tiny random BERT: the run folder, reload equality, early stopping, schedules, inits."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from conftest import TINY_SETTINGS
from lorafit.batching import encode, predict_logits
from lorafit.config import load_config
from lorafit.inference.loaded import load_run
from lorafit.training.recipe import evaluate, evaluations_without_gain, final_metrics, run, save, setup, train


def tiny_cfg(model_dir, data_csv, *extra):
    files = [f"model.name={model_dir}", f"data.source={data_csv}", f"data.test_source={data_csv}"]
    steps = ["train.max_steps=6", "eval.every=2", "speed.num_threads=1"]
    return load_config(None, [*files, *TINY_SETTINGS, *steps, *extra])


def test_run_folder_has_every_artifact(tiny_bert, small_csv, tmp_path):
    out = tmp_path / "run"
    res = run(tiny_cfg(tiny_bert, small_csv), out)
    for name in (
        "config.yaml",
        "history.jsonl",
        "metrics.json",
        "labels.json",
        "budget.json",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "tokenizer/tokenizer.json",
    ):
        assert (out / name).exists(), name
    assert not list(tmp_path.glob(".*partial"))
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [2, 4, 6]
    assert set(history[0]) >= {"step", "epoch", "train_loss", "val_loss", "val_accuracy", "lr"}
    metrics = json.loads((out / "metrics.json").read_text())
    for split in ("val", "test"):
        m = metrics[split]
        assert set(m) >= {"accuracy", "macro_f1", "per_class", "confusion_matrix", "loss"}
        assert np.sum(m["confusion_matrix"]) == m["samples"]
    assert metrics["val"]["samples"] == 48  # 20% of 240, stratified
    budget = json.loads((out / "budget.json").read_text())
    assert (
        budget["total"]
        == metrics["training"]["trainable_parameters"]
        == res.metrics["training"]["trainable_parameters"]
    )
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["lora"]["target_modules"] == ["query", "value"]
    assert json.loads((out / "labels.json").read_text()) == ["0", "1", "2", "3"]


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["lora.use_dora=true", "lora.use_rslora=true", "lora.init=gaussian", "lora.dropout=0.3"],
        ["lora.init=pissa", "lora.dropout=0"],
        ["model.head=linear", "lora.bias=lora_only"],
    ],
    ids=["lora", "dora-rslora-gaussian", "pissa", "linear-head-bias"],
)
def test_reloaded_run_predicts_like_the_trained_model(tiny_bert, small_csv, tmp_path, extra):
    cfg = tiny_cfg(tiny_bert, small_csv, *extra)
    s = setup(cfg)
    res, val = train(s)
    final_metrics(s, res, val)
    in_memory = evaluate(s, s.test_enc)["_logits"]
    save(s, res, tmp_path)
    loaded = load_run(tmp_path)
    enc = encode(loaded.tokenizer, s.data.test.texts, s.data.test.labels, cfg.model.max_length)
    reloaded = predict_logits(loaded.model, enc, 32, loaded.tokenizer.pad_token_id, loaded.device, loaded.dtype)
    np.testing.assert_allclose(reloaded, in_memory, atol=1e-4)
    assert (reloaded.argmax(-1) == in_memory.argmax(-1)).all()
    # the comparison means something only if the trained adapter moved away from a no-op (B starts at zero)
    assert max(p.abs().max().item() for n, p in loaded.model.named_parameters() if "lora_B" in n) > 0


def test_early_stopping_restores_the_best_step(tiny_bert, small_csv, monkeypatch):
    """The threshold drives early stopping only; the weights kept are the best evaluation's by any margin."""
    from lorafit.training import recipe

    losses = iter([1.0, 0.99, 0.995])  # step 2 is the best, but beats step 1 by less than the threshold
    weights = {}
    real_evaluation = recipe.evaluate

    def scripted_evaluation(s, enc, desc=None):
        if desc != "eval":  # not the loop's validation (setup times a small batch)
            return real_evaluation(s, enc, desc)
        weights[len(weights) + 1] = {n: p.detach().clone() for n, p in s.model.named_parameters() if p.requires_grad}
        return {"loss": next(losses), "accuracy": 0.5, "macro_f1": 0.5}

    monkeypatch.setattr(recipe, "evaluate", scripted_evaluation)
    cfg = tiny_cfg(
        tiny_bert,
        small_csv,
        "train.max_steps=40",
        "eval.every=1",
        "eval.early_stopping.patience=2",
        "eval.early_stopping.threshold=0.02",
    )
    s = setup(cfg)
    res, val = train(s)
    # two evaluations without a gain of more than 0.02 over the best before them: stopped after the third
    assert res.stopped_early and res.steps == 3
    # step 2 is kept (a threshold that also picked the weights would have kept step 1)
    assert res.best_step == 2 and res.best_value == 0.99
    now = {n: p for n, p in s.model.named_parameters() if p.requires_grad}
    assert all(torch.equal(now[n], w) for n, w in weights[2].items())
    assert not all(torch.equal(now[n], w) for n, w in weights[3].items())  # the weights did move after step 2
    assert val["loss"] == 0.99  # the final metrics are handed step 2's evaluation, not the last one


def test_the_final_metrics_reuse_the_evaluation_of_the_weights_kept(tiny_bert, small_csv, monkeypatch):
    """The loop has scored the weights training ends with (the last evaluation's, or the best one's, restored): the
    final metrics take those figures, which are exactly what scoring the weights again gives, instead of scoring
    them again."""
    from lorafit.training import recipe

    s = setup(tiny_cfg(tiny_bert, small_csv, "train.max_steps=6", "eval.every=3"))
    res, val = train(s)
    np.testing.assert_array_equal(val["_logits"], evaluate(s, s.val_enc)["_logits"])
    scored = []
    real_evaluation = recipe.evaluate
    monkeypatch.setattr(recipe, "evaluate", lambda s, enc, desc=None: scored.append(desc) or real_evaluation(s, enc))
    metrics = final_metrics(s, res, val)
    assert "eval val" not in scored and metrics["val"]["loss"] == val["loss"]
    assert metrics["training"]["val_eval_seconds"] > 0 and "seconds" not in metrics["val"]


def test_patience_counts_from_the_last_gain_larger_than_the_threshold():
    losses = [1.0, 0.995, 0.98, 0.975, 0.971]
    history = [{"val_loss": v} for v in losses]
    # 0.98 beat the best before it (0.995) by more than 0.01; the two after it are better, but by less
    assert evaluations_without_gain(history, "val_loss", 0.01) == 2
    assert evaluations_without_gain(history, "val_loss", 0.0) == 0
    accuracies = [{"val_accuracy": v} for v in (0.5, 0.7, 0.7, 0.705)]
    assert evaluations_without_gain(accuracies, "val_accuracy", 0.01) == 2


@pytest.mark.parametrize("scheduler", ["cosine", "linear", "constant", "reduce_on_plateau"])
def test_schedules_warm_up_then_follow_their_shape(tiny_bert, small_csv, scheduler):
    cfg = tiny_cfg(
        tiny_bert,
        small_csv,
        f"train.scheduler={scheduler}",
        "train.max_steps=10",
        "eval.every=1",
        "train.warmup_ratio=0.2",
        "eval.early_stopping.patience=0",
    )
    res, _ = train(setup(cfg))
    lrs = [h["lr"] for h in res.history]
    peak = 5e-3
    assert lrs[0] < peak and max(lrs) == pytest.approx(peak)  # warm-up reaches the peak
    if scheduler in ("cosine", "linear"):
        assert lrs[-1] < 0.05 * peak
    elif scheduler == "constant":
        assert lrs[-1] == pytest.approx(peak)
    else:
        assert lrs[-1] <= peak


@pytest.mark.parametrize("scheduler", ["cosine", "linear"])
def test_a_time_limit_ends_the_schedule_at_the_deadline(scheduler):
    """With train.max_seconds the decay follows whichever is further along, steps or time: a run cut short by
    its deadline still ends at the bottom of its schedule; without a limit it follows the steps as before."""
    from transformers import get_scheduler

    from lorafit.schedule import Schedule

    def lrs(max_seconds, elapsed):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = Schedule(opt, scheduler, total_steps=100, warmup_steps=10, max_seconds=max_seconds)
        out = []
        for e in elapsed:
            sched.step(e)
            out.append(sched.lr)
        return out

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    ref = get_scheduler(scheduler, opt, num_warmup_steps=10, num_training_steps=100)
    by_steps = []
    for _ in range(100):
        ref.step()
        by_steps.append(opt.param_groups[0]["lr"])
    slow = [6.0 * i for i in range(1, 21)]  # 20 steps take 120 s: the 60 s deadline comes at step 10 of 100
    assert lrs(None, slow) == pytest.approx(by_steps[:20])  # no limit: steps only, as Trainer schedules it
    timed = lrs(60.0, slow)
    assert timed[4] == pytest.approx(by_steps[49])  # 30 s of 60: half-way through the schedule at step 5
    assert timed[9] == pytest.approx(0.0, abs=1e-12) and max(timed) == pytest.approx(1.0)
    fast = [0.01 * i for i in range(1, 21)]  # time barely moves: the steps lead
    assert lrs(60.0, fast) == pytest.approx(by_steps[:20])


def test_same_seed_gives_the_same_metrics(tiny_bert, small_csv):
    """CPU fp32: split, initialisation, batch order and LoRA dropout all follow train.seed, so two runs agree
    exactly (history, final metrics, every trained weight); another seed gives another run."""

    def trained(*extra):
        s = setup(tiny_cfg(tiny_bert, small_csv, "lora.dropout=0.3", *extra))
        res, val = train(s)
        final_metrics(s, res, val)
        weights = {n: p.detach().clone() for n, p in s.model.named_parameters() if p.requires_grad}
        return res, weights

    (a, wa), (b, wb) = trained(), trained()
    untimed = lambda h: [{k: v for k, v in row.items() if k != "elapsed_s"} for row in h]  # noqa: E731
    assert len(a.history) == 3 and untimed(a.history) == untimed(b.history)
    assert a.metrics["val"] == b.metrics["val"] and a.metrics["test"] == b.metrics["test"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[n], wb[n]) for n in wa)
    c, wc = trained("train.seed=7")
    assert untimed(c.history) != untimed(a.history) and not all(torch.equal(wa[n], wc[n]) for n in wa)


def test_over_budget_stops_before_training(tiny_bert, small_csv, tmp_path):
    cfg = [f"model.name={tiny_bert}", f"data.source={small_csv}", "budget.max_trainable=100"]
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "lorafit",
            "train",
            *sum((["--set", c] for c in cfg), []),
            "-o",
            str(tmp_path / "runs" / "r"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 3
    assert "OVER BUDGET" in p.stdout and "lora_A" in p.stdout
    assert p.stderr.strip().count("\n") == 0 and p.stderr.startswith("lorafit: error:")
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_embedded_minilm_learns_and_eval_cli_matches(minilm_run, tmp_path):
    """The real embedded MiniLM on 480 AG News rows: well above chance, and `lorafit eval` agrees."""
    out, metrics = minilm_run.folder, minilm_run.metrics
    assert metrics["val"]["accuracy"] > 0.6 and metrics["test"]["accuracy"] > 0.6
    assert f"accuracy: {metrics['val']['accuracy']:.4f}" in minilm_run.stdout
    q = subprocess.run(
        [
            sys.executable,
            "-m",
            "lorafit",
            "eval",
            str(out),
            "--data",
            "builtin:ag_news_sample_test",
            "--json",
            str(tmp_path / "m.json"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert q.returncode == 0, q.stderr[-2000:]
    again = json.loads((tmp_path / "m.json").read_text())
    # eval runs the merged, packed model; training scored the unmerged one: in bf16 a borderline row may flip
    assert again["accuracy"] == pytest.approx(metrics["test"]["accuracy"], abs=2 / 1000)
    assert f"accuracy: {again['accuracy']:.4f}" in q.stdout
