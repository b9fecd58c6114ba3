"""A sweep folder: its base config, its lock, and one normal run folder per point and seed.

    sweeps/NAME/
      sweep.yaml            the resolved base config (a re-run with another base is refused)
      r=4_alpha=8-1a2b3c-s42/   one run folder per point and seed (`lorafit train`'s layout + point.json)
      results.csv, results.md   one row per point, sorted by the chosen metric (mean ± std over seeds)
      study.db              the Optuna study (search mode, default storage)

A point is finished when its run folder is complete, so re-running the same command trains only what is missing,
and a point interrupted mid-training continues from its newest checkpoint.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from .. import runs
from ..atomic import atomic_write_text
from ..config import Config, config_changes
from ..errors import LorafitError
from ..training.recipe import run
from .points import flow
from .tables import POINT_FILE, read_record

BASE_FILE = "sweep.yaml"


def log(msg: str) -> None:
    print(msg, flush=True)


def lock(out: Path):
    """One sweep process per folder: two would train the same point into the same run folder."""
    return runs.locked(
        out, f"another lorafit sweep (pid {{pid}}) is running in {out}; wait for it to finish or pick another -o"
    )


def config_difference(old: dict, new: dict) -> str:
    """The keys two resolved configs (any version's layout) set differently, '' when none."""
    diffs = [f"{k}: {flow(a)} -> {flow(b)}" for k, (a, b) in config_changes(old, new).items()]
    return "; ".join(diffs[:5]) + (f"; and {len(diffs) - 5} more" if len(diffs) > 5 else "")


def check_base(out: Path, base: Config) -> None:
    """The first run records the base config; a re-run with another base would mix incomparable runs."""
    path = out / BASE_FILE
    if path.exists():
        diff = config_difference(yaml.safe_load(path.read_text())["base"], base.to_dict())
        if diff:
            raise LorafitError(
                f"{out} holds a sweep over a different base config ({diff}); "
                "re-run with the original config, or pick a new -o folder"
            )
    else:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, yaml.safe_dump({"base": base.to_dict()}, sort_keys=False))


def run_one(cfg: Config, folder: Path, on_eval=None, **info) -> dict:
    """Train one point with one seed into `folder` (a normal run folder) and return its table figures.
    A folder left INCOMPLETE by an interrupted sweep continues from its newest checkpoint."""
    start = time.perf_counter()
    run(cfg, folder, on_eval=on_eval, resume=runs.is_incomplete(folder))
    info["wall_seconds"] = round(time.perf_counter() - start, 2)
    atomic_write_text(folder / POINT_FILE, json.dumps(info, indent=1, default=str))
    return read_record(folder)


def with_seed(cfg: Config, seed: int) -> Config:
    cfg = cfg.model_copy(deep=True)
    cfg.train.seed = seed
    return cfg
