"""`model.head: mean`: one Linear on the masked mean of the last layer's token states.

The mean must leave padding out (a text's logits do not depend on what it is batched with), must survive peft's
copy of the trained head, must keep the fast path from cutting the last layer down to the first token, and must
reload from a run folder to the same predictions.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import TINY_RUN_SETTINGS, adapted_model, make_tiny_model
from lorafit import models
from lorafit.cli import main as cli
from lorafit.config import load_config
from lorafit.fast.patches import first_token_last_layer
from lorafit.training.recipe import run

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest

TEXTS = ["Oil prices rise", "The long report on markets, elections and football, released on Tuesday.", "Hi"]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(models.builtin_model_dir())


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_the_mean_leaves_padding_out(model_type, tmp_path, tokenizer):
    model = adapted_model(make_tiny_model(tmp_path, model_type), "mean")
    with torch.no_grad():
        batched = model(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits
        alone = torch.cat([model(**tokenizer([t], return_tensors="pt")).logits for t in TEXTS])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


def test_bert_pools_the_masked_mean_of_the_last_layer(tmp_path, tokenizer):
    model = adapted_model(make_tiny_model(tmp_path, "bert"), "mean")
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    encoder = model.base_model.model.bert
    with torch.no_grad():
        out = encoder(**batch)
    mask = batch["attention_mask"][..., None].float()
    expected = (out.last_hidden_state * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(out.pooler_output, expected)
    default = adapted_model(make_tiny_model(tmp_path / "default", "bert"), "default")
    assert first_token_last_layer(default) and not first_token_last_layer(model)


def test_a_mean_head_run_reloads_to_the_same_predictions(tiny_bert, tmp_path, ag_sample, capsys):
    data = tmp_path / "small.csv"
    ag_sample.groupby("label", group_keys=False).head(40).to_csv(data, index=False)
    cfg = load_config(
        None,
        [
            f"model.name={tiny_bert}",
            f"data.source={data}",
            f"data.test_source={data}",
            *TINY_RUN_SETTINGS,
            "model.head=mean",
            "eval.baseline=false",
            "train.lr=3e-2",  # enough for a 12-step tiny run to tell the classes apart
        ],
    )
    metrics = run(cfg, tmp_path / "run").metrics
    assert len({tuple(row) for row in np.array(metrics["test"]["confusion_matrix"]).T}) > 2
    assert cli(["eval", str(tmp_path / "run"), "--data", str(data), "--json", str(tmp_path / "m.json")]) == 0
    reloaded = json.loads((tmp_path / "m.json").read_text())
    assert reloaded["confusion_matrix"] == metrics["test"]["confusion_matrix"]
    assert np.isclose(reloaded["loss"], metrics["test"]["loss"], atol=1e-6)
    card = (tmp_path / "run" / "adapter" / "README.md").read_text()
    assert "`mean`" in card and "load the run with lorafit" in card

    capsys.readouterr()
    assert cli(["export", str(tmp_path / "run"), "--merged", str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.head=mean" in err and "\n" not in err and not (tmp_path / "merged").exists()


def test_distilbert_is_refused_in_one_line(tmp_path, ag_sample, capsys):
    base = make_tiny_model(tmp_path / "distil", "distilbert")
    data = tmp_path / "small.csv"
    ag_sample.head(40).to_csv(data, index=False)
    code = cli(
        ["train", "--set", f"model.name={base}", "--set", f"data.source={data}", "--set", "model.head=mean"]
        + ["-o", str(tmp_path / "run")]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "model.head=mean is not supported for model type 'distilbert'" in err and "\n" not in err
    assert not (tmp_path / "run").exists()
