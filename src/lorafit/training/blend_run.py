"""`lorafit blend RUN`: blend a finished run's adapter with a TF-IDF model, as `eval.blend` does at the end of
training, for runs trained without it.

The run's own config gives the same training, validation and test rows as its training had (the split is
seeded); the weight is chosen on validation only. The run folder gains blend/ and metrics.json a "blend" entry;
when the adapter alone is as accurate, any earlier blend is removed and the entry says why.
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import blend as blend_mod
from .. import model_card, runs
from ..atomic import atomic_write_text
from ..data import load_data
from ..errors import LorafitError
from ..inference.loaded import load_run
from ..report.run_report import write_run_report


def blend_run(folder: Path, precision: str | None = None) -> dict:
    """Blend the run in `folder`; returns its metrics.json "blend" entry."""
    folder = runs.check_complete(Path(folder))
    with runs.locked(
        folder, f"{folder} is being blended by another lorafit process (pid {{pid}}); wait for it to finish"
    ):
        run = load_run(folder, precision, merge=True)
        data = load_data(run.cfg.data, run.cfg.train.seed)
        if data.label_names != run.label_names:
            raise LorafitError(
                f"{folder}: its data now has the labels {data.label_names}, the run was trained on {run.label_names}; "
                "blend it with the data it was trained on"
            )
        budget = json.loads((folder / runs.BUDGET).read_text())
        splits = [("val", data.val)] + ([("test", data.test)] if data.test is not None else [])
        rows = {
            name: (s.texts, s.labels, run.predict_logits(run.encode(s.texts, s.labels), f"eval {name}"))
            for name, s in splits
        }
        blend, figures = blend_mod.make(
            data.train.texts,
            data.train.labels,
            rows["val"],
            rows.get("test"),
            data.label_names,
            run.cfg.budget.max_trainable - budget["total"],
        )
        if blend is None:
            blend_mod.remove(folder)
        else:
            blend_mod.save(blend, folder)
        metrics = json.loads((folder / runs.METRICS).read_text())
        metrics["blend"] = figures
        atomic_write_text(folder / runs.METRICS, json.dumps(metrics, indent=1))
        model_card.write_model_card(folder)
        write_run_report(folder)
    return figures
