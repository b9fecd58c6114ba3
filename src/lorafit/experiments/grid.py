"""`lorafit sweep --grid/--grid-file/--plan`: train every point of a grid or plan (x seeds) into one sweep folder.

Over-budget points are counted on a weightless skeleton and listed as skipped before anything trains.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .. import runs
from ..config import Config
from ..errors import LorafitError
from .points import Point, describe, get_key, resolve_points
from .sweep_folder import check_base, lock, log, run_one, with_seed
from .tables import FIELDS, Row, aggregate, read_record, write_tables


def table_keys(points: list[Point]) -> list[str]:
    """The keys whose values differ between points (all override keys when nothing differs)."""
    keys = list(dict.fromkeys(k for p in points for k in p.overrides))
    varying = [k for k in keys if len({json.dumps(get_key(p.cfg, k), sort_keys=True) for p in points}) > 1]
    return varying or keys


def key_values(p: Point, keys: list[str]) -> dict:
    """A point's value of each table key, as the user wrote it where the point sets it."""
    return {k: p.overrides[k] if k in p.overrides else get_key(p.cfg, k) for k in keys}


# ---------------------------------------------------------------------------------------------------------------------
# Grid (and plan) sweeps


def _dry_run(points: list[Point], out: Path, seeds: int) -> None:
    skipped = sum(p.over_budget for p in points)
    log(f"sweep {out} (dry run): {len(points)} point(s) x {seeds} seed(s), {skipped} over budget")
    for p in points:
        done = sum(runs.is_complete(out / f"{p.name}-s{s}") for s in p.seeds)
        state = "over budget, skipped" if p.over_budget else f"{done} of {len(p.seeds)} run(s) finished"
        log(f"  {p.budget.total:>12,} trainable  {p.name:<60} {state}")


def _rows(points: list[Point], out: Path, failures: dict) -> tuple[list[Row], list[str]]:
    """One table row per point: its status and its figures over the finished seeds."""
    rows, keys = [], table_keys(points)
    for p in points:
        if p.over_budget:
            values = {f: [None, None] for f in FIELDS} | {"trainable": [p.budget.total, None]}
            rows.append(Row(key_values(p, keys), "over budget", 0, values, []))
            continue
        folders = [out / f"{p.name}-s{s}" for s in p.seeds]
        done = [f for f in folders if runs.is_complete(f)]
        errors = [failures[(p.name, s)] for s in p.seeds if (p.name, s) in failures]
        status = "done" if len(done) == len(folders) else ("failed: " + errors[0] if errors else "incomplete")
        values = aggregate([read_record(f) for f in done])
        if values["trainable"][0] is None:
            values["trainable"] = [p.budget.total, None]
        rows.append(Row(key_values(p, keys), status, len(done), values, [f.name for f in done]))
    return rows, keys


def run_grid(
    base: Config, overrides: list[dict], out: Path, seeds: int = 1, metric: str = "val_loss", dry_run: bool = False
) -> int:
    """Train every point (x seeds) not finished yet; write the tables. Returns the number of runs trained."""
    start = time.perf_counter()
    points = resolve_points(base, overrides, seeds)
    if dry_run:
        _dry_run(points, out, seeds)
        return 0
    skipped = [p for p in points if p.over_budget]
    with lock(out):
        check_base(out, base)
        runs_of = [(p, seed, out / f"{p.name}-s{seed}") for p in points if not p.over_budget for seed in p.seeds]
        todo = [r for r in runs_of if not runs.is_complete(r[2])]
        finished = len(runs_of) - len(todo)
        log(
            f"sweep {out}: {len(points)} point(s) x {seeds} seed(s); {len(skipped)} over budget (skipped), "
            f"{finished} run(s) finished earlier, {len(todo)} to train"
        )
        for p in skipped:
            log(
                f"  skipped, over budget: {describe(p.overrides)}: {p.budget.total:,} trainable > {p.budget.max_trainable:,}"
            )

        failures = {}
        for i, (p, seed, folder) in enumerate(todo, 1):
            log(f"\n=== [{i}/{len(todo)}] {describe(p.overrides)} seed {seed} -> {folder}")
            try:
                run_one(with_seed(p.cfg, seed), folder, point=p.overrides, seed=seed)
            except LorafitError as e:  # e.g. a diverging learning rate: the other points still train
                failures[(p.name, seed)] = str(e)
                log(f"lorafit: run failed: {e}")

        rows, keys = _rows(points, out, failures)
        md = write_tables(out, rows, keys, metric, f"sweep {out.name}: {len(points)} points x {seeds} seed(s)", seeds)
    log("\n" + md)
    log(
        f"sweep done: {len(todo) - len(failures)} run(s) trained, {finished} finished earlier, {len(skipped)} over budget, "
        f"in {time.perf_counter() - start:.0f}s -> {out}/results.md"
    )
    if failures:
        raise LorafitError(
            f"{len(failures)} of {len(todo)} run(s) failed ({next(iter(failures.values()))}); "
            "results.md marks them; fix the cause and re-run the same command to train only those"
        )
    return len(todo)
