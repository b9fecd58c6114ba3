"""`lorafit sweep --search optuna`: Optuna TPE over a space of config keys, with pruning on the intermediate
validation metric; several workers may share one study through a database (--storage)."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from .. import runs
from ..config import Config, read_yaml
from ..errors import LorafitError
from .points import Skeletons, apply_point, check_keys, describe, flow
from .sweep_folder import check_base, config_difference, lock, log, run_one, with_seed
from .tables import FIELDS, METRICS, Row, aggregate, lower_is_better, write_tables


@dataclass
class Dim:
    key: str
    kind: str  # categorical | int | float
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
        return (
            list(self.choices)
            if self.kind == "categorical"
            else [_num(self.low, self.kind), _num(self.high, self.kind)]
        )


def _scalar(v) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def _num(v, kind):
    return int(v) if kind == "int" else float(v)


def read_space(path: Path, base: Config) -> list[Dim]:
    """SPACE.yaml: key -> a list of choices, or {low, high[, log][, step]} (ints give an integer range)."""
    data = read_yaml(path)
    if not isinstance(data, dict) or not data:
        raise LorafitError(
            f"{path}: expected a mapping of config key -> [choices] or {{low: L, high: H, log: true}}, e.g. 'lora.r: [2, 4, 8]'"
        )
    check_keys(list(data), str(path))
    dims, problems = [], []
    for key, spec in data.items():
        if isinstance(spec, list) and spec:
            dims.append(Dim(key, "categorical", choices=spec))
            continue
        if not isinstance(spec, dict) or not {"low", "high"} <= set(spec) or set(spec) - {"low", "high", "log", "step"}:
            problems.append(
                f"{key}: got {flow(spec)}: expected a non-empty list of choices or {{low: L, high: H}} with optional log: true / step: S"
            )
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
            return RDBStorage(
                url,
                heartbeat_interval=60,
                grace_period=180,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
                engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite:") else {},
            )
        except ImportError as e:
            raise LorafitError(
                f"--storage {_redact(url)}: the database driver is missing ({e}); for PostgreSQL run `pip install psycopg2-binary`"
            ) from None
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as e:
            if attempt == 4:
                raise LorafitError(
                    f"--storage {_redact(url)}: cannot create the Optuna tables ({type(e).__name__}: {str(e).splitlines()[0]})"
                ) from None
            time.sleep(0.5 + random.random())
        except Exception as e:  # connection and URL errors: one line, not a traceback
            raise LorafitError(
                f"--storage {_redact(url)}: cannot open the Optuna storage ({type(e).__name__}: {str(e).splitlines()[0]}); "
                "check the URL, the server and the credentials"
            ) from None


def _redact(url: str) -> str:
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)


CLAIMING = ("COMPLETE", "PRUNED", "RUNNING", "WAITING")


def _claims(study, before: int | None = None) -> int:
    """Trials that count towards --trials: finished, pruned, running or queued (not failed), optionally only
    those numbered below `before`. Trial numbers are handed out under a lock on the study row, so this is exact."""
    from optuna.trial import TrialState

    states = tuple(TrialState[s] for s in CLAIMING)
    return sum(1 for t in study.get_trials(deepcopy=False, states=states) if before is None or t.number < before)


def _open_study(base: Config, out: Path, url: str, name: str, metric: str, pruner, local: bool, trials: int):
    """Create or join the study, check that its direction matches the metric, and give it a sampler."""
    import optuna

    direction = "minimize" if lower_is_better(metric) else "maximize"
    if isinstance(pruner, str):
        pruner = optuna.pruners.MedianPruner(n_startup_trials=3) if pruner == "median" else optuna.pruners.NopPruner()
    storage = _open_storage(url)
    try:
        study = optuna.create_study(
            storage=storage, study_name=name, direction=direction, pruner=pruner, load_if_exists=True
        )
    except Exception as e:
        raise LorafitError(
            f"--storage {_redact(url)}: cannot create or load study {name!r} ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from None
    if study.direction.name.lower() != direction:
        raise LorafitError(
            f"study {name!r} {study.direction.name.lower()}s its objective, but --metric {metric} needs {direction}; use its metric or another --study"
        )
    # A local study is reproducible (and a resumed one does not repeat its first samples); shared workers
    # must not draw the same random start-up points, so they seed from the clock.
    seed = base.train.seed + len(study.trials) if local else None
    study.sampler = optuna.samplers.TPESampler(
        seed=seed, n_startup_trials=max(2, min(10, trials // 3)), constant_liar=True
    )
    return study


def _fail_leftover_trials(study, out: Path, local: bool) -> None:
    """Trials left RUNNING by a killed worker: a local study's are ours (we hold the folder), a shared one's are
    failed by their heartbeat."""
    import optuna
    from optuna.trial import TrialState

    if not local:
        optuna.storages.fail_stale_trials(study)
        return
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        for folder in out.glob(f"trial-{t.number:04d}-s*"):  # its half-trained runs: never resumed
            _discard(folder)


class _Objective:
    """One trial: suggest a point, check its budget, train it for every seed, report to the pruner, record the row."""

    def __init__(self, study, base: Config, out: Path, dims: list[Dim], trials: int, metric: str, seeds: int):
        self.study, self.base, self.out, self.dims = study, base, out, dims
        self.trials, self.metric, self.seeds = trials, metric, seeds
        self.skeletons = Skeletons()
        self.ran: list[int] = []
        self.failures_in_a_row = 0

    def attrs(self, status: str = "") -> dict:
        return {"status": status, "host": socket.gethostname(), "folder": str(self.out.resolve()), "runs": []}

    def fail(self, trial, msg: str):
        self.failures_in_a_row += 1
        log(f"trial {trial.number} failed: {msg}")
        trial.set_user_attr("lorafit", self.attrs(f"failed: {msg}"))
        if self.failures_in_a_row >= 3:
            raise LorafitError(f"3 trials in a row failed, the last with: {msg}")
        raise _Failed(msg)

    def __call__(self, trial):
        import optuna

        if _claims(self.study, before=trial.number) >= self.trials:
            trial.set_user_attr("lorafit", {"status": "surplus"})
            self.study.stop()
            raise _Surplus()
        point = {d.key: d.suggest(trial) for d in self.dims}
        tag = f"trial {trial.number}"
        try:
            cfg = apply_point(self.base, point, f"{tag} ({describe(point)})")
            b = self.skeletons.budget(cfg)
        except LorafitError as e:
            return self.fail(trial, str(e))
        attrs = self.attrs()
        if b.total > b.max_trainable:
            log(f"{tag}: {describe(point)}: over budget ({b.total:,} > {b.max_trainable:,}), pruned without training")
            trial.set_user_attr("lorafit", attrs | {"status": "over budget", "values": {"trainable": [b.total, None]}})
            raise optuna.TrialPruned()
        self.ran.append(trial.number)
        records = [
            self.train_seed(trial, cfg, point, b.total, seed, attrs, first=i == 0)
            for i, seed in enumerate(cfg.train.seed + k for k in range(self.seeds))
        ]
        self.failures_in_a_row = 0
        values = aggregate(records)
        trial.set_user_attr("lorafit", attrs | {"status": "done", "n": len(records), "values": values})
        return values[METRICS[self.metric]][0]

    def train_seed(self, trial, cfg: Config, point: dict, trainable: int, seed: int, attrs: dict, first: bool) -> dict:
        """One seed's run of the trial; pruning uses the first seed's evaluations only."""
        import optuna

        metric, tag, last = self.metric, f"trial {trial.number}", {}

        def report(row):
            last.update(row)
            trial.report(row[metric], row["step"])
            if trial.should_prune():
                raise optuna.TrialPruned(f"{metric} {row[metric]:.4f} at step {row['step']}")

        folder = self.out / f"trial-{trial.number:04d}-s{seed}"
        log(f"\n=== {tag} seed {seed}: {describe(point)} -> {folder}")
        try:
            record = run_one(
                with_seed(cfg, seed), folder, report if first else None, point=point, seed=seed, trial=trial.number
            )
        except optuna.TrialPruned:
            log(f"{tag}: pruned at step {last['step']} ({metric} {last[metric]:.4f})")
            values = {f: [None, None] for f in FIELDS} | {
                "trainable": [trainable, None],
                "best_val_loss": [last["val_loss"], None],
                "val_accuracy": [last["val_accuracy"], None],
                "val_macro_f1": [last["val_macro_f1"], None],
                "epochs": [last["epoch"], None],
            }
            trial.set_user_attr("lorafit", attrs | {"status": f"pruned at step {last['step']}", "values": values})
            _discard(folder)
            raise
        except LorafitError as e:
            _discard(folder)
            return self.fail(trial, str(e))
        attrs["runs"].append(folder.name)
        return record


def run_search(
    base: Config,
    out: Path,
    space_path: Path,
    trials: int,
    metric: str = "val_loss",
    seeds: int = 1,
    storage: str | None = None,
    study_name: str | None = None,
    pruner="median",
) -> int:
    """Optuna TPE over SPACE.yaml with pruning on the intermediate validation metric, until the study holds
    `trials` trials in total (across every worker sharing the storage). Returns the trials this process ran.

    `pruner` is 'median' (prune below the median of earlier trials at the same step), 'none', or an Optuna pruner."""
    import warnings

    import optuna

    start = time.perf_counter()
    dims = read_space(space_path, base)
    if seeds > 1 and any(d.key == "train.seed" for d in dims):
        raise LorafitError(
            "--seeds repeats each trial with seeds train.seed, train.seed+1, ...; do not also search train.seed"
        )
    local = storage is None
    out.mkdir(parents=True, exist_ok=True)
    url = storage or f"sqlite:///{(out / 'study.db').resolve()}"
    name = study_name or out.name
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # we print our own line per trial
    with lock(out) if local else contextlib.nullcontext():
        check_base(out, base)
        study = _open_study(base, out, url, name, metric, pruner, local, trials)
        _check_study(study, base, space_path, dims, metric, seeds)
        _fail_leftover_trials(study, out, local)
        objective = _Objective(study, base, out, dims, trials, metric, seeds)

        def enough(study_, _trial):
            if _claims(study_) >= trials:
                study_.stop()

        have = _claims(study)
        log(
            f"search {name} ({'local ' if local else ''}storage {_redact(url)}): {have} of {trials} trial(s) claimed, metric {metric} "
            f"({study.direction.name.lower()})"
        )
        if have < trials:
            study.optimize(objective, n_trials=None, callbacks=[enough], catch=(_Surplus, _Failed), gc_after_trial=True)
        rows, keys = search_rows(study, dims)
        md = write_tables(out, rows, keys, metric, f"search {name}: {trials} trials x {seeds} seed(s)", seeds)
    log("\n" + md)
    log(
        f"search done: this worker trained {len(objective.ran)} trial(s) {objective.ran} in {time.perf_counter() - start:.0f}s; the study has "
        f"{_claims(study)} of {trials} -> {out}/results.md"
    )
    return len(objective.ran)


def _discard(folder: Path) -> None:
    """A pruned or failed trial is never resumed (a new trial takes its place): drop its checkpoints."""
    if runs.is_incomplete(folder):
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
            raise LorafitError(
                f"study {study.study_name!r} was started with a different {part} ({what}); "
                f"use the same config, {space_path.name}, --metric and --seeds, or another --study"
            )


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
