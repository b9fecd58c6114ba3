"""What a run did, at a glance: `report.html` in every run folder, rebuilt at any time by `lorafit report RUN`.

Everything is built from the files a run folder already holds (history.jsonl, metrics.json, budget.json,
config.yaml, labels.json).
"""

from __future__ import annotations

import html
from pathlib import Path

from ..atomic import atomic_write_text
from .html import figure_html, fmt, page, table
from .plots import plot_accuracy, plot_confusion, plot_f1, plot_loss, plot_lr, scored_splits
from .run_files import RunFiles, read_run_files

REPORT = "report.html"
PLOTS = {
    "loss": "loss.png",
    "accuracy": "accuracy.png",
    "lr": "lr.png",
    "confusion": "confusion_matrix.png",
    "f1": "per_class_f1.png",
}


def _summary_rows(run: RunFiles) -> list[list]:
    rows = []
    for split in ("val", "test"):
        m = run.metrics.get(split)
        if m:
            rows.append(
                [split, fmt(m.get("samples")), fmt(m.get("accuracy")), fmt(m.get("macro_f1")), fmt(m.get("loss"))]
            )
    base = run.metrics.get("baseline") or {}
    for split in ("val", "test"):
        m = base.get(split)
        if m:  # the classical bar on the same rows; an SVM has no loss
            rows.append(
                [f"{split}, baseline", fmt(m.get("samples")), fmt(m.get("accuracy")), fmt(m.get("macro_f1")), "—"]
            )
    blend = run.metrics.get("blend") or {}
    for split in ("val", "test"):
        m = blend.get(split)
        if m:  # what predict, eval and serve answer with: the adapter blended with a TF-IDF model
            rows.append(
                [
                    f"{split}, blend",
                    fmt(m.get("samples")),
                    fmt(m.get("accuracy")),
                    fmt(m.get("macro_f1")),
                    fmt(m.get("loss")),
                ]
            )
    return rows


def _baseline_note(metrics: dict) -> str:
    base = metrics.get("baseline") or {}
    if "val" not in base:
        return "<p>No baseline in this run's metrics.json (eval.baseline off, or a run from an older lorafit).</p>"
    ours, theirs = metrics.get("val", {}).get("accuracy"), base["val"]["accuracy"]
    verdict = (
        f"the adapter beats it by {100 * (ours - theirs):.2f} points on validation"
        if ours is not None and ours > theirs
        else "<strong>the adapter does not beat it on validation</strong>"
    )
    return (
        f"<p>Baseline rows: {html.escape(base.get('name', 'baseline'))}, trained on the same training rows in "
        f"{fmt(base.get('train_seconds'), 1)} s; {verdict}.</p>"
    )


def _budget_html(budget: dict | None) -> str:
    if not budget:
        return "<p>budget.json is missing from this run.</p>"
    rows = [[part, fmt(v)] for part, v in budget.get("parts", {}).items()]
    rows.append(["total", fmt(budget.get("total"))])
    rows.append(["budget (max_trainable)", fmt(budget.get("max_trainable"))])
    rows.append(["margin", fmt(budget.get("margin"))])
    out = table(["part", "parameters"], rows, {1})
    per_module = budget.get("per_module") or {}
    if per_module:
        out += "<p>Adapted module types:</p>" + table(
            ["module type", "modules", "adapter parameters"],
            [[k, fmt(v["modules"]), fmt(v["params"])] for k, v in per_module.items()],
            {1, 2},
        )
    extra = []
    if budget.get("head_modules"):
        extra.append("head modules (train fully): " + ", ".join(budget["head_modules"]))
    if budget.get("base_total"):
        extra.append(
            f"{100 * budget['total'] / budget['base_total']:.2f}% of the model's {budget['base_total']:,} parameters"
        )
    return out + "".join(f"<p>{html.escape(e)}</p>" for e in extra)


def write_report(folder: Path, being_written: bool = False) -> Path:
    """Write report.html and its PNGs into a run folder; returns the HTML's path."""
    folder = Path(folder)
    run = read_run_files(folder, being_written)
    pngs = {
        "loss": plot_loss(run, folder / PLOTS["loss"]),
        "accuracy": plot_accuracy(run, folder / PLOTS["accuracy"]),
        "lr": plot_lr(run, folder / PLOTS["lr"]),
        "confusion": plot_confusion(run, folder / PLOTS["confusion"]),
        "f1": plot_f1(run, folder / PLOTS["f1"]),
    }
    tr = run.metrics.get("training", {})
    model = run.config.get("model", {}).get("name", "?")
    facts = [
        ["model", model],
        ["data", run.config.get("data", {}).get("source", "?")],
        ["trainable parameters", fmt(tr.get("trainable_parameters"))],
        [
            "steps",
            f"{fmt(tr.get('steps'))} ({fmt(tr.get('epochs'), 2)} epochs), best at step {fmt(tr.get('best_step'))}"
            + (", stopped early" if tr.get("stopped_early") else ""),
        ],
        [
            "training time",
            f"{fmt(tr.get('train_seconds'), 1)} s ({fmt(tr.get('train_samples_per_s'), 1)} samples/s), {tr.get('precision', '?')} on {tr.get('device', '?')}",
        ],
    ]
    body = [
        f"<h1>lorafit run {html.escape(run.name)}</h1>",
        table(None, facts),
        "<h2>Scores (best checkpoint)</h2>",
        table(["split", "rows", "accuracy", "macro-F1", "loss"], _summary_rows(run), {1, 2, 3, 4}),
        _baseline_note(run.metrics),
        "<h2>Training curves</h2>",
        figure_html(pngs["loss"], "Train and validation loss against epoch"),
        figure_html(pngs["accuracy"], "Validation accuracy against epoch"),
        figure_html(pngs["lr"], "Learning rate against optimizer step"),
        "<h2>Errors by class</h2>",
        figure_html(
            pngs["confusion"],
            "Confusion matrix (rows: true class; colour: share of the row)",
            wide=len(scored_splits(run)) > 1,
        ),
        figure_html(pngs["f1"], "Per-class F1"),
        "<h2>Trainable-parameter budget</h2>",
        _budget_html(run.budget),
        "<h2>Resolved config</h2>",
        f"<pre>{html.escape(run.config_text)}</pre>",
    ]
    out = folder / REPORT
    atomic_write_text(out, page(f"lorafit run {run.name}", "\n".join(body)))
    return out


def write_run_report(folder: Path) -> None:
    """The report at the end of training. A plotting failure must not throw away a trained run: warn and go on."""
    try:
        write_report(folder, being_written=True)
    except Exception as e:  # noqa: BLE001
        print(
            f"warning: report.html not written ({type(e).__name__}: {e}); rebuild it with `lorafit report RUN`",
            flush=True,
        )
