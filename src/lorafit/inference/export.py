"""`lorafit export RUN --merged DIR`: the adapter merged into the base weights, saved as a plain transformers model.

The folder loads with `AutoModelForSequenceClassification.from_pretrained(DIR)` (and `AutoTokenizer`) without
peft or lorafit. Before the folder is renamed into place, the export is reloaded that way and its logits are
checked against the unmerged run in fp32 on a few probe texts; a mismatch fails the export and leaves nothing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import runs
from ..batching import encode, predict_logits
from ..errors import LorafitError
from ..models import FirstTokenHead, MaskedMean, build_model
from .loaded import load_run

MAX_ABS_DIFF = 1e-4
PROBE_TEXTS = [
    "Stocks fell sharply on Monday as investors worried about rising interest rates.",
    "The striker scored twice in the second half to give the home side a 3-1 win.",
    "Scientists unveiled a new chip that doubles battery life in phones.",
    "Talks between the two governments resumed in Geneva after a week-long pause.",
    "Oil",
    "A quiet day.",
    " ".join(["The long report, released on Tuesday, covers markets, elections, football and new software."] * 12),
]


def _check_head_exportable(cfg, n_labels: int) -> None:
    """lorafit's own heads (`linear` on RoBERTa-like models, `mean` on any) have no counterpart transformers rebuilds."""
    skeleton = build_model(cfg, n_labels, weights=False)  # meta device: no weights loaded
    if any(isinstance(m, MaskedMean) for m in skeleton.modules()):
        raise LorafitError(
            f"this run uses model.head=mean, a Linear on the mean of the token states, which transformers' "
            f"{type(skeleton).__name__} cannot rebuild (it reads the first token), so no plain transformers export is "
            "possible; use the run itself (`lorafit predict`, `lorafit serve`, `lorafit.load`) or train with "
            "model.head=default to export"
        )
    if any(isinstance(m, FirstTokenHead) for m in skeleton.modules()):
        raise LorafitError(
            f"this run uses model.head=linear on {skeleton.config.model_type}, whose one-Linear head has no counterpart in "
            f"transformers' {type(skeleton).__name__} (dense + tanh + out_proj), so no plain transformers export is possible; "
            "use the run itself (`lorafit predict`, `lorafit.load`) or train with model.head=default to export"
        )


def _plain_head(model: nn.Module) -> nn.Module:
    """DistilBERT's `linear` head bypasses pre_classifier with an Identity; an identity-weight Linear is the same function."""
    pre = getattr(model, "pre_classifier", None)
    if isinstance(pre, nn.Identity):
        dim = model.config.dim
        lin = nn.Linear(dim, dim)
        with torch.no_grad():
            lin.weight.copy_(torch.eye(dim))
            lin.bias.zero_()
        model.pre_classifier = lin
    return model


def _logits(model: nn.Module, tokenizer, max_length: int) -> np.ndarray:
    """fp32 CPU logits of the probe texts: any model (the run, or the plain transformers export reloaded)."""
    enc = encode(tokenizer, PROBE_TEXTS, np.zeros(len(PROBE_TEXTS)), max_length)
    return predict_logits(model, enc, len(PROBE_TEXTS), tokenizer.pad_token_id, torch.device("cpu"), torch.float32)


def export_merged(run_dir: Path, out: Path, overwrite: bool = False) -> dict:
    """Merge the run's adapter into its base model and save a plain transformers model + tokenizer to `out`."""
    from transformers import AutoModelForSequenceClassification

    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and not out.is_dir():
        raise LorafitError(f"--merged: {out} is a file; expected a folder to write the model into")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise LorafitError(
            f"--merged: {out} already exists and is not empty; pass --overwrite to replace it or pick another folder"
        )
    if out.resolve() == run_dir.resolve() or run_dir.resolve() in out.resolve().parents:
        raise LorafitError(f"--merged: {out} is inside the run folder {run_dir}; pick a folder outside it")
    cfg = runs.read_run_config(run_dir)
    label_names = runs.read_labels(run_dir)
    _check_head_exportable(cfg, len(label_names))

    run = load_run(run_dir, "fp32")  # unmerged: the logits the export is checked against
    run.model.to("cpu")  # the check compares fp32 CPU logits; the saved weights are device-free anyway
    before = _logits(run.model, run.tokenizer, cfg.model.max_length)
    merged = _plain_head(run.model.merge_and_unload())
    leftover = sorted({type(m).__module__ for m in merged.modules() if type(m).__module__.startswith("peft")})
    if leftover:
        raise RuntimeError(f"merge_and_unload left peft modules in the model: {leftover}")

    # written under a temporary sibling name and renamed once verified: a failed export leaves nothing,
    # and an existing folder (--overwrite) is replaced only by a good one
    work = out.parent / f".{out.name}.partial"
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    try:
        merged.save_pretrained(work)
        run.tokenizer.save_pretrained(work)
        reloaded = AutoModelForSequenceClassification.from_pretrained(work, dtype=torch.float32)
        diff = float(np.abs(_logits(reloaded, run.tokenizer, cfg.model.max_length) - before).max())
        if not diff < MAX_ABS_DIFF:
            raise LorafitError(
                f"the merged export's logits differ from the run's by up to {diff:.2e} (limit {MAX_ABS_DIFF:g}); "
                f"this adapter configuration cannot be merged faithfully, use the run itself (`lorafit predict`)"
            )
        info = {
            "run": str(run_dir.resolve()),
            "model_type": merged.config.model_type,
            "label_names": label_names,
            "max_length": cfg.model.max_length,
            "text_columns": cfg.data.text_columns,
            "preprocess": cfg.data.preprocess,
            "max_abs_logit_diff": diff,
            "probe_texts": len(PROBE_TEXTS),
            "blend_left_out": run.blend is not None,
        }
        (work / "lorafit_export.json").write_text(json.dumps(info, indent=1))
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return info
