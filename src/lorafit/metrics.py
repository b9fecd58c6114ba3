"""Classification metrics from logits: accuracy, macro-F1, per-class precision/recall/F1, confusion matrix, loss."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(F.cross_entropy(torch.from_numpy(logits).float(), torch.from_numpy(labels)).item())


def classification_metrics(logits: np.ndarray, labels: np.ndarray, label_names: list[str]) -> dict:
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    pred = logits.argmax(-1)
    ids = list(range(len(label_names)))
    p, r, f, s = precision_recall_fscore_support(labels, pred, labels=ids, zero_division=0)
    return {
        "samples": int(len(labels)),
        "loss": cross_entropy(logits, labels),
        "accuracy": float((pred == labels).mean()),
        "macro_f1": float(np.mean(f)),
        "per_class": {
            name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, name in enumerate(label_names)
        },
        "confusion_matrix": confusion_matrix(labels, pred, labels=ids).tolist(),
    }
