"""The classical baseline every run is measured against: TF-IDF word n-grams and a linear SVM.

It trains in seconds on the run's own training split (the same texts after the run's preprocessing) and is scored
on the same validation and test rows, so a run whose adapter does not beat it is plainly not worth its minutes.
The model and its recipe are blend.TfidfModel's (a run can also blend it with its adapter); this module only
shapes the figures.
"""

from __future__ import annotations

import time

import numpy as np

from .blend import TfidfModel
from .data import Data, Split
from .metrics import classification_metrics

NAME = "TF-IDF (word 1-2 grams) + linear SVM"


def _scored(scores: np.ndarray, split: Split, names: list[str]) -> dict:
    # An SVM's decision values are not probabilities, so a cross-entropy of them would mean nothing: no loss.
    m = classification_metrics(scores.astype(np.float32), split.labels, names)
    return {k: v for k, v in m.items() if k != "loss"}


def fit(data: Data) -> TfidfModel | None:
    """The baseline trained on data.train; None when the training split has a single class."""
    if len(np.unique(data.train.labels)) < 2:
        return None
    return TfidfModel.fit(data.train.texts, data.train.labels, len(data.label_names))


def fit_and_score(data: Data, model: TfidfModel | None = None) -> dict:
    """The baseline's metrics on data.val (and data.test when there is one); `model` is the baseline already
    trained on data.train (fit), or None to train it here."""
    names = data.label_names
    out: dict = {"name": NAME}
    model = model or fit(data)
    if model is None:
        return out | {"skipped": "the training split has a single class"}
    start = time.perf_counter()
    out["val"] = _scored(model.scores(data.val.texts), data.val, names)
    if data.test is not None:
        out["test"] = _scored(model.scores(data.test.texts), data.test, names)
    out["train_seconds"] = round(model.fit_seconds + time.perf_counter() - start, 2)  # training and scoring
    return out


def verdict(metrics: dict) -> str | None:
    """One line comparing the adapter with the baseline on validation, or None when there is no baseline."""
    base = metrics.get("baseline") or {}
    if "val" not in base:
        return None
    ours, theirs = metrics["val"]["accuracy"], base["val"]["accuracy"]
    line = f"baseline ({base['name']}): val accuracy {theirs:.4f}"
    if "test" in base:
        line += f", test accuracy {base['test']['accuracy']:.4f}"
    if ours > theirs:
        return line + f"; the adapter is {100 * (ours - theirs):.2f} points better on validation"
    return (
        line + f"\nwarning: the adapter ({ours:.4f}) does not beat the baseline ({theirs:.4f}) on validation; "
        "train longer (train.epochs, more data) or try a larger layout (`lorafit plan`)"
    )
