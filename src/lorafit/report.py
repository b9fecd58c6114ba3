"""What a run did, at a glance: `report.html` in every run folder, and `lorafit compare` across runs.

Everything is built from the files a run folder already holds (history.jsonl, metrics.json, budget.json,
config.yaml, labels.json), so `lorafit report RUN` can rebuild a report at any time. The HTML is
self-contained: the PNGs written next to it are embedded as base64 data URIs, there is no script and
nothing is fetched, so it opens from disk, in an e-mail or offline.

Plots use matplotlib's object-oriented API on the Agg canvas: no pyplot, no global backend switch, no display.
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from .errors import LorafitError

REPORT = "report.html"
PLOTS = {
    "loss": "loss.png",
    "accuracy": "accuracy.png",
    "lr": "lr.png",
    "confusion": "confusion_matrix.png",
    "f1": "per_class_f1.png",
}
COMPARE_FILES = ("comparison.md", "comparison.csv", "comparison.html", "val_loss.png")


@dataclass
class RunFiles:
    """The parts of a run folder that reports and comparisons read."""

    folder: Path
    config: dict
    config_text: str
    history: list[dict]
    metrics: dict
    budget: dict | None
    label_names: list[str]

    @property
    def name(self) -> str:
        return self.folder.name


def read_run_files(folder: Path) -> RunFiles:
    folder = Path(folder)
    if not folder.is_dir():
        raise LorafitError(f"run folder {folder} not found; expected a folder written by `lorafit train`")
    missing = [f for f in ("config.yaml", "metrics.json", "labels.json") if not (folder / f).is_file()]
    if missing:
        raise LorafitError(f"{folder} is not a complete lorafit run (missing {', '.join(missing)}); train it again or pick another folder")
    config_text = (folder / "config.yaml").read_text(encoding="utf-8")
    history_path = folder / "history.jsonl"
    history = [json.loads(line) for line in history_path.read_text().splitlines() if line.strip()] if history_path.is_file() else []
    budget_path = folder / "budget.json"
    return RunFiles(
        folder=folder,
        config=yaml.safe_load(config_text) or {},
        config_text=config_text,
        history=history,
        metrics=json.loads((folder / "metrics.json").read_text()),
        budget=json.loads(budget_path.read_text()) if budget_path.is_file() else None,
        label_names=json.loads((folder / "labels.json").read_text()),
    )


# ---------------------------------------------------------------------------------------------------------------------
# Plots


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
        ax.text(0.5, 0.02, "one evaluation: set train.eval_every to a number of steps for a curve", ha="center", va="bottom",
                transform=ax.transAxes, color="0.4", fontsize=8)


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

    from .config import validate
    from .train import Schedule

    h = run.history
    steps_run = run.metrics.get("training", {}).get("steps") or (h[-1]["step"] if h else 0)
    if not h or not steps_run:
        return None
    try:
        t = validate(run.config, "config.yaml").train
    except LorafitError:
        return None
    if t.max_steps:
        total = t.max_steps
    elif t.eval_every == "epoch":
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
    if any(s > steps_run or not math.isclose(lrs[s - 1], lr, rel_tol=1e-6, abs_tol=1e-12) for s, lr in recorded.items()):
        return None
    return steps, lrs


def plot_lr(run: RunFiles, path: Path) -> Path:
    fig = _figure()
    ax = fig.add_subplot()
    curve = lr_curve(run)
    if curve:
        ax.plot(*curve, "-", label="schedule")
    if run.history:
        ax.plot([r["step"] for r in run.history], [r["lr"] for r in run.history], "o", label="at evaluations", **({} if curve else {"linestyle": "-"}))
        ax.legend()
    else:
        _no_data(ax, "learning rate")
    ax.set(xlabel="optimizer step", ylabel="learning rate", title="Learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _splits(run: RunFiles) -> list[str]:
    return [s for s in ("val", "test") if s in run.metrics and "confusion_matrix" in run.metrics[s]]


def plot_confusion(run: RunFiles, path: Path) -> Path:
    import numpy as np

    splits = _splits(run)
    n = len(run.label_names)
    side = max(3.6, 0.55 * n + 2.2)
    fig = _figure(side * max(1, len(splits)), side)
    axes = fig.subplots(1, max(1, len(splits)), squeeze=False)[0]
    for ax, split in zip(axes, splits or [None]):
        if split is None:
            _no_data(ax, "confusion matrix")
            continue
        cm = np.asarray(run.metrics[split]["confusion_matrix"], dtype=float)
        share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)  # colour by recall, so rare classes show too
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        if n <= 25:
            for i in range(n):
                for j in range(n):
                    ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=8 if n > 10 else 10,
                            color="white" if share[i, j] > 0.5 else "black")
        ax.set_xticks(range(n), run.label_names, rotation=45 if n > 4 or max(map(len, run.label_names)) > 8 else 0, ha="right" if n > 4 else "center")
        ax.set_yticks(range(n), run.label_names)
        ax.set(xlabel="predicted", ylabel="true", title=f"{split} ({int(cm.sum())} rows)")
    return _save(fig, path)


def plot_f1(run: RunFiles, path: Path) -> Path:
    import numpy as np

    splits = _splits(run)
    n = len(run.label_names)
    fig = _figure(max(6.4, 0.5 * n * max(1, len(splits)) + 2), 4.0)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(splits))
    x = np.arange(n)
    for k, split in enumerate(splits):
        f1 = [run.metrics[split]["per_class"][c]["f1"] for c in run.label_names]
        bars = ax.bar(x + (k - (len(splits) - 1) / 2) * width, f1, width, label=f"{split} (macro {run.metrics[split]['macro_f1']:.3f})")
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


# ---------------------------------------------------------------------------------------------------------------------
# HTML

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1100px; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0; } th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { display: inline-block; margin: 0.5em 1% 0.5em 0; vertical-align: top; width: 48%; } figure.wide { width: 98%; }
figcaption { color: #555; font-size: 0.9em; } img { width: 100%; height: auto; } pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; }
"""


def _data_uri(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")


def _figure_html(png: Path, caption: str, wide: bool = False) -> str:
    alt = html.escape(caption)
    return f'<figure{" class=wide" if wide else ""}><img src="{_data_uri(png)}" alt="{alt}"><figcaption>{alt}</figcaption></figure>'


def _table(header: list[str] | None, rows: list[list], numeric: set[int] = frozenset()) -> str:
    cls = lambda j: ' class="num"' if j in numeric else ""  # noqa: E731
    head = "<tr>" + "".join(f"<th{cls(j)}>{html.escape(str(h))}</th>" for j, h in enumerate(header)) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td{cls(j)}>{html.escape(str(v))}</td>" for j, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table>{head}{body}</table>"


def _page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>\n'
            f"<body>\n{body}\n</body></html>\n")


def _fmt(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _summary_rows(run: RunFiles) -> list[list]:
    rows = []
    for split in ("val", "test"):
        m = run.metrics.get(split)
        if m:
            rows.append([split, _fmt(m.get("samples")), _fmt(m.get("accuracy")), _fmt(m.get("macro_f1")), _fmt(m.get("loss"))])
    return rows


def _budget_html(budget: dict | None) -> str:
    if not budget:
        return "<p>budget.json is missing from this run.</p>"
    rows = [[part, _fmt(v)] for part, v in budget.get("parts", {}).items()]
    rows.append(["total", _fmt(budget.get("total"))])
    rows.append(["budget (max_trainable)", _fmt(budget.get("max_trainable"))])
    rows.append(["margin", _fmt(budget.get("margin"))])
    out = _table(["part", "parameters"], rows, {1})
    per_module = budget.get("per_module") or {}
    if per_module:
        out += "<p>Adapted module types:</p>" + _table(
            ["module type", "modules", "adapter parameters"], [[k, _fmt(v["modules"]), _fmt(v["params"])] for k, v in per_module.items()], {1, 2})
    extra = []
    if budget.get("head_modules"):
        extra.append("head modules (train fully): " + ", ".join(budget["head_modules"]))
    if budget.get("base_total"):
        extra.append(f"{100 * budget['total'] / budget['base_total']:.2f}% of the model's {budget['base_total']:,} parameters")
    return out + "".join(f"<p>{html.escape(e)}</p>" for e in extra)


def write_report(folder: Path) -> Path:
    """Write report.html and its PNGs into a run folder; returns the HTML's path."""
    folder = Path(folder)
    run = read_run_files(folder)
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
        ["trainable parameters", _fmt(tr.get("trainable_parameters"))],
        ["steps", f"{_fmt(tr.get('steps'))} ({_fmt(tr.get('epochs'), 2)} epochs), best at step {_fmt(tr.get('best_step'))}" + (", stopped early" if tr.get("stopped_early") else "")],
        ["training time", f"{_fmt(tr.get('train_seconds'), 1)} s ({_fmt(tr.get('train_samples_per_s'), 1)} samples/s), {tr.get('precision', '?')} on {tr.get('device', '?')}"],
    ]
    body = [
        f"<h1>lorafit run {html.escape(run.name)}</h1>",
        _table(None, facts),
        "<h2>Scores (best checkpoint)</h2>",
        _table(["split", "rows", "accuracy", "macro-F1", "loss"], _summary_rows(run), {1, 2, 3, 4}),
        "<h2>Training curves</h2>",
        _figure_html(pngs["loss"], "Train and validation loss against epoch"),
        _figure_html(pngs["accuracy"], "Validation accuracy against epoch"),
        _figure_html(pngs["lr"], "Learning rate against optimizer step"),
        "<h2>Errors by class</h2>",
        _figure_html(pngs["confusion"], "Confusion matrix (rows: true class; colour: share of the row)", wide=len(_splits(run)) > 1),
        _figure_html(pngs["f1"], "Per-class F1"),
        "<h2>Trainable-parameter budget</h2>",
        _budget_html(run.budget),
        "<h2>Resolved config</h2>",
        f"<pre>{html.escape(run.config_text)}</pre>",
    ]
    out = folder / REPORT
    tmp = folder / f".{REPORT}.partial"
    tmp.write_text(_page(f"lorafit run {run.name}", "\n".join(body)), encoding="utf-8")
    tmp.replace(out)
    return out


def write_run_report(folder: Path) -> None:
    """The report at the end of training. A plotting failure must not throw away a trained run: warn and go on."""
    try:
        write_report(folder)
    except Exception as e:  # noqa: BLE001
        print(f"warning: report.html not written ({type(e).__name__}: {e}); rebuild it with `lorafit report RUN`", flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# Comparing runs


def _is_run(folder: Path) -> bool:
    """A finished run: config and metrics written, and no INCOMPLETE marker (a run still training or interrupted)."""
    return (folder / "config.yaml").is_file() and (folder / "metrics.json").is_file() and not (folder / "INCOMPLETE").exists()


def find_runs(paths: list[Path]) -> tuple[list[Path], list[str]]:
    """Run folders from the arguments: each a run, or a sweep folder whose subfolders are runs. Also notes."""
    runs, notes = [], []
    for p in map(Path, paths):
        if not p.is_dir():
            raise LorafitError(f"{p} not found; expected a run folder or a sweep folder holding runs")
        if _is_run(p):
            runs.append(p)
            continue
        subs = sorted(d for d in p.iterdir() if d.is_dir() and not d.name.startswith("."))
        found = [d for d in subs if _is_run(d)]
        unfinished = [d.name for d in subs if (d / "config.yaml").is_file() and not _is_run(d)]
        unfinished += [d.name for d in p.iterdir() if d.is_dir() and d.name.endswith(".partial")]
        if unfinished:
            notes.append(f"{p}: skipped {len(unfinished)} unfinished run(s): {', '.join(sorted(unfinished)[:5])}")
        if not found:
            raise LorafitError(f"{p} is neither a run folder (no config.yaml and metrics.json) nor a sweep folder with finished runs in its subfolders")
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


def flat_config(config: dict) -> dict[str, object]:
    """Dotted keys -> values, stopping at config leaves (rank_pattern and the like stay one value)."""
    from .config import all_keys

    leaves = {k for k, _, _ in all_keys()}
    out = {}

    def walk(node: dict, prefix: str):
        for k, v in node.items():
            key = prefix + str(k)
            if isinstance(v, dict) and key not in leaves:
                walk(v, key + ".")
            else:
                out[key] = v

    walk(config, "")
    return out


def _cell(v) -> str:
    if isinstance(v, (list, dict)):
        return json.dumps(v, separators=(",", ":"))
    if v is None:
        return "null"
    return str(v)


def comparison_rows(runs: list[RunFiles], labels: list[str]) -> tuple[list[str], list[dict]]:
    flats = [flat_config(r.config) for r in runs]
    keys = list(dict.fromkeys(k for f in flats for k in f))
    differ = [k for k in keys if len({_cell(f[k]) if k in f else "\0missing" for f in flats}) > 1]
    rows = []
    for run, label, flat in zip(runs, labels, flats):
        m, tr = run.metrics, run.metrics.get("training", {})
        val_losses = [h["val_loss"] for h in run.history if h.get("val_loss") is not None]
        row = {"run": label}
        row.update({k: _cell(flat[k]) if k in flat else "" for k in differ})
        row.update({
            "trainable_params": tr.get("trainable_parameters", (run.budget or {}).get("total")),
            "best_val_loss": min(val_losses) if val_losses else m.get("val", {}).get("loss"),
            "val_accuracy": m.get("val", {}).get("accuracy"),
            "test_accuracy": m.get("test", {}).get("accuracy"),
            "wall_time_s": tr.get("train_seconds"),
        })
        rows.append(row)
    return ["run", *differ, "trainable_params", "best_val_loss", "val_accuracy", "test_accuracy", "wall_time_s"], rows


def _markdown(columns: list[str], rows: list[dict]) -> str:
    def fmt(col, v):
        if v is None or v == "":
            return "—" if col in ("test_accuracy", "best_val_loss", "val_accuracy", "wall_time_s", "trainable_params") else ""
        if col == "trainable_params":
            return f"{int(v):,}"
        if col == "wall_time_s":
            return f"{v:.1f}"
        if isinstance(v, float):
            return f"{v:.4f}"
        return str(v).replace("|", "\\|")

    numeric = {"trainable_params", "best_val_loss", "val_accuracy", "test_accuracy", "wall_time_s"}
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---:" if c in numeric else "---" for c in columns) + "|"]
    lines += ["| " + " | ".join(fmt(c, r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot_val_loss_overlay(runs: list[RunFiles], labels: list[str], path: Path) -> Path:
    fig = _figure(8.0, 4.8)
    ax = fig.add_subplot()
    for run, label in zip(runs, labels):
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


def compare(paths: list[Path], out: Path) -> tuple[str, list[str]]:
    """Write comparison.md/.csv/.html and val_loss.png into `out`; returns (the Markdown table, notes)."""
    import csv

    folders, notes = find_runs(paths)
    runs = [read_run_files(f) for f in folders]
    labels = _run_labels(folders)
    columns, rows = comparison_rows(runs, labels)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LorafitError(f"-o {out} is a file; expected a folder for the comparison files")
    out.mkdir(parents=True, exist_ok=True)
    md = _markdown(columns, rows)
    (out / "comparison.md").write_text(md, encoding="utf-8")
    with open(out / "comparison.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
    png = plot_val_loss_overlay(runs, labels, out / "val_loss.png")
    numeric = {j for j, c in enumerate(columns) if c in ("trainable_params", "best_val_loss", "val_accuracy", "test_accuracy", "wall_time_s")}
    table_rows = [[_fmt(r[c], 1 if c == "wall_time_s" else 4) if c in ("trainable_params", "best_val_loss", "val_accuracy", "test_accuracy", "wall_time_s") else r[c] for c in columns] for r in rows]
    body = [
        f"<h1>lorafit: {len(runs)} runs compared</h1>",
        "<p>Config keys that differ between the runs, then the results. Validation accuracy is the best checkpoint's; "
        "wall time is the training loop's.</p>",
        _table(columns, table_rows, numeric),
        _figure_html(png, "Validation loss against epoch", wide=True),
        "<p>Runs: " + ", ".join(html.escape(str(f)) for f in folders) + "</p>",
    ]
    (out / "comparison.html").write_text(_page("lorafit comparison", "\n".join(body)), encoding="utf-8")
    return md, notes
