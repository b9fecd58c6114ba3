"""The report's plots, with matplotlib's object-oriented API on the Agg canvas: no pyplot, no global backend
switch, no display."""

from __future__ import annotations

import math
from pathlib import Path

from ..config import validate
from ..errors import LorafitError
from ..schedule import Schedule
from .run_files import RunFiles


def _figure(width: float = 6.4, height: float = 4.0):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig, path: Path) -> Path:
    fig.savefig(path, format="png", metadata={"Software": None})
    return path


def _no_data(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} recorded", ha="center", va="center", transform=ax.transAxes, color="0.4")


def _readable_ylim(ax, values: list[float], floor: float | None = None, ceiling: float | None = None) -> None:
    """Autoscaling one point (or a flat line) zooms into the fifth decimal; keep some context around the values."""
    lo, hi = min(values), max(values)
    pad = max((hi - lo) * 0.1, 0.05 * max(abs(hi), 1e-3))
    lo, hi = lo - pad, hi + pad
    ax.set_ylim(max(lo, floor) if floor is not None else lo, min(hi, ceiling) if ceiling is not None else hi)


def _few_evaluations_note(ax, n: int) -> None:
    if n == 1:
        ax.text(
            0.5,
            0.02,
            "one evaluation: set eval.every to a number of steps for a curve",
            ha="center",
            va="bottom",
            transform=ax.transAxes,
            color="0.4",
            fontsize=8,
        )


def plot_loss(run: RunFiles, path: Path) -> Path:
    fig = _figure()
    ax = fig.add_subplot()
    h = run.history
    if h:
        epochs = [r["epoch"] for r in h]
        ax.plot(epochs, [r["train_loss"] for r in h], "o-", label="train (mean since the last evaluation)")
        ax.plot(epochs, [r["val_loss"] for r in h], "s-", label="validation")
        _readable_ylim(ax, [r[k] for r in h for k in ("train_loss", "val_loss")], floor=0)
        _few_evaluations_note(ax, len(h))
        ax.legend()
    else:
        _no_data(ax, "evaluations")
    ax.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_accuracy(run: RunFiles, path: Path) -> Path:
    fig = _figure()
    ax = fig.add_subplot()
    h = run.history
    if h:
        epochs = [r["epoch"] for r in h]
        ax.plot(epochs, [r["val_accuracy"] for r in h], "o-", label="val accuracy")
        scores = [r["val_accuracy"] for r in h]
        if all("val_macro_f1" in r for r in h):
            ax.plot(epochs, [r["val_macro_f1"] for r in h], "s--", label="val macro-F1", alpha=0.8)
            scores += [r["val_macro_f1"] for r in h]
        _readable_ylim(ax, scores, floor=0, ceiling=1.0)
        _few_evaluations_note(ax, len(h))
        ax.legend()
    else:
        _no_data(ax, "evaluations")
    ax.set(xlabel="epoch", ylabel="score", title="Validation accuracy")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def lr_curve(run: RunFiles) -> tuple[list[int], list[float]] | None:
    """The learning rate after every optimizer step, replayed with the training code's own Schedule.

    The history records the rate only at evaluations; the planned step count (which fixes the schedule's
    shape) follows from the config and the first evaluation. Returns None when it cannot be replayed exactly
    (checked against every recorded rate).
    """
    import torch

    h = run.history
    steps_run = run.metrics.get("training", {}).get("steps") or (h[-1]["step"] if h else 0)
    if not h or not steps_run:
        return None
    try:
        cfg = validate(run.config, "config.yaml")
    except LorafitError:
        return None
    t = cfg.train
    if t.max_steps:
        total = t.max_steps
    elif cfg.eval.every == "epoch":
        total = max(1, math.ceil(h[0]["step"] * t.epochs)) if t.epochs >= 1 else h[0]["step"]
    else:
        return None  # the steps per epoch would need the training data
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=t.lr)
    sched = Schedule(opt, t.scheduler, total, math.ceil(t.warmup_ratio * total))
    val_loss_at = {r["step"]: r["val_loss"] for r in h}
    steps, lrs = [], []
    for step in range(1, steps_run + 1):
        opt.step()  # a no-op (no gradients), in the training loop's order
        sched.step()
        steps.append(step)
        lrs.append(sched.lr)
        if step in val_loss_at:
            sched.on_eval(val_loss_at[step])
    recorded = {r["step"]: r["lr"] for r in h}
    if any(
        s > steps_run or not math.isclose(lrs[s - 1], lr, rel_tol=1e-6, abs_tol=1e-12) for s, lr in recorded.items()
    ):
        return None
    return steps, lrs


def plot_lr(run: RunFiles, path: Path) -> Path:
    fig = _figure()
    ax = fig.add_subplot()
    curve = lr_curve(run)
    if curve:
        ax.plot(*curve, "-", label="schedule")
    if run.history:
        ax.plot(
            [r["step"] for r in run.history],
            [r["lr"] for r in run.history],
            "o",
            label="at evaluations",
            **({} if curve else {"linestyle": "-"}),
        )
        ax.legend()
    else:
        _no_data(ax, "learning rate")
    ax.set(xlabel="optimizer step", ylabel="learning rate", title="Learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax.grid(alpha=0.3)
    return _save(fig, path)


def scored_splits(run: RunFiles) -> list[str]:
    return [s for s in ("val", "test") if s in run.metrics and "confusion_matrix" in run.metrics[s]]


def plot_confusion(run: RunFiles, path: Path) -> Path:
    import numpy as np

    splits = scored_splits(run)
    n = len(run.label_names)
    side = max(3.6, 0.55 * n + 2.2)
    fig = _figure(side * max(1, len(splits)), side)
    axes = fig.subplots(1, max(1, len(splits)), squeeze=False)[0]
    for ax, split in zip(axes, splits or [None], strict=True):
        if split is None:
            _no_data(ax, "confusion matrix")
            continue
        cm = np.asarray(run.metrics[split]["confusion_matrix"], dtype=float)
        share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)  # colour by recall, so rare classes show too
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        if n <= 25:
            for i in range(n):
                for j in range(n):
                    ax.text(
                        j,
                        i,
                        f"{int(cm[i, j])}",
                        ha="center",
                        va="center",
                        fontsize=8 if n > 10 else 10,
                        color="white" if share[i, j] > 0.5 else "black",
                    )
        ax.set_xticks(
            range(n),
            run.label_names,
            rotation=45 if n > 4 or max(map(len, run.label_names)) > 8 else 0,
            ha="right" if n > 4 else "center",
        )
        ax.set_yticks(range(n), run.label_names)
        ax.set(xlabel="predicted", ylabel="true", title=f"{split} ({int(cm.sum())} rows)")
    return _save(fig, path)


def plot_f1(run: RunFiles, path: Path) -> Path:
    import numpy as np

    splits = scored_splits(run)
    n = len(run.label_names)
    fig = _figure(max(6.4, 0.5 * n * max(1, len(splits)) + 2), 4.0)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(splits))
    x = np.arange(n)
    for k, split in enumerate(splits):
        f1 = [run.metrics[split]["per_class"][c]["f1"] for c in run.label_names]
        bars = ax.bar(
            x + (k - (len(splits) - 1) / 2) * width,
            f1,
            width,
            label=f"{split} (macro {run.metrics[split]['macro_f1']:.3f})",
        )
        if n <= 12:
            ax.bar_label(bars, fmt="%.3f", fontsize=8)
    if not splits:
        _no_data(ax, "per-class scores")
    ax.set_xticks(x, run.label_names, rotation=45 if n > 6 else 0, ha="right" if n > 6 else "center")
    ax.set(ylabel="F1", ylim=(0, 1.08), title="Per-class F1")
    if splits:
        ax.legend(loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_val_loss_overlay(runs: list[RunFiles], labels: list[str], path: Path) -> Path:
    fig = _figure(8.0, 4.8)
    ax = fig.add_subplot()
    for run, label in zip(runs, labels, strict=True):
        h = run.history
        if h:
            ax.plot([r["epoch"] for r in h], [r["val_loss"] for r in h], "o-", markersize=3, label=label)
    if any(r.history for r in runs):
        ax.legend(fontsize=8 if len(runs) > 6 else 10, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        _no_data(ax, "evaluations")
    ax.set(xlabel="epoch", ylabel="validation loss", title="Validation loss")
    ax.grid(alpha=0.3)
    return _save(fig, path)
