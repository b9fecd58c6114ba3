"""`lorafit sweep`: train a grid, a plan or an Optuna search of configurations; every point is a normal run folder.

    sweeps/NAME/
      sweep.yaml            the resolved base config (a re-run with another base is refused)
      r=4_alpha=8-1a2b3c-s42/   one run folder per point and seed (`lorafit train`'s layout + point.json)
      results.csv, results.md   one row per point, sorted by the chosen metric (mean ± std over seeds)
      study.db              the Optuna study (search mode, default storage)

A point is finished when its run folder is complete (every file written, no INCOMPLETE marker), so re-running
the same command trains only what is missing, and a point interrupted mid-training continues from its newest
checkpoint. Over-budget points are counted on a weightless skeleton and listed as skipped before anything trains.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import shutil
import socket
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from .config import Config
from .errors import LorafitError
from .points import Point, Skeletons, apply_point, check_keys, describe, flow, get_key, resolve_points
from .runs import INCOMPLETE, REQUIRED_FILES

METRICS = {"val_loss": "best_val_loss", "val_accuracy": "val_accuracy", "val_macro_f1": "val_macro_f1"}  # --metric -> column
FIELDS = ("trainable", "best_val_loss", "val_accuracy", "val_macro_f1", "test_accuracy", "epochs", "wall_s")
POINT_FILE = "point.json"
BASE_FILE = "sweep.yaml"


def log(msg: str) -> None:
    print(msg, flush=True)


def lower_is_better(metric: str) -> bool:
    return metric == "val_loss"


# ---------------------------------------------------------------------------------------------------------------------
# One run's figures, and a point's row over its seeds


def is_complete(folder: Path) -> bool:
    """Every file of a finished run is there, and no INCOMPLETE marker (runs train in place)."""
    return folder.is_dir() and all((folder / f).exists() for f in REQUIRED_FILES) and not (folder / INCOMPLETE).exists()


def read_record(folder: Path) -> dict:
    """The table's figures for one finished run folder."""
    metrics = json.loads((folder / "metrics.json").read_text())
    history_file = folder / "history.jsonl"
    history = [json.loads(x) for x in history_file.read_text().splitlines() if x.strip()] if history_file.exists() else []
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
    keys: dict            # column key -> value
    status: str           # done | over budget | failed: ... | pruned at step N | running
    n: int                # finished seeds
    values: dict          # field -> [mean, std]
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
    """results.csv (means, and *_std columns with several seeds) and results.md; returns the markdown."""
    fields = [f for f in FIELDS if f != "val_macro_f1" or metric == "val_macro_f1"]
    if all(r.values["test_accuracy"][0] is None for r in rows):
        fields.remove("test_accuracy")
    buf = io.StringIO()
    w = csv.writer(buf)
    stds = [f for f in fields if seeds > 1 and f != "trainable"]
    w.writerow(keys + ["status", "seeds"] + fields + [f + "_std" for f in stds] + ["runs"])
    for r in rows:
        w.writerow([flow(r.keys[k]) for k in keys] + [r.status, r.n]
                   + ["" if r.values[f][0] is None else (int(r.values[f][0]) if f == "trainable" else round(r.values[f][0], 6)) for f in fields]
                   + ["" if r.values[f][1] is None else round(r.values[f][1], 6) for f in stds] + [" ".join(r.runs)])
    _write_atomic(out / "results.csv", buf.getvalue())

    short = {k: k.rsplit(".", 1)[-1] for k in keys}
    if len(set(short.values())) < len(short):
        short = {k: k for k in keys}
    head = [short[k] for k in keys] + ["status"] + (["seeds"] if seeds > 1 else []) + [f.replace("_", " ") for f in fields]
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [_cell(r.keys[k]) for k in keys] + [r.status] + ([str(r.n)] if seeds > 1 else [])
        cells += [_fmt(f, *r.values[f]) for f in fields]
        lines.append("| " + " | ".join(cells) + " |")
    md = "\n".join(lines) + "\n"
    _write_atomic(out / "results.md", md)
    return md


def _cell(value) -> str:
    text = f"{value:.4g}" if isinstance(value, float) else flow(value)
    return text.replace("|", "\\|")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------------
# The sweep folder


@contextlib.contextmanager
def folder_lock(out: Path):
    """One sweep process per folder: two would train the same point into the same run folder."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LorafitError(f"another lorafit sweep is running in {out}; wait for it to finish or pick another -o") from None
        for stale in out.glob(".*.partial"):  # left by a killed run of an older lorafit (runs now train in place)
            shutil.rmtree(stale, ignore_errors=True)
        yield


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k not in ("rank_pattern", "alpha_pattern"):
            out |= _flat(v, prefix + k + ".")
        else:
            out[prefix + k] = v
    return out


def config_difference(old: dict, new: dict) -> str:
    """The keys two resolved configs set differently, '' when none. Keys only one of them has are ignored: a
    newer lorafit adds keys (with defaults) without making an older sweep folder a different sweep."""
    a, b = _flat(old), _flat(new)
    diffs = [f"{k}: {flow(a[k])} -> {flow(b[k])}" for k in sorted(set(a) & set(b)) if a[k] != b[k]]
    return "; ".join(diffs[:5]) + (f"; and {len(diffs) - 5} more" if len(diffs) > 5 else "")


def check_base(out: Path, base: Config) -> None:
    """The first run records the base config; a re-run with another base would mix incomparable runs."""
    path = out / BASE_FILE
    if path.exists():
        diff = config_difference(yaml.safe_load(path.read_text())["base"], base.to_dict())
        if diff:
            raise LorafitError(f"{out} holds a sweep over a different base config ({diff}); "
                               "re-run with the original config, or pick a new -o folder")
    else:
        out.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, yaml.safe_dump({"base": base.to_dict()}, sort_keys=False))


def run_one(cfg: Config, folder: Path, on_eval=None, **info) -> dict:
    """Train one point with one seed into `folder` (a normal run folder) and return its table figures.
    A folder left INCOMPLETE by an interrupted sweep continues from its newest checkpoint."""
    from .train import run

    start = time.perf_counter()
    run(cfg, folder, on_eval=on_eval, resume=(folder / INCOMPLETE).exists())
    info["wall_seconds"] = round(time.perf_counter() - start, 2)
    (folder / POINT_FILE).write_text(json.dumps(info, indent=1, default=str))
    return read_record(folder)


def with_seed(cfg: Config, seed: int) -> Config:
    cfg = cfg.model_copy(deep=True)
    cfg.train.seed = seed
    return cfg


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


def run_grid(base: Config, overrides: list[dict], out: Path, seeds: int = 1, metric: str = "val_loss", dry_run: bool = False) -> int:
    """Train every point (x seeds) not finished yet; write the tables. Returns the number of runs trained."""
    start = time.perf_counter()
    points = resolve_points(base, overrides, seeds)
    skipped = [p for p in points if p.over_budget]
    if dry_run:
        log(f"sweep {out} (dry run): {len(points)} point(s) x {seeds} seed(s), {len(skipped)} over budget")
        for p in points:
            done = sum(is_complete(out / f"{p.name}-s{s}") for s in p.seeds)
            state = "over budget, skipped" if p.over_budget else f"{done} of {len(p.seeds)} run(s) finished"
            log(f"  {p.budget.total:>12,} trainable  {p.name:<60} {state}")
        return 0
    with folder_lock(out):
        check_base(out, base)
        todo, finished = [], 0
        for p in points:
            if p.over_budget:
                continue
            for seed in p.seeds:
                folder = out / f"{p.name}-s{seed}"
                if is_complete(folder):
                    finished += 1
                else:
                    todo.append((p, seed, folder))
        log(f"sweep {out}: {len(points)} point(s) x {seeds} seed(s); {len(skipped)} over budget (skipped), "
            f"{finished} run(s) finished earlier, {len(todo)} to train")
        for p in skipped:
            log(f"  skipped, over budget: {describe(p.overrides)}: {p.budget.total:,} trainable > {p.budget.max_trainable:,}")

        failures = {}
        for i, (p, seed, folder) in enumerate(todo, 1):
            log(f"\n=== [{i}/{len(todo)}] {describe(p.overrides)} seed {seed} -> {folder}")
            try:
                run_one(with_seed(p.cfg, seed), folder, point=p.overrides, seed=seed)
            except LorafitError as e:  # e.g. a diverging learning rate: the other points still train
                failures[(p.name, seed)] = str(e)
                log(f"lorafit: run failed: {e}")

        rows, keys = [], table_keys(points)
        for p in points:
            if p.over_budget:
                values = {f: [None, None] for f in FIELDS} | {"trainable": [p.budget.total, None]}
                rows.append(Row(key_values(p, keys), "over budget", 0, values, []))
                continue
            folders = [out / f"{p.name}-s{s}" for s in p.seeds]
            done = [f for f in folders if is_complete(f)]
            errors = [failures[(p.name, s)] for s in p.seeds if (p.name, s) in failures]
            status = "done" if len(done) == len(folders) else ("failed: " + errors[0] if errors else "incomplete")
            values = aggregate([read_record(f) for f in done])
            if values["trainable"][0] is None:
                values["trainable"] = [p.budget.total, None]
            rows.append(Row(key_values(p, keys), status, len(done), values, [f.name for f in done]))
        title = f"sweep {out.name}: {len(points)} points x {seeds} seed(s), sorted by {metric} ({'lower' if lower_is_better(metric) else 'higher'} is better)"
        md = write_tables(out, sort_rows(rows, metric), keys, metric, title, seeds)
    log("\n" + md)
    log(f"sweep done: {len(todo) - len(failures)} run(s) trained, {finished} finished earlier, {len(skipped)} over budget, "
        f"in {time.perf_counter() - start:.0f}s -> {out}/results.md")
    if failures:
        raise LorafitError(f"{len(failures)} of {len(todo)} run(s) failed ({next(iter(failures.values()))}); "
                           "results.md marks them; fix the cause and re-run the same command to train only those")
    return len(todo)


# ---------------------------------------------------------------------------------------------------------------------
# Optuna search


@dataclass
class Dim:
    key: str
    kind: str             # categorical | int | float
    choices: list | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None

    def suggest(self, trial):
        if self.kind == "categorical":
            labels = [c if _scalar(c) else flow(c) for c in self.choices]
            picked = trial.suggest_categorical(self.key, labels)
            return self.choices[labels.index(picked)]
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def from_param(self, value):
        if self.kind == "categorical":
            labels = [c if _scalar(c) else flow(c) for c in self.choices]
            return self.choices[labels.index(value)] if value in labels else value
        return value

    def extremes(self) -> list:
        return list(self.choices) if self.kind == "categorical" else [_num(self.low, self.kind), _num(self.high, self.kind)]


def _scalar(v) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def _num(v, kind):
    return int(v) if kind == "int" else float(v)


def read_space(path: Path, base: Config) -> list[Dim]:
    """SPACE.yaml: key -> a list of choices, or {low, high[, log][, step]} (ints give an integer range)."""
    from .config import read_yaml

    data = read_yaml(path)
    if not isinstance(data, dict) or not data:
        raise LorafitError(f"{path}: expected a mapping of config key -> [choices] or {{low: L, high: H, log: true}}, e.g. 'lora.r: [2, 4, 8]'")
    check_keys(list(data), str(path))
    dims, problems = [], []
    for key, spec in data.items():
        if isinstance(spec, list) and spec:
            dims.append(Dim(key, "categorical", choices=spec))
            continue
        if not isinstance(spec, dict) or not {"low", "high"} <= set(spec) or set(spec) - {"low", "high", "log", "step"}:
            problems.append(f"{key}: got {flow(spec)}: expected a non-empty list of choices or {{low: L, high: H}} with optional log: true / step: S")
            continue
        low, high = spec["low"], spec["high"]
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (low, high)) or low >= high:
            problems.append(f"{key}: low {low!r} and high {high!r} must be numbers with low < high")
            continue
        log_ = bool(spec["log"]) if "log" in spec else False
        if log_ and low <= 0:
            problems.append(f"{key}: log: true needs low > 0, got {low!r}")
            continue
        step = spec["step"] if "step" in spec else None
        ints = all(isinstance(x, int) for x in (low, high) + ((step,) if step is not None else ()))
        dims.append(Dim(key, "int" if ints else "float", low=low, high=high, log=log_, step=step))
    for d in dims:  # every choice and both ends must make a valid config
        for v in d.extremes():
            try:
                apply_point(base, {d.key: v}, f"{path}: {d.key}={flow(v)}")
            except LorafitError as e:
                problems.append(str(e))
    if problems:
        raise LorafitError(f"{path}: {len(problems)} problem(s): " + "; ".join(dict.fromkeys(problems)))
    return dims


class _Surplus(Exception):
    """A worker asked for a trial after the others had claimed all N: it is closed as failed, never trained."""


class _Failed(Exception):
    """A trial whose training failed with a user-facing error (recorded in its attributes)."""


def _open_storage(url: str):
    """An Optuna storage for the URL; heartbeats let a live worker fail, and retry once, the trial of a worker
    that died. Two workers starting on an empty database race to create its tables: the loser tries again."""
    import random

    import optuna
    import sqlalchemy.exc
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    for attempt in range(5):
        try:
            if not url.startswith(("sqlite:", "postgresql", "mysql")):
                return optuna.storages.get_storage(url)
            return RDBStorage(url, heartbeat_interval=60, grace_period=180, heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
                              engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite:") else {})
        except ImportError as e:
            raise LorafitError(f"--storage {_redact(url)}: the database driver is missing ({e}); for PostgreSQL run `pip install psycopg2-binary`") from None
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as e:
            if attempt == 4:
                raise LorafitError(f"--storage {_redact(url)}: cannot create the Optuna tables ({type(e).__name__}: {str(e).splitlines()[0]})") from None
            time.sleep(0.5 + random.random())
        except Exception as e:  # connection and URL errors: one line, not a traceback
            raise LorafitError(f"--storage {_redact(url)}: cannot open the Optuna storage ({type(e).__name__}: {str(e).splitlines()[0]}); "
                               "check the URL, the server and the credentials") from None


def _redact(url: str) -> str:
    import re

    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)


CLAIMING = ("COMPLETE", "PRUNED", "RUNNING", "WAITING")


def _claims(study, before: int | None = None) -> int:
    """Trials that count towards --trials: finished, pruned, running or queued (not failed), optionally only
    those numbered below `before`. Trial numbers are handed out under a lock on the study row, so this is exact."""
    from optuna.trial import TrialState

    states = tuple(TrialState[s] for s in CLAIMING)
    return sum(1 for t in study.get_trials(deepcopy=False, states=states) if before is None or t.number < before)


def run_search(base: Config, out: Path, space_path: Path, trials: int, metric: str = "val_loss", seeds: int = 1,
               storage: str | None = None, study_name: str | None = None, pruner="median") -> int:
    """Optuna TPE over SPACE.yaml with pruning on the intermediate validation metric, until the study holds
    `trials` trials in total (across every worker sharing the storage). Returns the trials this process ran.

    `pruner` is 'median' (prune below the median of earlier trials at the same step), 'none', or an Optuna pruner."""
    import warnings

    import optuna

    start = time.perf_counter()
    dims = read_space(space_path, base)
    if seeds > 1 and any(d.key == "train.seed" for d in dims):
        raise LorafitError("--seeds repeats each trial with seeds train.seed, train.seed+1, ...; do not also search train.seed")
    local = storage is None
    out.mkdir(parents=True, exist_ok=True)
    url = storage or f"sqlite:///{(out / 'study.db').resolve()}"
    name = study_name or out.name
    lock = folder_lock(out) if local else contextlib.nullcontext()
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # we print our own line per trial
    with lock:
        check_base(out, base)
        direction = "minimize" if lower_is_better(metric) else "maximize"
        if isinstance(pruner, str):
            pruner = optuna.pruners.MedianPruner(n_startup_trials=3) if pruner == "median" else optuna.pruners.NopPruner()
        st = _open_storage(url)
        try:
            study = optuna.create_study(storage=st, study_name=name, direction=direction, pruner=pruner, load_if_exists=True)
        except Exception as e:
            raise LorafitError(f"--storage {_redact(url)}: cannot create or load study {name!r} ({type(e).__name__}: {str(e).splitlines()[0]})") from None
        if study.direction.name.lower() != direction:
            raise LorafitError(f"study {name!r} {study.direction.name.lower()}s its objective, but --metric {metric} needs {direction}; use its metric or another --study")
        # A local study is reproducible (and a resumed one does not repeat its first samples); shared workers
        # must not draw the same random start-up points, so they seed from the clock.
        seed = base.train.seed + len(study.trials) if local else None
        study.sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, min(10, trials // 3)), constant_liar=True)
        _check_study(study, base, space_path, dims, metric, seeds)
        if local:  # we hold the folder: RUNNING trials are left from a killed earlier invocation
            from optuna.trial import TrialState

            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
                for folder in out.glob(f"trial-{t.number:04d}-s*"):  # its half-trained runs: never resumed
                    if (folder / INCOMPLETE).exists():
                        shutil.rmtree(folder, ignore_errors=True)
        else:
            optuna.storages.fail_stale_trials(study)
        skeletons = Skeletons()
        ran = []
        failures_in_a_row = [0]

        def objective(trial):
            if _claims(study, before=trial.number) >= trials:
                trial.set_user_attr("lorafit", {"status": "surplus"})
                study.stop()
                raise _Surplus()
            point = {d.key: d.suggest(trial) for d in dims}
            tag = f"trial {trial.number}"
            try:
                cfg = apply_point(base, point, f"{tag} ({describe(point)})")
                b = skeletons.budget(cfg)
            except LorafitError as e:
                return _fail(trial, str(e))
            attrs = {"status": "", "host": socket.gethostname(), "folder": str(out.resolve()), "runs": []}
            if b.total > b.max_trainable:
                log(f"{tag}: {describe(point)}: over budget ({b.total:,} > {b.max_trainable:,}), pruned without training")
                trial.set_user_attr("lorafit", attrs | {"status": "over budget", "values": {"trainable": [b.total, None]}})
                raise optuna.TrialPruned()
            records, last = [], {}
            ran.append(trial.number)

            def report(row):
                last.update(row)
                trial.report(row[metric], row["step"])
                if trial.should_prune():
                    raise optuna.TrialPruned(f"{metric} {row[metric]:.4f} at step {row['step']}")

            for i, seed in enumerate(cfg.train.seed + k for k in range(seeds)):
                folder = out / f"trial-{trial.number:04d}-s{seed}"
                log(f"\n=== {tag} seed {seed}: {describe(point)} -> {folder}")
                try:  # pruning uses the first seed's evaluations only
                    records.append(run_one(with_seed(cfg, seed), folder, report if i == 0 else None, point=point, seed=seed, trial=trial.number))
                except optuna.TrialPruned:
                    log(f"{tag}: pruned at step {last['step']} ({metric} {last[metric]:.4f})")
                    values = {f: [None, None] for f in FIELDS} | {"trainable": [b.total, None], "best_val_loss": [last["val_loss"], None],
                                                                 "val_accuracy": [last["val_accuracy"], None], "val_macro_f1": [last["val_macro_f1"], None],
                                                                 "epochs": [last["epoch"], None]}
                    trial.set_user_attr("lorafit", attrs | {"status": f"pruned at step {last['step']}", "values": values})
                    _discard(folder)
                    raise
                except LorafitError as e:
                    _discard(folder)
                    return _fail(trial, str(e))
                attrs["runs"].append(folder.name)
            failures_in_a_row[0] = 0
            values = aggregate(records)
            trial.set_user_attr("lorafit", attrs | {"status": "done", "n": len(records), "values": values})
            return values[METRICS[metric]][0]

        def _fail(trial, msg: str):
            failures_in_a_row[0] += 1
            log(f"trial {trial.number} failed: {msg}")
            trial.set_user_attr("lorafit", {"status": f"failed: {msg}", "host": socket.gethostname(), "folder": str(out.resolve()), "runs": []})
            if failures_in_a_row[0] >= 3:
                raise LorafitError(f"3 trials in a row failed, the last with: {msg}")
            raise _Failed(msg)

        def enough(study_, _trial):
            if _claims(study_) >= trials:
                study_.stop()

        have = _claims(study)
        log(f"search {name} ({'local ' if local else ''}storage {_redact(url)}): {have} of {trials} trial(s) claimed, metric {metric} ({direction})")
        if have < trials:
            study.optimize(objective, n_trials=None, callbacks=[enough], catch=(_Surplus, _Failed), gc_after_trial=True)
        rows, keys = search_rows(study, dims)
        title = f"search {name}: {trials} trials x {seeds} seed(s), sorted by {metric} ({'lower' if lower_is_better(metric) else 'higher'} is better)"
        md = write_tables(out, sort_rows(rows, metric), keys, metric, title, seeds)
    log("\n" + md)
    log(f"search done: this worker trained {len(ran)} trial(s) {ran} in {time.perf_counter() - start:.0f}s; the study has "
        f"{_claims(study)} of {trials} -> {out}/results.md")
    return len(ran)


def _discard(folder: Path) -> None:
    """A pruned or failed trial is never resumed (a new trial takes its place): drop its checkpoints."""
    if (folder / INCOMPLETE).exists():
        shutil.rmtree(folder, ignore_errors=True)


def _check_study(study, base: Config, space_path: Path, dims: list[Dim], metric: str, seeds: int) -> None:
    """Workers joining a study must search the same space from the same base config."""
    mine = {"base": base.to_dict(), "space": {d.key: d.__dict__ for d in dims}, "metric": metric, "seeds": seeds}
    if "lorafit_setup" not in study.user_attrs:  # a new study: record what it searches
        study.set_user_attr("lorafit_setup", json.loads(json.dumps(mine, default=str)))
        return
    theirs, mine = study.user_attrs["lorafit_setup"], json.loads(json.dumps(mine, default=str))
    for part in ("metric", "seeds", "space", "base"):
        differs = config_difference(theirs["base"], mine["base"]) if part == "base" else theirs[part] != mine[part]
        if differs:
            what = differs if part == "base" else f"{flow(theirs[part])}, here {flow(mine[part])}"
            raise LorafitError(f"study {study.study_name!r} was started with a different {part} ({what}); "
                               f"use the same config, {space_path.name}, --metric and --seeds, or another --study")


def search_rows(study, dims: list[Dim]) -> tuple[list[Row], list[str]]:
    from optuna.trial import TrialState

    rows = []
    for t in study.get_trials(deepcopy=False):
        attrs = t.user_attrs["lorafit"] if "lorafit" in t.user_attrs else {}  # a dead worker's trial has none
        if attrs.get("status") == "surplus":
            continue
        status = attrs.get("status") or t.state.name.lower()
        if t.state == TrialState.RUNNING:
            status = "running"
        values = {f: [None, None] for f in FIELDS} | {k: v for k, v in attrs.get("values", {}).items()}
        keys = {"trial": t.number} | {d.key: d.from_param(t.params[d.key]) if d.key in t.params else None for d in dims}
        rows.append(Row(keys, status, attrs.get("n", 0), values, attrs.get("runs", [])))
    return rows, ["trial"] + [d.key for d in dims]


# ---------------------------------------------------------------------------------------------------------------------
# Command line


def parse_ints(raw: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in raw.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or any(v <= 0 for v in values):
        raise LorafitError(f"{flag} {raw!r}: expected positive integers separated by commas, e.g. {flag} 2,4,8")
    return values


def main(a) -> None:
    """`lorafit sweep`: check the flags, then run a grid/plan sweep or a search."""
    from .config import load_config
    from .points import parse_grid_arg, read_points_file

    grid_mode = bool(a.grid or a.grid_file or a.plan)
    if a.search and grid_mode:
        raise LorafitError("--search explores a --space; it does not combine with --grid, --grid-file or --plan (run those as a separate sweep)")
    if not a.search and not grid_mode:
        raise LorafitError("nothing to sweep: give --grid KEY=V1,V2 (repeatable), --grid-file FILE, --plan FILE, or --search optuna --trials N --space FILE")
    search_flags = [f for f, v in (("--trials", a.trials), ("--space", a.space), ("--storage", a.storage), ("--study", a.study)) if v is not None]
    if a.search and a.dry_run:
        raise LorafitError("--dry-run lists the points of a grid or plan; a search has no points before it runs")
    if not a.search and search_flags:
        raise LorafitError(f"{', '.join(search_flags)} only apply with --search optuna")
    if a.seeds < 1:
        raise LorafitError(f"--seeds {a.seeds}: expected 1 or more")
    cfg = load_config(a.config, a.overrides)
    metric = a.metric or cfg.train.early_stopping.metric
    if a.search:
        if a.trials is None or a.trials < 1 or a.space is None:
            raise LorafitError("--search optuna needs --trials N (N >= 1) and --space FILE (key -> [choices] or {low, high, log})")
        if a.storage and not a.study:
            raise LorafitError("--storage needs --study NAME, so that every worker joins the same study")
        run_search(cfg, a.output, a.space, a.trials, metric, a.seeds, a.storage, a.study, a.pruner)
        return
    grid: dict[str, list] = {}
    points: list[dict] = []
    for path in [p for p in (a.grid_file, a.plan) if p]:
        g, pts = read_points_file(path)
        if path == a.plan and not pts:
            raise LorafitError(f"--plan {path}: no 'points:' in it; expected a file written by `lorafit plan -o FILE`")
        grid |= g
        points += pts
    for item in a.grid:
        key, values = parse_grid_arg(item)
        grid[key] = values
    check_keys(list(grid) + [k for p in points for k in p], "sweep")
    from .points import expand

    run_grid(cfg, expand(points, grid), a.output, a.seeds, metric, a.dry_run)
