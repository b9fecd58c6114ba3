"""A run folder travels: its adapter names the base by hub id, and its model card says what the run is and how to
load it (plain peft, lorafit, the server); lorafit itself still reloads a copied run."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

import lorafit
from lorafit import runs
from lorafit.config import Config
from lorafit.model_card import model_card, name_base_by_hub_id
from lorafit.models import build_model, hub_id, wrap

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
AG_LABELS = ["World", "Sports", "Business", "Sci/Tech"]
TEXTS = ["Stocks fell sharply on Monday", "The striker scored twice", "New chip doubles battery life", "x"]
METRICS = {
    "val": {"samples": 720, "loss": 0.31234, "accuracy": 0.90278, "macro_f1": 0.90011, "per_class": {}},
    "training": {"steps": 375, "epochs": 1.0, "best_step": 300, "stopped_early": False},
}


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def card_of(run: Path) -> str:
    return (run / "adapter" / "README.md").read_text(encoding="utf-8")


def adapter_config(run: Path) -> dict:
    return json.loads((run / "adapter" / "adapter_config.json").read_text())


def minilm_config(**data) -> Config:
    return Config.model_validate({"model": {"name": "builtin:minilm"}, **data})


# ---------------------------------------------------------------------------------------------------------------------
# The base by hub id


def test_hub_id_names_a_builtin_by_its_hub_id_and_keeps_everything_else(tiny_bert):
    assert hub_id("builtin:minilm") == MINILM
    assert hub_id("roberta-base") == "roberta-base"
    assert hub_id("FacebookAI/roberta-base") == "FacebookAI/roberta-base"
    assert hub_id(str(tiny_bert)) == str(tiny_bert)  # a local folder: nothing better is known


def test_save_names_a_builtin_base_by_hub_id_and_keeps_every_other_field(tiny_run, tmp_path):
    """`save` itself, for a builtin:minilm config: peft writes this machine's base path, save rewrites it."""
    from peft import PeftConfig

    from lorafit.training.recipe import save

    tiny = runs.read_run_config(tiny_run)
    labels = runs.read_labels(tiny_run)
    model = wrap(build_model(tiny, len(labels), labels), tiny)  # any peft model writes the files save rewrites
    peft_wrote = {}

    def save_pretrained(path):  # peft's own save, and what it wrote before save rewrote it
        type(model).save_pretrained(model, path)
        peft_wrote.update(adapter_config(Path(path).parent))

    s = SimpleNamespace(
        cfg=minilm_config(),
        data=SimpleNamespace(label_names=AG_LABELS),
        budget=SimpleNamespace(to_dict=lambda: json.loads((tiny_run / "budget.json").read_text())),
        model=SimpleNamespace(save_pretrained=save_pretrained),
        tokenizer=SimpleNamespace(save_pretrained=lambda path: Path(path).mkdir()),
        blend=None,
    )
    folder = tmp_path / "run"
    folder.mkdir()
    save(s, SimpleNamespace(metrics=METRICS), folder)
    written = adapter_config(folder)
    assert peft_wrote["base_model_name_or_path"] == str(runs.read_run_config(tiny_run).model.name)
    assert written.pop("base_model_name_or_path") == MINILM
    peft_wrote.pop("base_model_name_or_path")
    assert written == peft_wrote
    assert PeftConfig.from_pretrained(str(folder / "adapter")).base_model_name_or_path == MINILM
    card = card_of(folder)
    assert front_matter(card)["base_model"] == MINILM
    assert "site-packages" not in card and "site-packages" not in json.dumps(written)


def test_a_local_base_folder_stays_its_path(tiny_run, tiny_bert):
    from peft import PeftConfig

    assert adapter_config(tiny_run)["base_model_name_or_path"] == str(tiny_bert)
    assert PeftConfig.from_pretrained(str(tiny_run / "adapter")).base_model_name_or_path == str(tiny_bert)
    card = card_of(tiny_run)
    assert "base_model" not in front_matter(card)  # not a hub id: the hub would reject it
    assert f"The local model folder `{tiny_bert}`" in card and "no known hub id" in card


def test_the_rewrite_keeps_the_other_fields(tiny_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(tiny_run, run)
    before = adapter_config(run)
    name_base_by_hub_id(run, "builtin:minilm")
    after = adapter_config(run)
    assert after.pop("base_model_name_or_path") == MINILM
    before.pop("base_model_name_or_path")
    assert after == before


# ---------------------------------------------------------------------------------------------------------------------
# The card


def test_the_card_of_a_trained_run_names_its_base_labels_and_metrics(tiny_run, tiny_bert):
    card = card_of(tiny_run)
    meta = front_matter(card)
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "text-classification"
    assert meta["tags"] == ["lorafit", "lora"] and "license" not in meta
    assert "More Information Needed" not in card  # peft's template is gone
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    for split, name in (("val", "validation"), ("test", "test")):
        m = metrics[split]
        assert f"| {name} | {m['samples']} | {m['accuracy']:.4f} | {m['macro_f1']:.4f} | {m['loss']:.4f} |" in card
    labels = runs.read_labels(tiny_run)
    assert all(f"| {i} | {name} |" in card for i, name in enumerate(labels))
    assert f"labels = {json.dumps(labels)}" in card and f"num_labels={len(labels)}" in card
    budget = json.loads((tiny_run / "budget.json").read_text())
    assert f"**{budget['total']:,}**" in card and f"{budget['max_trainable']:,}" in card
    assert "- Rank r: 4; alpha: 8" in card and "`query`, `value`" in card and "- Method: LoRA (peft)" in card
    assert "Licence of the data: not stated by the user." in card
    assert "truncated to 32 tokens" in card and "max_length=32" in card
    b = metrics["baseline"]
    assert (
        f"Baseline ({b['name']}): validation accuracy {b['val']['accuracy']:.4f}, "
        f"test accuracy {b['test']['accuracy']:.4f}." in card
    )
    for how in (
        "AutoPeftModelForSequenceClassification.from_pretrained(",
        'AutoTokenizer.from_pretrained("RUN/tokenizer")',
        "lorafit predict RUN --input texts.csv --output preds.csv",
        'clf = lorafit.load("RUN")',
        "lorafit serve NAME=RUN",
        "curl -s localhost:8000/models/NAME -H 'content-type: application/json' -d '{\"inputs\": \"some text\"}'",
        'InferenceClient(model="http://127.0.0.1:8000/models/NAME").text_classification("some text")',
    ):
        assert how in card, how
    assert not re.search(r"\b\d\d:\d\d\b", card)  # no time of day


def test_the_card_of_a_builtin_run_on_ag_news():
    cfg = minilm_config(
        lora={"use_dora": True, "r": 4, "alpha": 8, "target_modules": ["query", "value"]},
        data={"test_source": "builtin:ag_news_sample_test", "preprocess": ["strip_punctuation", "lowercase"]},
        model={"name": "builtin:minilm", "max_length": 96},
    )
    metrics = {
        **METRICS,
        "test": {"samples": 2000, "loss": 0.35, "accuracy": 0.8855, "macro_f1": 0.8849},
        "baseline": {"name": "TF-IDF + logistic regression", "val": {"accuracy": 0.8611}, "test": {"accuracy": 0.85}},
    }
    card = model_card(cfg, AG_LABELS, {}, metrics)
    meta = front_matter(card)
    assert meta["base_model"] == MINILM and meta["tags"] == ["lorafit", "lora", "dora"]
    assert meta["license"] == "other"  # AG's corpus terms: the one licence known
    assert f"[`{MINILM}`](https://huggingface.co/{MINILM})" in card and "licence apache-2.0" in card
    assert "- Method: DoRA (peft)" in card
    assert "AG News (Zhang, Zhao and LeCun, 2015)" in card
    assert "Licence of the data: AG's corpus is provided for research and other non-commercial use." in card
    assert "| validation | 720 | 0.9028 | 0.9001 | 0.3123 |" in card and "| test | 2000 | 0.8855 |" in card
    assert "Baseline (TF-IDF + logistic regression): validation accuracy 0.8611, test accuracy 0.8500." in card
    assert "| 3 | Sci/Tech |" in card
    # preprocessing in the order the run applies it, whatever order the config lists it in
    assert "`lowercase`, `strip_punctuation` in that order, truncated to 96 tokens" in card
    assert f"downloads the base model `{MINILM}` from the Hugging Face hub" in card
    assert "model.head: linear" not in card


@pytest.mark.parametrize(
    ("source", "ag"),
    [
        ("data/ag_news_train.csv", True),
        ("hub:fancyzhx/ag_news:train", True),
        ("reviews.csv", False),
        ("hub:imdb", False),
    ],
)
def test_the_data_licence(source, ag):
    card = model_card(minilm_config(data={"source": source}), ["a", "b"], {}, METRICS)
    assert f"`{source}`" in card
    assert ("AG News (Zhang, Zhao and LeCun, 2015)" in card) == ag
    assert ("research and other non-commercial use" in card) == ag
    assert ("Licence of the data: not stated by the user." in card) == (not ag)
    assert ("license" in front_matter(card)) == ag
    assert "Test data" not in card and "| test |" not in card  # no test source, no test row


def test_a_linear_head_sends_plain_peft_users_to_lorafit():
    card = model_card(minilm_config(model={"head": "linear"}), AG_LABELS, {}, METRICS)
    assert "`model.head: linear`" in card and "load the run with lorafit" in card


# ---------------------------------------------------------------------------------------------------------------------
# A copied run loads: with lorafit, and with the card's own plain-peft code


def test_a_copied_run_reloads_with_lorafit_whatever_the_adapter_names(tiny_run, tmp_path, one_thread):
    """lorafit builds the base from config.yaml's model.name: the adapter's base name (here the hub id of a model
    this test never loads) does not matter to it."""
    run = tmp_path / "elsewhere" / "run"
    shutil.copytree(tiny_run, run)
    name_base_by_hub_id(run, "builtin:minilm")
    expected = lorafit.load(tiny_run).predict_proba(TEXTS)
    clf = lorafit.load(run)
    assert clf.predict(TEXTS) == lorafit.load(tiny_run).predict(TEXTS)
    np.testing.assert_allclose(clf.predict_proba(TEXTS), expected, atol=1e-6)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft against transformers 5
def test_the_cards_plain_peft_code_loads_the_run_as_lorafit_does(tiny_run, tmp_path, one_thread, capsys):
    import torch

    run = tmp_path / "copy"
    shutil.copytree(tiny_run, run)
    code = re.search(r"### With plain peft\n\n```python\n(.*?)```", card_of(run), re.S).group(1)
    ns: dict = {}
    exec(code.replace("RUN", str(run)), ns)  # the card's snippet, as a user would paste it
    labels = runs.read_labels(run)
    assert capsys.readouterr().out.strip() in [json.dumps([name]).replace('"', "'") for name in labels]
    model, tokenizer = ns["model"], ns["tokenizer"]
    assert model.config.id2label == dict(enumerate(labels))
    with torch.no_grad():
        batch = tokenizer(TEXTS, padding=True, truncation=True, max_length=32, return_tensors="pt")
        logits = model(**batch).logits.numpy()
    np.testing.assert_allclose(logits, lorafit.load(run).logits(TEXTS), atol=1e-5)
