"""train.cache_frozen_layers: the frozen lower layers run once per training text, and later steps read their output."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TINY_SETTINGS
from lorafit.batching import collate, encode
from lorafit.config import load_config
from lorafit.models import build_model, wrap
from lorafit.training.frozen_prefix import cache_frozen_layers


def _model(tiny_bert, small_csv, *settings):
    cfg = load_config(None, [f"model.name={tiny_bert}", f"data.source={small_csv}", *TINY_SETTINGS, *settings])
    torch.manual_seed(0)
    return wrap(build_model(cfg, 4), cfg)


def _batch(texts, lengths_from):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(lengths_from)
    enc = encode(tok, texts, np.zeros(len(texts), dtype=np.int64), 32)
    return enc, tok.pad_token_id


TEXTS = [
    "Stocks rally as oil prices fall",
    "The team won the final in extra time after a long and hard game",
    "New phone chip",
    "Scientists find water on a distant moon, raising hopes",
]


def test_cached_steps_match_the_uncached_forward_and_skip_the_frozen_layers(tiny_bert, small_csv, one_thread):
    model = _model(tiny_bert, small_csv, "lora.layers_to_transform=[1]")
    enc, pad = _batch(TEXTS, tiny_bert)
    prefix, said = cache_frozen_layers(model, enc.lengths, torch.device("cpu"), torch.float32)
    assert prefix is not None and prefix.first_adapted == 1 and "0-0" in said
    encoder = prefix.encoder
    # the frozen layer and the embeddings lost their dropout; the adapted layer kept its own
    assert all(m.p == 0.0 for m in encoder.layer[0].modules() if isinstance(m, torch.nn.Dropout))
    assert any(m.p > 0.0 for m in encoder.layer[1].modules() if isinstance(m, torch.nn.Dropout))
    for m in model.modules():  # the rest of the comparison without any dropout at all
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    model.train()
    calls = []
    encoder.layer[0].register_forward_hook(lambda *a: calls.append(1))

    def logits(rows):
        with prefix.batch(rows):
            return model(**collate(enc, rows, pad, torch.device("cpu"))).logits

    reference = model(**collate(enc, np.array([3, 1, 0]), pad, torch.device("cpu"))).logits  # no rows: uncached
    assert len(calls) == 1
    first = logits(np.array([3, 1, 0]))  # computes and keeps rows 3, 1, 0
    assert len(calls) == 2 and [t is not None for t in prefix.kept] == [True, True, False, True]
    second = logits(np.array([0, 3]))  # every row kept: the frozen layer does not run
    assert len(calls) == 2
    torch.testing.assert_close(first, reference)
    torch.testing.assert_close(second, reference[[2, 0]])
    # a cached step gives the adapted layer and the head the gradients the whole forward pass gives
    trainable = [p for p in model.parameters() if p.requires_grad]
    second.sum().backward()
    cached_grads = [p.grad.clone() for p in trainable]
    model.zero_grad()
    model(**collate(enc, np.array([0, 3]), pad, torch.device("cpu"))).logits.sum().backward()
    assert len(calls) == 3
    for got, want in zip(cached_grads, [p.grad for p in trainable], strict=True):
        torch.testing.assert_close(got, want)
    assert sum(g.abs().sum() for g in cached_grads) > 0
    # evaluation runs the whole encoder
    model.eval()
    with torch.no_grad():
        model(**collate(enc, np.array([0]), pad, torch.device("cpu")))
    assert len(calls) == 4


def test_nothing_is_cached_when_the_lowest_layer_is_adapted(tiny_bert, small_csv):
    model = _model(tiny_bert, small_csv)  # the default: every layer adapted
    enc, _ = _batch(TEXTS, tiny_bert)
    assert cache_frozen_layers(model, enc.lengths, torch.device("cpu"), torch.float32) == (None, None)


def test_a_cache_that_would_not_fit_is_not_made_and_says_so(tiny_bert, small_csv, monkeypatch):
    from lorafit.training import frozen_prefix

    model = _model(tiny_bert, small_csv, "lora.layers_to_transform=[1]")
    enc, _ = _batch(TEXTS, tiny_bert)
    monkeypatch.setattr(frozen_prefix, "_free_memory", lambda device: 100)
    prefix, said = cache_frozen_layers(model, enc.lengths, torch.device("cpu"), torch.float32)
    assert prefix is None and "not caching the frozen layers 0-0" in said and "GiB free" in said
    assert any(m.p > 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))  # dropout left as it was


def test_a_run_with_cached_layers_trains_and_says_so(tiny_bert, small_csv, tmp_path, capsys):
    from lorafit.training.recipe import run

    settings = [*TINY_SETTINGS, "lora.layers_to_transform=[1]", "train.epochs=3", "speed.num_threads=1"]
    cfg = load_config(None, [f"model.name={tiny_bert}", f"data.source={small_csv}", *settings])
    res = run(cfg, tmp_path / "run")
    assert "frozen layers 0-0 cached without dropout" in capsys.readouterr().out
    losses = [h["train_loss"] for h in res.history]
    assert len(losses) == 3 and losses[-1] < losses[0]  # later epochs, read from the cache, still learn


def test_a_cached_run_interrupted_in_its_second_epoch_resumes_exactly(tiny_bert, small_csv, tmp_path, monkeypatch):
    """The resumed run's empty cache is filled again as the first epoch filled it, so it ends bit for bit where the
    run left alone ends (12 steps per epoch: the crash at step 18 falls after the step-16 checkpoint)."""
    from lorafit.training.recipe import run
    from test_resume import Crash, assert_same_run, crash_at
    from test_train import tiny_cfg

    monkeypatch.setattr("lorafit.training.recipe.write_run_report", lambda folder: None)
    settings = ["lora.layers_to_transform=[1]", "train.max_steps=30", "eval.every=3", "checkpoint.every=4"]
    cfg = tiny_cfg(tiny_bert, small_csv, *settings, "lora.dropout=0.3", "eval.early_stopping.patience=0")
    run(cfg, tmp_path / "ref")
    with pytest.raises(Crash):
        run(cfg, tmp_path / "run", on_eval=crash_at(18))
    run(cfg, tmp_path / "run", resume=True)
    assert_same_run(tmp_path / "ref", tmp_path / "run")
