"""The parts of a complete run folder that reports and comparisons read."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from .. import runs


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


def read_run_files(folder: Path, being_written: bool = False) -> RunFiles:
    folder = runs.check_complete(folder, being_written)
    config_text = (folder / runs.CONFIG).read_text(encoding="utf-8")
    history_path = folder / runs.HISTORY
    history = (
        [json.loads(line) for line in history_path.read_text().splitlines() if line.strip()]
        if history_path.is_file()
        else []
    )
    budget_path = folder / runs.BUDGET
    return RunFiles(
        folder=folder,
        config=yaml.safe_load(config_text) or {},
        config_text=config_text,
        history=history,
        metrics=json.loads((folder / runs.METRICS).read_text()),
        budget=json.loads(budget_path.read_text()) if budget_path.is_file() else None,
        label_names=runs.read_labels(folder),
    )
