"""What a server serves: the runs named on the command line, loaded so that runs on one base share its weights.

`NAME=PATH` serves the run at PATH as NAME; a bare PATH serves it under its folder's name; a sweep folder serves
each of its finished runs under the run's folder name. Names go into URLs, so they are checked here, once.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .. import runs
from ..errors import LorafitError
from ..inference.loaded import LoadedRun, SharedBases, load_runs
from ..inference.predict import Classifier
from ..models import hub_id

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]{0,127}")


@dataclass
class ServedRun:
    name: str
    classifier: Classifier  # the run as loaded: its preparation of texts, and its model on the shared base
    merged_copy: LoadedRun | None = None  # while the run is busy, its merged copy (serve.merging), which answers

    @property
    def loaded(self) -> LoadedRun:
        return self.classifier.run

    @property
    def run(self) -> LoadedRun:
        """The model that answers now."""
        copy = self.merged_copy
        return copy if copy is not None else self.loaded

    @property
    def label_names(self) -> list[str]:
        return self.classifier.label_names

    def listing(self) -> dict:
        """What GET /v1/runs says about this run."""
        folder = self.run.folder
        metrics = json.loads((folder / runs.METRICS).read_text())
        budget_file = folder / runs.BUDGET
        trainable = json.loads(budget_file.read_text()).get("total") if budget_file.is_file() else None
        cfg = self.run.cfg
        return {
            "name": self.name,
            "base": hub_id(cfg.model.name),
            "base_shared": self.run.shares_base,
            "merged": self.run.merged,
            "labels": self.label_names,
            "trainable_parameters": trainable or metrics.get("training", {}).get("trainable_parameters"),
            "validation": {k: v for k, v in metrics.get("val", {}).items() if isinstance(v, int | float)},
            "max_length": cfg.model.max_length,
            "text_columns": list(cfg.data.text_columns),
            "precision": str(self.run.dtype).replace("torch.", ""),
            # a run that answers with its adapter blended with a TF-IDF model, as lorafit predict does
            "blend": None
            if self.run.blend is None
            else {
                "weight": self.run.blend.weight,
                "terms": self.run.blend.model.terms,
                "parameters": self.run.blend.model.parameters,
            },
        }


def parse_specs(specs: list[str]) -> list[tuple[str, Path]]:
    """`NAME=PATH` / `PATH` arguments -> (name, run folder) pairs, sweep folders expanded; checked, names unique."""
    if not specs:
        raise LorafitError(
            "lorafit serve: no run given; expected RUN, NAME=RUN or a sweep folder, e.g. `lorafit serve runs/my-run`"
        )
    pairs: list[tuple[str, Path]] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or Path(spec).exists():  # a path that contains '=' (a sweep point's folder) is a path
            name, path = None, spec
        folder = Path(path)
        if not folder.is_dir():
            raise LorafitError(
                f"lorafit serve: {path} is not a folder; expected a run folder written by `lorafit train`, a sweep folder, or NAME=RUN"
            )
        if (folder / runs.CONFIG).exists() or runs.is_incomplete(folder):
            runs.check_complete(folder)  # an incomplete run: the one-line reason and what to do
            pairs.append((name or folder.resolve().name, folder))
            continue
        finished = sorted(p for p in folder.iterdir() if p.is_dir() and runs.is_complete(p))
        if not finished:
            raise LorafitError(
                f"lorafit serve: {folder} holds no finished run; expected a run folder or a sweep folder with finished runs"
            )
        if name:
            raise LorafitError(
                f"lorafit serve: {spec}: a sweep folder serves each run under its own name; drop '{name}=' or name single runs instead"
            )
        pairs += [(p.name, p) for p in finished]
    seen: dict[str, Path] = {}
    for name, folder in pairs:
        if not NAME_PATTERN.fullmatch(name):
            raise LorafitError(
                f"lorafit serve: run name {name!r} cannot be a URL segment; use letters, digits and . _ + = - (up to 128), e.g. NAME={folder}"
            )
        if name in seen:
            raise LorafitError(
                f"lorafit serve: two runs are named {name!r} ({seen[name]} and {folder}); give one another name with NAME={folder}"
            )
        seen[name] = folder
    return pairs


def load_served(
    pairs: list[tuple[str, Path]],
    precision: str | None = None,
    merge: bool | None = None,
    loader: SharedBases | None = None,
) -> dict[str, ServedRun]:
    loaded = load_runs([folder for _, folder in pairs], precision, merge, loader)
    return {name: ServedRun(name, Classifier(run)) for (name, _), run in zip(pairs, loaded, strict=True)}
