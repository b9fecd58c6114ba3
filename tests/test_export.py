"""`lorafit export --merged`: a plain transformers model that predicts like the unmerged run (fp32, max |Δlogit| < 1e-4)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import TINY_RUN_SETTINGS, make_tiny_model
from lorafit.batching import encode, predict_logits
from lorafit.cli import main as cli
from lorafit.config import load_config
from lorafit.inference.export import export_merged
from lorafit.inference.loaded import load_run
from lorafit.training.recipe import run

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest


@pytest.fixture(scope="module")
def texts(ag_sample) -> list[str]:
    return ag_sample["text"].sample(48, random_state=1).tolist() + ["Oil", ""]


@pytest.fixture(scope="module")
def data_csv(ag_sample, tmp_path_factory):
    path = tmp_path_factory.mktemp("export-data") / "small.csv"
    ag_sample.groupby("label", group_keys=False).head(40).to_csv(path, index=False)
    return path


def run_logits(run_dir, texts) -> np.ndarray:
    r = load_run(run_dir, "fp32")
    enc = encode(r.tokenizer, texts, np.zeros(len(texts)), r.cfg.model.max_length)
    return predict_logits(r.model, enc, 16, r.tokenizer.pad_token_id, torch.device("cpu"), torch.float32)


def merged_logits(folder, texts, max_length=32) -> np.ndarray:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        batch = tok(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        return model(**batch).logits.numpy()


CASES = {
    "dora-rslora-all-linear-bias": (
        "bert",
        [
            "lora.use_dora=true",
            "lora.use_rslora=true",
            "lora.init=gaussian",
            "lora.target_modules=all-linear",
            "lora.bias=lora_only",
        ],
    ),
    "lora": ("bert", []),
    "pissa": ("bert", ["lora.init=pissa", "lora.dropout=0"]),
    "roberta-own-head-dora": ("roberta", ["lora.use_dora=true", "lora.init=gaussian"]),
    # DistilBERT's linear head skips pre_classifier; the export writes it as an identity Linear
    "distilbert-linear-head": (
        "distilbert",
        ["model.head=linear", "lora.target_modules=[q_lin,v_lin]", "lora.init=gaussian"],
    ),
}
FAST_CASES = {"dora-rslora-all-linear-bias"}  # plain LoRA is covered fast by test_the_export_loads_without_peft


@pytest.mark.parametrize("case", [c if c in FAST_CASES else pytest.param(c, marks=pytest.mark.slow) for c in CASES])
def test_merged_export_predicts_like_the_run(case, tmp_path, tmp_path_factory, data_csv, texts, capsys):
    model_type, extra = CASES[case]
    base = make_tiny_model(tmp_path_factory.mktemp(f"tiny-{model_type}"), model_type)
    cfg = load_config(
        None, [f"model.name={base}", f"data.source={data_csv}", *TINY_RUN_SETTINGS, "train.max_steps=6", *extra]
    )
    run(cfg, tmp_path / "run")
    out = tmp_path / "merged"
    assert cli(["export", str(tmp_path / "run"), "--merged", str(out)]) == 0
    assert "max abs logit difference to the run" in capsys.readouterr().out

    assert not (out / "adapter_config.json").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "0", "1": "1", "2": "2", "3": "3"} and config["architectures"][0].endswith(
        "ForSequenceClassification"
    )
    diff = np.abs(merged_logits(out, texts) - run_logits(tmp_path / "run", texts)).max()
    assert diff < 1e-4, diff
    # the check means something only if merging moved the weights
    merged, original = load_file(out / "model.safetensors"), load_file(base / "model.safetensors")
    moved = max(
        (merged[k] - original[k.split(".", 1)[1]]).abs().max().item()  # the base was saved without the 'bert.' prefix
        for k in merged
        if k.endswith(("query.weight", "q_lin.weight"))
    )
    assert moved > 1e-4, moved


def test_the_export_loads_without_peft(tiny_run, tmp_path, texts):
    out = tmp_path / "merged"
    info = export_merged(tiny_run, out)
    assert info["max_abs_logit_diff"] < 1e-4
    script = (
        "import json, sys; sys.modules['peft'] = None\n"  # as if peft were not installed
        "import torch\n"
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n"
        f"m = AutoModelForSequenceClassification.from_pretrained({str(out)!r}).eval(); t = AutoTokenizer.from_pretrained({str(out)!r})\n"
        "texts = json.loads(sys.stdin.read())\n"
        "with torch.no_grad(): print(json.dumps(m(**t(texts, truncation=True, max_length=32, padding=True, return_tensors='pt')).logits.tolist()))\n"
        "assert not any(k == 'peft' or k.startswith('peft.') for k, v in sys.modules.items() if v is not None)\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", script],
        input=json.dumps(texts),
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert np.abs(np.array(json.loads(p.stdout)) - run_logits(tiny_run, texts)).max() < 1e-4


def test_a_roberta_linear_head_cannot_be_exported_and_says_so(tiny_run, tmp_path, tmp_path_factory, capsys):
    roberta = make_tiny_model(tmp_path_factory.mktemp("tiny-roberta-linear"), "roberta")
    fake = tmp_path / "run"
    shutil.copytree(tiny_run, fake)  # the check reads the config only, before any weights load
    cfg = yaml.safe_load((fake / "config.yaml").read_text())
    cfg["model"].update(name=str(roberta), head="linear")
    (fake / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert cli(["export", str(fake), "--merged", str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lorafit: error:") and "\n" not in err
    assert "model.head=linear on roberta" in err and "no plain transformers export is possible" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_export_refuses_to_overwrite_unless_asked(tiny_run, tmp_path, capsys):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli(["export", str(tiny_run), "--merged", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "already exists and is not empty; pass --overwrite" in err and "\n" not in err
    assert (out / "keep.txt").read_text() == "mine"
    assert cli(["export", str(tiny_run), "--merged", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "lorafit_export.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert json.loads((out / "lorafit_export.json").read_text())["label_names"] == ["0", "1", "2", "3"]
    assert not list(tmp_path.glob(".*partial"))


@pytest.mark.parametrize(
    "args,message",
    [
        (["{run}", "--merged", "{run}/merged"], "inside the run folder"),
        (["{tmp}/no-run", "--merged", "{tmp}/x"], "not found"),
        (["{run}", "--merged", "{tmp}/file.txt"], "is a file"),
    ],
)
def test_export_errors_are_one_line(tiny_run, tmp_path, capsys, args, message):
    (tmp_path / "file.txt").write_text("x")
    assert cli(["export", *(a.format(run=tiny_run, tmp=tmp_path) for a in args)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lorafit: error:") and message in err and "\n" not in err
    assert not (tiny_run / "merged").exists() and not (tmp_path / "x").exists()
