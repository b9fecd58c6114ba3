"""Texts to batches: tokenise once without padding, pad each batch only to its longest text, and the inference loop.

Training batches group texts of similar length (a pure function of seed and epoch, so a resumed run sees the
same order); evaluation batches are length-sorted. Padding everything to max_length would waste most of the
compute on short texts such as news headlines.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .fast.device import autocast


@dataclass
class Encoded:
    ids: list[list[int]]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.ids), dtype=np.int64, count=len(self.ids))


# Set while `lorafit fit` shows its one bar for the whole budget: the runs under it hide their own. (tqdm's own
# TQDM_DISABLE is read once, when tqdm is imported, so it cannot be switched on for a while.)
_hide_bars = [False]


@contextmanager
def bars_hidden():
    before, _hide_bars[0] = _hide_bars[0], True
    try:
        yield
    finally:
        _hide_bars[0] = before


def bars_are_hidden() -> bool:
    return _hide_bars[0]


def encode(tokenizer, texts: list[str], labels: np.ndarray, max_length: int) -> Encoded:
    out = tokenizer(
        texts,
        truncation=True,
        max_length=max_length,
        padding=False,
        return_attention_mask=False,
        return_token_type_ids=False,
    )
    return Encoded(ids=out["input_ids"], labels=np.asarray(labels, dtype=np.int64))


def collate(
    enc: Encoded, index: np.ndarray, pad_id: int, device: torch.device, multiple: int = 1
) -> dict[str, torch.Tensor]:
    """The rows `index` padded to their longest, rounded up to a multiple of `multiple` (right padding), with the
    attention mask."""
    rows = [enc.ids[i] for i in index]
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    width = -(-int(lengths.max()) // multiple) * multiple
    mask = np.arange(width) < lengths[:, None]
    ids = np.full(mask.shape, pad_id, dtype=np.int64)
    ids[mask] = np.fromiter((t for r in rows for t in r), dtype=np.int64, count=int(lengths.sum()))  # row-major fill
    return {
        "input_ids": torch.from_numpy(ids).to(device),
        "attention_mask": torch.from_numpy(mask.astype(np.int64)).to(device),
    }


def train_batches(
    lengths: np.ndarray, batch_size: int, seed: int, epoch: int, group_by_length: bool
) -> list[np.ndarray]:
    """One epoch's batches, a pure function of (seed, epoch) so a resumed run sees the same order.

    With grouping, a shuffled order is cut into mega-batches of 50 batches, each sorted by length, and the
    batches are shuffled again: little padding, yet no batch order tied to length.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    if group_by_length:
        mega = batch_size * 50
        order = np.concatenate(
            [
                chunk[np.argsort(-lengths[chunk], kind="stable")]
                for chunk in np.array_split(order, max(1, -(-len(order) // mega)))
            ]
        )
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if group_by_length:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def eval_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    order = np.argsort(-lengths, kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def predict_logits(
    model: nn.Module,
    enc: Encoded,
    batch_size: int,
    pad_id: int,
    device: torch.device,
    dtype: torch.dtype,
    progress: str | None = None,
    passes: int = 1,
) -> np.ndarray:
    """Logits for every row, in input order (batches run longest first, sorted by length).

    A model loaded for inference (in eval mode) runs under inference_mode, which skips autograd's bookkeeping that
    no_grad still does per op: for an unmerged adapter's many small ops that is a measured third of the time of
    one text's forward pass. A model evaluated during training runs under no_grad and goes back to training mode:
    nothing made here may end up in a tensor its training later saves for backward.

    With `passes` > 1 (on a CPU: fast.device.concurrent_passes), that many threads each take the next batch and run
    it on their share of torch's threads; every row's logits are the same, up to the order of float sums."""
    from tqdm.auto import tqdm

    was_training = model.training
    if was_training:
        model.eval()
    out = np.zeros((len(enc), model.config.num_labels), dtype=np.float32)
    batches = eval_batches(enc.lengths, batch_size)
    quiet = progress is None or len(enc) < 2 * batch_size or bars_are_hidden()
    # passed only when quiet: otherwise tqdm's own TQDM_DISABLE, set by the user, still decides
    bar = tqdm(
        total=len(enc),
        desc=progress,
        unit="ex",
        leave=False,
        dynamic_ncols=True,
        **({"disable": True} if quiet else {}),
    )
    counted = threading.Lock()

    def run(index: np.ndarray) -> None:  # grad mode is per thread: each pass sets its own
        with torch.no_grad() if was_training else torch.inference_mode(), autocast(device, dtype):
            logits = model(**collate(enc, index, pad_id, device)).logits
        out[index] = logits.float().cpu().numpy()  # rows of one batch only: passes never write the same rows
        with counted:
            bar.update(len(index))

    try:
        passes = min(passes, len(batches))
        if passes <= 1:
            for index in batches:
                run(index)
        else:
            share = max(1, torch.get_num_threads() // passes)
            # torch.set_num_threads in a pool thread sets that thread's own count (OpenMP's is per thread)
            pool = ThreadPoolExecutor(passes, initializer=torch.set_num_threads, initargs=(share,))
            try:
                list(pool.map(run, batches))  # re-raises the first failed pass's exception
            finally:
                pool.shutdown(cancel_futures=True)  # after a failure, the batches not yet started are dropped
    finally:
        bar.close()
        if was_training:
            model.train()
    return out
