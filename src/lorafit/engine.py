"""The fast path shared by training, evaluation and prediction.

- tokenise once, without padding; pad each batch only to its longest text (AG News averages ~55 tokens, so
  padding everything to 128 wastes more than half the compute);
- training batches group texts of similar length, evaluation batches are length-sorted;
- bf16 where the hardware has it: the frozen base is stored in bf16, adapters and head stay fp32 for AdamW.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import nn

from .errors import LorafitError


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them (empty where /proc/cpuinfo cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(f.read().split())
    except OSError:
        return frozenset()


def cpu_has_bf16() -> bool:
    return not cpu_flags().isdisjoint({"avx512_bf16", "amx_bf16"})


def pick_device() -> torch.device:
    if os.environ.get("LORAFIT_DEVICE"):
        return torch.device(os.environ["LORAFIT_DEVICE"])
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    if precision == "fp32":
        return torch.float32
    if precision == "fp16":
        if device.type != "cuda":
            raise LorafitError("train.precision=fp16 needs a CUDA GPU and none is in use; use precision auto, bf16 or fp32")
        return torch.float16
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
    else:
        supported = cpu_has_bf16()
    if precision == "bf16":
        return torch.bfloat16  # asked for explicitly: honour it (emulated and slow where unsupported)
    return torch.bfloat16 if supported else torch.float32


def set_threads(n: int | None) -> None:
    torch.set_num_threads(n or max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


@lru_cache(maxsize=1)
def _libc():
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (macOS, musl): nothing to do
        return None


def release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc). Batches of varying length leave the heap fragmented with
    free blocks of every size, and peak RSS creeps up over the first minutes of training; trimming every few
    steps keeps it flat for a fraction of a percent of the step time."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


ADAPTER_KEYS = ("lora_", "modules_to_save")


def store_frozen_in(model: nn.Module, dtype: torch.dtype) -> None:
    """Keep frozen weights in the compute dtype (halves memory and casts); trainable ones stay fp32.

    PEFT casts each adapter's input to the adapter's dtype (fp32) before the LoRA matmuls; under autocast
    those matmuls run in bf16 anyway, so that round trip is pure copying and is switched off.
    """
    if dtype == torch.float32:
        return
    for name, p in model.named_parameters():
        # adapter and head weights stay fp32 even when frozen (a reloaded run), so it computes like in training
        if not p.requires_grad and p.is_floating_point() and not any(k in name for k in ADAPTER_KEYS):
            p.data = p.data.to(dtype)
    for module in model.modules():
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = False


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class Encoded:
    ids: list[list[int]]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.ids), dtype=np.int64, count=len(self.ids))


def encode(tokenizer, texts: list[str], labels: np.ndarray, max_length: int) -> Encoded:
    out = tokenizer(texts, truncation=True, max_length=max_length, padding=False, return_attention_mask=False, return_token_type_ids=False)
    return Encoded(ids=out["input_ids"], labels=np.asarray(labels, dtype=np.int64))


def collate(enc: Encoded, index: np.ndarray, pad_id: int, device: torch.device, multiple: int = 1) -> dict[str, torch.Tensor]:
    """The rows `index` padded to their longest, rounded up to a multiple of `multiple` (right padding), with the
    attention mask."""
    rows = [enc.ids[i] for i in index]
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    width = -(-int(lengths.max()) // multiple) * multiple
    mask = np.arange(width) < lengths[:, None]
    ids = np.full(mask.shape, pad_id, dtype=np.int64)
    ids[mask] = np.fromiter((t for r in rows for t in r), dtype=np.int64, count=int(lengths.sum()))  # row-major fill
    return {"input_ids": torch.from_numpy(ids).to(device), "attention_mask": torch.from_numpy(mask.astype(np.int64)).to(device)}


def train_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int, group_by_length: bool) -> list[np.ndarray]:
    """One epoch's batches, a pure function of (seed, epoch) so a resumed run sees the same order.

    With grouping, a shuffled order is cut into mega-batches of 50 batches, each sorted by length, and the
    batches are shuffled again: little padding, yet no batch order tied to length.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    if group_by_length:
        mega = batch_size * 50
        order = np.concatenate([chunk[np.argsort(-lengths[chunk], kind="stable")] for chunk in np.array_split(order, max(1, -(-len(order) // mega)))])
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if group_by_length:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def eval_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    order = np.argsort(-lengths, kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def predict_logits(model: nn.Module, enc: Encoded, batch_size: int, pad_id: int, device: torch.device, dtype: torch.dtype, progress: str | None = None) -> np.ndarray:
    """Logits for every row, in input order (batches run longest first, sorted by length)."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    out = np.zeros((len(enc), model.config.num_labels), dtype=np.float32)
    batches = eval_batches(enc.lengths, batch_size)
    bar = tqdm(total=len(enc), desc=progress, unit="ex", leave=False, disable=progress is None or len(enc) < 2 * batch_size, dynamic_ncols=True)
    for index in batches:
        with autocast(device, dtype):
            logits = model(**collate(enc, index, pad_id, device)).logits
        out[index] = logits.float().cpu().numpy()
        bar.update(len(index))
    bar.close()
    model.train(was_training)
    return out
