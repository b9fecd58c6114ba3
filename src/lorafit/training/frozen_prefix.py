"""The frozen layers below the lowest adapted one, run once per training text and kept for the later epochs.

With adapters only on the upper layers (`lora.layers_to_transform`), the layers below them never change: their
output for a text is the same in every epoch, except for their dropout. With `train.cache_frozen_layers` those
layers (and the embeddings) run without dropout, so their output is a fixed function of the text; it is computed
the first time a training text is seen, kept in memory (real tokens only), and later epochs start the forward
pass at the lowest adapted layer. Backward never reaches the frozen layers either way, so a step then costs only
the adapted layers' forward and backward passes.

This is a recipe choice, not a pure speed switch: dropout in the frozen layers is gone. Evaluation and prediction
have none anyway, so training now sees those layers exactly as evaluation does.

A resumed run starts with an empty cache and fills it as it goes, computing each text's frozen layers in the batch
it now meets the text in; on the CPU that gives the same values as the first epoch's batch did, and the run resumes
bit for bit (tests/test_frozen_prefix.py).
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from ..fast.patches import bert_encoder

# the cache may take at most this share of the memory free when training starts (the device's, on a GPU)
MAX_MEMORY_SHARE = 0.5


class FrozenPrefix:
    """The output of the frozen layers [0, first_adapted) for every training text seen so far, and the encoder
    forward that reads it. The training loop says which rows a batch holds (`batch`); any other call (evaluation,
    prediction, no row indexes given) runs the whole encoder as before."""

    def __init__(self, encoder: nn.Module, first_adapted: int, lengths: np.ndarray):
        self.encoder, self.first_adapted, self.lengths = encoder, first_adapted, lengths
        self.kept: list[torch.Tensor | None] = [None] * len(lengths)
        self.rows: np.ndarray | None = None
        self.uncached_forward = encoder.forward
        encoder.forward = self.forward

    @contextmanager
    def batch(self, rows: np.ndarray):
        self.rows = rows
        try:
            yield
        finally:
            self.rows = None

    def forward(self, hidden_states, attention_mask=None, *args, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

        if self.rows is None or not self.encoder.training or args:
            return self.uncached_forward(hidden_states, attention_mask, *args, **kwargs)
        kwargs.pop("use_cache", None)  # the encoder's own argument; its layers take the rest
        hidden = self._prefix_output(hidden_states, attention_mask, kwargs)
        for layer in self.encoder.layer[self.first_adapted :]:
            hidden = layer(hidden, attention_mask, **kwargs)
        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=hidden)

    def _prefix_output(self, hidden_states, attention_mask, kwargs) -> torch.Tensor:
        rows, kept = self.rows, self.kept
        if any(kept[r] is None for r in rows):  # the first time some of these texts are seen: compute, keep
            with torch.no_grad():
                hidden = hidden_states
                for layer in self.encoder.layer[: self.first_adapted]:
                    hidden = layer(hidden, attention_mask, **kwargs)
            for i, r in enumerate(rows):
                if kept[r] is None:
                    kept[r] = hidden[i, : self.lengths[r]].clone()
            return hidden
        # every text seen before: the kept real tokens, padded with zeros to the batch's width (the attention
        # mask hides padding, so what it holds does not matter)
        first = kept[rows[0]]
        hidden = first.new_zeros(len(rows), hidden_states.shape[1], first.shape[-1])
        for i, r in enumerate(rows):
            hidden[i, : len(kept[r])] = kept[r]
        return hidden

    def kept_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.kept if t is not None)


def first_adapted_layer(encoder: nn.Module, embeddings: nn.Module | None) -> int | None:
    """The index of the lowest encoder layer with a trainable parameter, or None where nothing below it is frozen
    (layer 0 adapted, trainable embeddings, or no layer list)."""
    if embeddings is not None and any(p.requires_grad for p in embeddings.parameters()):
        return None
    for i, layer in enumerate(encoder.layer):
        if any(p.requires_grad for p in layer.parameters()):
            return i or None
    return len(encoder.layer)  # only the head trains: every layer's output can be kept


def _free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def cache_frozen_layers(model: nn.Module, lengths: np.ndarray, device: torch.device, dtype: torch.dtype):
    """Set up the cache for a BERT/RoBERTa model whose lower layers are frozen; returns (FrozenPrefix or None, a
    line saying what was done or why not, or None where there is nothing to say)."""
    encoder = bert_encoder(model)
    if encoder is None:
        return None, None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    embeddings = getattr(getattr(base, base.base_model_prefix, None), "embeddings", None)
    first = first_adapted_layer(encoder, embeddings)
    if first is None:
        return None, None
    hidden = model.config.hidden_size
    need = int(lengths.sum()) * hidden * torch.empty((), dtype=dtype).element_size()
    free = _free_memory(device)
    if need > MAX_MEMORY_SHARE * free:
        return None, (
            f"note: not caching the frozen layers 0-{first - 1}: their outputs would take {need / 2**30:.1f} GiB of "
            f"the {free / 2**30:.1f} GiB free; they run every step (train.cache_frozen_layers=false says so quietly)"
        )
    for module in [embeddings, *encoder.layer[:first]]:
        for m in module.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
    return FrozenPrefix(encoder, first, lengths), (
        f"frozen layers 0-{first - 1} cached without dropout (up to {need / 2**30:.2f} GiB)"
    )
