"""The results table of a sweep or search: one row per point (mean ± std over seeds), as results.csv and results.md."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from .. import runs
from ..atomic import atomic_write_text
from .points import flow

METRICS = {
    "val_loss": "best_val_loss",
    "val_accuracy": "val_accuracy",
    "val_macro_f1": "val_macro_f1",
}  # --metric -> column
FIELDS = ("trainable", "best_val_loss", "val_accuracy", "val_macro_f1", "test_accuracy", "epochs", "wall_s")
POINT_FILE = "point.json"  # in each run folder of a sweep: its point, seed and wall time


def lower_is_better(metric: str) -> bool:
    return metric == "val_loss"


def read_record(folder: Path) -> dict:
    """The table's figures for one finished run folder."""
    metrics = json.loads((folder / runs.METRICS).read_text())
    history_file = folder / runs.HISTORY
    history = (
        [json.loads(x) for x in history_file.read_text().splitlines() if x.strip()] if history_file.exists() else []
    )
    info = json.loads((folder / POINT_FILE).read_text()) if (folder / POINT_FILE).exists() else {}
    return {
        "trainable": metrics["training"]["trainable_parameters"],
        "best_val_loss": min([h["val_loss"] for h in history] + [metrics["val"]["loss"]]),
        "val_accuracy": metrics["val"]["accuracy"],
        "val_macro_f1": metrics["val"]["macro_f1"],
        "test_accuracy": metrics["test"]["accuracy"] if "test" in metrics else None,
        "epochs": metrics["training"]["epochs"],
        "wall_s": info["wall_seconds"] if "wall_seconds" in info else None,
    }


def aggregate(records: list[dict]) -> dict[str, list]:
    """field -> [mean, std] over seeds (std None for one seed or missing values)."""
    out = {}
    for f in FIELDS:
        vals = [r[f] for r in records if r.get(f) is not None]
        if not vals:
            out[f] = [None, None]
        else:
            out[f] = [statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else None]
    return out


@dataclass
class Row:
    keys: dict  # column key -> value
    status: str  # done | over budget | failed: ... | pruned at step N | running
    n: int  # finished seeds
    values: dict  # field -> [mean, std]
    runs: list[str]


def sort_rows(rows: list[Row], metric: str) -> list[Row]:
    col = METRICS[metric]
    sign = 1 if lower_is_better(metric) else -1
    order = lambda r: (  # noqa: E731 finished rows by the metric, then pruned ones (by their last value), then the rest
        0 if r.status == "done" else 1 if r.status.startswith("pruned") else 2,
        sign * r.values[col][0] if r.values[col][0] is not None else math.inf,
    )
    return sorted(rows, key=order)


def _fmt(field: str, mean, std) -> str:
    if mean is None:
        return ""
    if field == "trainable":
        return f"{int(mean):,}"
    if field == "wall_s":
        return f"{mean:.0f}" + (f" ± {std:.0f}" if std is not None else "")
    if field == "epochs":
        return f"{mean:.2f}"
    return f"{mean:.4f}" + (f" ± {std:.4f}" if std is not None else "")


def write_tables(out: Path, rows: list[Row], keys: list[str], metric: str, title: str, seeds: int) -> str:
    """results.csv (means, and *_std columns with several seeds) and results.md, rows sorted by `metric` and the
    title saying so; returns the markdown."""
    rows = sort_rows(rows, metric)
    title = f"{title}, sorted by {metric} ({'lower' if lower_is_better(metric) else 'higher'} is better)"
    fields = [f for f in FIELDS if f != "val_macro_f1" or metric == "val_macro_f1"]
    if all(r.values["test_accuracy"][0] is None for r in rows):
        fields.remove("test_accuracy")
    buf = io.StringIO()
    w = csv.writer(buf)
    stds = [f for f in fields if seeds > 1 and f != "trainable"]
    w.writerow(keys + ["status", "seeds"] + fields + [f + "_std" for f in stds] + ["runs"])
    for r in rows:
        w.writerow(
            [flow(r.keys[k]) for k in keys]
            + [r.status, r.n]
            + [
                ""
                if r.values[f][0] is None
                else (int(r.values[f][0]) if f == "trainable" else round(r.values[f][0], 6))
                for f in fields
            ]
            + ["" if r.values[f][1] is None else round(r.values[f][1], 6) for f in stds]
            + [" ".join(r.runs)]
        )
    atomic_write_text(out / "results.csv", buf.getvalue())

    short = {k: k.rsplit(".", 1)[-1] for k in keys}
    if len(set(short.values())) < len(short):
        short = {k: k for k in keys}
    head = (
        [short[k] for k in keys] + ["status"] + (["seeds"] if seeds > 1 else []) + [f.replace("_", " ") for f in fields]
    )
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [_cell(r.keys[k]) for k in keys] + [r.status] + ([str(r.n)] if seeds > 1 else [])
        cells += [_fmt(f, *r.values[f]) for f in fields]
        lines.append("| " + " | ".join(cells) + " |")
    md = "\n".join(lines) + "\n"
    atomic_write_text(out / "results.md", md)
    return md


def _cell(value) -> str:
    text = f"{value:.4g}" if isinstance(value, float) else flow(value)
    return text.replace("|", "\\|")
