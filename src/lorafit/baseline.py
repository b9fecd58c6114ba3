"""The classical baseline every run is measured against: TF-IDF word n-grams and a linear SVM.

It trains in seconds on the run's own training split (the same texts after the run's preprocessing) and is scored
on the same validation and test rows, so a run whose adapter does not beat it is plainly not worth its minutes.
scikit-learn does all of the work; this module only fixes the recipe and the shape of the figures.
"""

from __future__ import annotations

import time

import numpy as np

from .data import Data, Split
from .metrics import classification_metrics

NAME = "TF-IDF (word 1-2 grams) + linear SVM"
# The recipe: word uni- and bigrams with sublinear term frequency, terms seen in at least two texts, a linear SVM.
# It is the usual strong classical text classifier; on held-out AG News rows it matched logistic regression and
# SGD (docs/accuracy.md) at a third of logistic regression's time.
NGRAMS = (1, 2)
MIN_DF = 2
C = 0.5


def _scored(scores: np.ndarray, split: Split, names: list[str]) -> dict:
    # An SVM's decision values are not probabilities, so a cross-entropy of them would mean nothing: no loss.
    m = classification_metrics(scores.astype(np.float32), split.labels, names)
    return {k: v for k, v in m.items() if k != "loss"}


def fit_and_score(data: Data) -> dict:
    """Train the baseline on data.train; its metrics on data.val (and data.test when there is one)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.svm import LinearSVC

    start = time.perf_counter()
    names = data.label_names
    vectorizer = TfidfVectorizer(ngram_range=NGRAMS, min_df=MIN_DF, sublinear_tf=True)
    try:
        features = vectorizer.fit_transform(data.train.texts)
    except ValueError:  # too few texts for min_df (a handful of rows): keep every term
        vectorizer = TfidfVectorizer(ngram_range=NGRAMS, sublinear_tf=True)
        features = vectorizer.fit_transform(data.train.texts)
    classes = np.unique(data.train.labels)
    out: dict = {"name": NAME}
    if len(classes) < 2:
        return out | {"skipped": "the training split has a single class"}
    svm = LinearSVC(C=C).fit(features, data.train.labels)

    def scores(split: Split) -> np.ndarray:
        # LinearSVC scores only the classes it saw; a class absent from training never wins
        seen = svm.decision_function(vectorizer.transform(split.texts)).reshape(len(split), -1)
        if len(classes) == 2:
            seen = np.stack([-seen[:, 0], seen[:, 0]], axis=1)
        full = np.full((len(split), len(names)), -1e9)
        full[:, classes] = seen
        return full

    out["val"] = _scored(scores(data.val), data.val, names)
    if data.test is not None:
        out["test"] = _scored(scores(data.test), data.test, names)
    out["train_seconds"] = round(time.perf_counter() - start, 2)
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
