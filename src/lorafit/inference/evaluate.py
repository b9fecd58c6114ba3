"""`lorafit eval`: score a saved run on a labelled file with the run's own text columns and preprocessing."""

from __future__ import annotations

from pathlib import Path

from ..atomic import atomic_write_text
from ..blend import note as blend_note
from ..data import read_table, to_split
from ..metrics import classification_metrics
from .loaded import LoadedRun, load_run


def evaluate_run(run: LoadedRun, source: str) -> dict:
    split = to_split(read_table(source, "--data"), run.cfg.data, run.label_names, source)
    for note in split.notes:
        print(f"note: {note}")
    return classification_metrics(run.classify(split.texts, split.labels, "eval"), split.labels, run.label_names)


def format_metrics(m: dict, label_names: list[str]) -> str:
    lines = [
        f"samples: {m['samples']}",
        f"loss: {m['loss']:.4f}",
        f"accuracy: {m['accuracy']:.4f}",
        f"macro_f1: {m['macro_f1']:.4f}",
    ]
    width = max(len(n) for n in label_names) + 2
    lines.append(f"{'class':<{width}}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}")
    for name in label_names:
        c = m["per_class"][name]
        lines.append(f"{name:<{width}}{c['precision']:>10.4f}{c['recall']:>10.4f}{c['f1']:>10.4f}{c['support']:>9}")
    lines.append("confusion matrix (rows: true, columns: predicted): " + str(m["confusion_matrix"]))
    return "\n".join(lines)


def main(run_dir: Path, data: str, json_out: Path | None, precision: str | None) -> dict:
    import json

    run = load_run(run_dir, precision, merge=True)
    if run.blend is not None:
        print(f"note: {blend_note(run.blend)}")
    m = evaluate_run(run, data)
    print(format_metrics(m, run.label_names))
    if json_out:
        atomic_write_text(json_out, json.dumps(m, indent=1))
    return m
