"""A complete run loaded for inference: its adapter and head on a freshly loaded base model, and its tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import runs
from ..batching import Encoded, encode, predict_logits
from ..config import Config
from ..fast.device import pick_device, resolve_precision, store_frozen_in
from ..fast.patches import first_token_last_layer, pack_linear_layers, use_lorafit_attention
from ..models import build_model, load_tokenizer, quiet_peft_warnings


@dataclass
class LoadedRun:
    folder: Path
    cfg: Config
    label_names: list[str]
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    dtype: torch.dtype

    def encode(self, texts: list[str], labels: np.ndarray | None = None) -> Encoded:
        """The run's tokenisation of model input strings (already joined and preprocessed)."""
        labels = np.full(len(texts), -1) if labels is None else labels
        return encode(self.tokenizer, texts, labels, self.cfg.model.max_length)

    def predict_logits(self, enc: Encoded, progress: str | None = None) -> np.ndarray:
        """Logits for every encoded row, in input order, with the run's own batch size, device and precision."""
        return predict_logits(
            self.model, enc, self.cfg.eval.batch_size, self.tokenizer.pad_token_id, self.device, self.dtype, progress
        )


def load_run(folder: Path, precision: str | None = None, merge: bool = False) -> LoadedRun:
    """The saved adapter and head on top of a freshly loaded base model, ready for inference.

    merge=True folds the adapter into the base weights (in fp32, before any bf16 cast): prediction then costs
    exactly the base model's matmuls, and on a bf16 CPU the linear weights are packed for oneDNN
    (`speed.pack_weights`); such a model is for inference only. Logits match the unmerged model up to float rounding.
    """
    from peft import PeftModel

    folder = Path(folder)
    cfg = runs.read_run_config(folder)
    label_names = runs.read_labels(folder)
    device = pick_device()
    dtype = resolve_precision(precision or cfg.train.precision, device)
    with quiet_peft_warnings():
        base = build_model(cfg, len(label_names), label_names)
        model = PeftModel.from_pretrained(base, str(folder / runs.ADAPTER))
        if merge:
            model = model.merge_and_unload()
            model.requires_grad_(False)
    model.to(device)
    model.eval()
    store_frozen_in(model, dtype)
    if cfg.speed.skip_unused_tokens:
        first_token_last_layer(model)
    if cfg.speed.fast_attention:
        use_lorafit_attention(model, cheap_dropout=False, kernel=True)
    if merge and cfg.speed.pack_weights:
        pack_linear_layers(model)  # after merging: the packed weights are final
    tokenizer = load_tokenizer(str(folder / runs.TOKENIZER))
    return LoadedRun(folder, cfg, label_names, model, tokenizer, device, dtype)
