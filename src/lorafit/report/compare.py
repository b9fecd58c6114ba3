"""`lorafit compare`: the config keys that differ between runs, their results, and their validation-loss curves."""

from __future__ import annotations

import html
import json
from pathlib import Path

from ..atomic import atomic_write_text
from ..config import flatten, migrate
from ..errors import LorafitError
from ..runs import CONFIG, is_complete
from .html import figure_html, fmt, page, table
from .plots import plot_val_loss_overlay
from .run_files import RunFiles, read_run_files


def find_runs(paths: list[Path]) -> tuple[list[Path], list[str]]:
    """Run folders from the arguments: each a run, or a sweep folder whose subfolders are runs. Also notes."""
    runs, notes = [], []
    for p in map(Path, paths):
        if not p.is_dir():
            raise LorafitError(f"{p} not found; expected a run folder or a sweep folder holding runs")
        if is_complete(p):
            runs.append(p)
            continue
        subs = sorted(d for d in p.iterdir() if d.is_dir() and not d.name.startswith("."))
        found = [d for d in subs if is_complete(d)]
        unfinished = [d.name for d in subs if (d / CONFIG).is_file() and not is_complete(d)]
        if unfinished:
            notes.append(f"{p}: skipped {len(unfinished)} unfinished run(s): {', '.join(sorted(unfinished)[:5])}")
        if not found:
            raise LorafitError(
                f"{p} is neither a run folder (no config.yaml and metrics.json) nor a sweep folder with finished runs in its subfolders"
            )
        runs += found
    unique = list(dict.fromkeys(r.resolve() for r in runs))
    return [next(r for r in runs if r.resolve() == u) for u in unique], notes


def _run_labels(folders: list[Path]) -> list[str]:
    """Folder names, with parent folders added where names repeat (two sweeps with the same run names)."""
    labels = [f.name for f in folders]
    depth = 1
    while len(set(labels)) < len(labels) and depth < 4:
        depth += 1
        labels = ["/".join(f.resolve().parts[-depth:]) for f in folders]
    return labels


# the result columns after the config keys that differ
RESULTS = [
    "trainable_params",
    "best_val_loss",
    "val_accuracy",
    "baseline_val_accuracy",
    "blend_val_accuracy",
    "test_accuracy",
    "wall_time_s",
]


def _cell(v) -> str:
    if isinstance(v, (list, dict)):
        return json.dumps(v, separators=(",", ":"))
    if v is None:
        return "null"
    return str(v)


def comparison_rows(runs: list[RunFiles], labels: list[str]) -> tuple[list[str], list[dict]]:
    flats = [flatten(migrate(r.config)) for r in runs]
    keys = list(dict.fromkeys(k for f in flats for k in f))
    differ = [k for k in keys if len({_cell(f[k]) if k in f else "\0missing" for f in flats}) > 1]
    rows = []
    for run, label, flat in zip(runs, labels, flats, strict=True):
        m, tr = run.metrics, run.metrics.get("training", {})
        val_losses = [h["val_loss"] for h in run.history if h.get("val_loss") is not None]
        row = {"run": label}
        row.update({k: _cell(flat[k]) if k in flat else "" for k in differ})
        row.update(
            {
                "trainable_params": tr.get("trainable_parameters", (run.budget or {}).get("total")),
                "best_val_loss": min(val_losses) if val_losses else m.get("val", {}).get("loss"),
                "val_accuracy": m.get("val", {}).get("accuracy"),
                # the TF-IDF baseline on the same validation rows: the bar a run has to clear
                "baseline_val_accuracy": m.get("baseline", {}).get("val", {}).get("accuracy"),
                # the run's blend with a TF-IDF model, where it kept one: what predict answers with
                "blend_val_accuracy": m.get("blend", {}).get("val", {}).get("accuracy"),
                "test_accuracy": m.get("test", {}).get("accuracy"),
                "wall_time_s": tr.get("train_seconds"),
            }
        )
        rows.append(row)
    return ["run", *differ, *RESULTS], rows


def _markdown(columns: list[str], rows: list[dict]) -> str:
    def fmt(col, v):
        if v is None or v == "":
            return "—" if col in RESULTS else ""
        if col == "trainable_params":
            return f"{int(v):,}"
        if col == "wall_time_s":
            return f"{v:.1f}"
        if isinstance(v, float):
            return f"{v:.4f}"
        return str(v).replace("|", "\\|")

    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---:" if c in RESULTS else "---" for c in columns) + "|",
    ]
    lines += ["| " + " | ".join(fmt(c, r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def compare(paths: list[Path], out: Path) -> tuple[str, list[str]]:
    """Write comparison.md/.csv/.html and val_loss.png into `out`; returns (the Markdown table, notes)."""
    import csv
    import io

    folders, notes = find_runs(paths)
    runs = [read_run_files(f) for f in folders]
    labels = _run_labels(folders)
    columns, rows = comparison_rows(runs, labels)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LorafitError(f"-o {out} is a file; expected a folder for the comparison files")
    out.mkdir(parents=True, exist_ok=True)
    md = _markdown(columns, rows)
    atomic_write_text(out / "comparison.md", md)
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=columns)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out / "comparison.csv", buf.getvalue())
    png = plot_val_loss_overlay(runs, labels, out / "val_loss.png")
    numeric = {j for j, c in enumerate(columns) if c in RESULTS}
    table_rows = [[fmt(r[c], 1 if c == "wall_time_s" else 4) if c in RESULTS else r[c] for c in columns] for r in rows]
    body = [
        f"<h1>lorafit: {len(runs)} runs compared</h1>",
        "<p>Config keys that differ between the runs, then the results. Validation accuracy is the best checkpoint's; "
        "baseline_val_accuracy is the TF-IDF + linear SVM baseline's on the same validation rows; "
        "blend_val_accuracy the run's blend of its adapter with a TF-IDF model, where it kept one; "
        "wall time is the training loop's.</p>",
        table(columns, table_rows, numeric),
        figure_html(png, "Validation loss against epoch", wide=True),
        "<p>Runs: " + ", ".join(html.escape(str(f)) for f in folders) + "</p>",
    ]
    atomic_write_text(out / "comparison.html", page("lorafit comparison", "\n".join(body)))
    return md, notes
