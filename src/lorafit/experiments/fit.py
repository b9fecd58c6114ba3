"""`lorafit fit --minutes M`: the most accurate classifier a time budget buys, selected on validation rows only.

A share of the time goes to short trials of a few candidate recipes (each a normal run folder, trained to its own
small deadline on the training rows, scored on validation only); the winner by validation accuracy is then trained
on all training rows for the rest of the time, its schedule planned to the deadline, and is the only run that sees
the test rows. Everything runs in this one process, so imports are paid once.

    DIR/                        a sweep folder: `lorafit compare DIR` and `lorafit report` work on it
      sweep.yaml                the base config (a re-run with another base is refused)
      fit.json                  minutes asked, each trial's time, time spent, the winner: a re-run resumes from it
      <point>-s<seed>/          one trial run per candidate
      final/                    the winner on all training rows, to the deadline (test rows scored, baseline)
      results.csv, results.md   trials and final, one row each

A killed fit resumes by running the same command: finished trials are kept, an interrupted trial or final run
continues from its newest checkpoint, and the time already spent counts against the minutes asked.
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .. import runs
from ..atomic import atomic_write_text
from ..batching import bars_hidden
from ..blend import summary as blend_summary
from ..config import Config
from ..errors import LorafitError
from ..training.recipe import sharing_inputs
from .points import Point, Skeletons, apply_point, describe, resolve_points
from .sweep_folder import check_base, lock, log, run_one
from .tables import POINT_FILE, Row, aggregate, read_record, write_tables

FIT_FILE = "fit.json"
FINAL = "final"

# Adapters on the top three encoder layers only (at twice the rank, for about the same budget): the frozen layers
# below run without gradients, once per training text (train.cache_frozen_layers), so a step costs about half as much
# and a deadline buys about twice the steps. Under a 10-minute deadline on held-out AG News rows it beat the base
# config on validation and held-out rows alike (docs/accuracy.md). It trains without dropout (model and LoRA): under a
# deadline it trains well short of where dropout pays, and the masks cost time ("Dropout under a deadline" there).
UPPER_LAYERS = {
    "lora.target_modules": ["query", "key", "value", "dense"],
    "lora.layers_to_transform": [-3, -2, -1],
    "lora.r": 16,
    "lora.alpha": 32,
    "model.dropout": 0.0,
    "lora.dropout": 0.0,
}
# What the trials compare, on top of the base config, in order: a fit with time for only a few trials runs the first
# few, and a fit too short for trials trains the first that applies. The upper-layers layout comes first, being what
# a deadline buys most with (on a model whose layers it cannot name, e.g. DistilBERT, it is left out and the base
# config comes first); then the base config as given; then the levers that gained something in equal-step runs on
# held-out AG News rows with the embedded MiniLM (docs/accuracy.md): a higher learning rate, with the mean head, and a
# higher rank.
CANDIDATES = [
    UPPER_LAYERS,
    {},
    {"model.head": "mean", "train.lr": 2e-3},
    {"train.lr": 2e-3},
    {"model.head": "mean", "lora.r": 16, "lora.alpha": 32, "train.lr": 2e-3},
]
TRIAL_SHARE = 0.25  # of the minutes asked, spent on trials
# Below this much training a trial cannot tell the candidates apart: on validation sets of a few thousand rows, the
# differences between them are smaller than the noise until trials run for minutes (docs/accuracy.md). Fewer
# candidates are tried instead, and with fewer than two there are no trials: the whole budget trains the base config.
MIN_TRIAL_SECONDS = 120.0
LONG_ENOUGH = 1000.0  # epochs: the deadline, not the epoch count, ends every fit run
CHECKPOINT_SECONDS = 120.0  # the final run checkpoints about this often, so a kill loses at most this much
# The final run's fixed cost beyond a trial's (the test rows at the trials' evaluation rate, the baseline, restoring
# the best checkpoint) is estimated as a trial's fixed cost times this; above the estimate a fit may overrun by grace().
OVERHEAD_FACTOR = 1.5
# Without trials nothing has measured the final run's fixed cost. Its evaluations (validation and test rows) are
# timed before it starts (_evaluation_seconds); this stands in for the rest: setup, the baseline, the blend (which
# reuses the baseline's model where it fits the budget), saving, the report (grace() covers the error).
UNMEASURED_FIXED_SECONDS = 45.0
PROBE_TEXTS = 256  # validation texts an evaluation is timed on
# The probe times the base model as `lorafit predict` runs it; a training run's evaluation of its unmerged adapter
# took about as long per text when measured (docs/accuracy.md). The factor is a margin: a fit that ends a little
# early costs less than one that overruns.
PROBE_FACTOR = 1.25
# nor its training rate: the final run checkpoints every this many steps instead of every CHECKPOINT_SECONDS
UNMEASURED_CHECKPOINT_STEPS = 200
MIN_FINAL_SECONDS = 10.0  # a fit that leaves its final run less training than this is refused
GRACE_SECONDS = 60.0


def grace(minutes: float) -> float:
    """How much longer than asked a fit may take: the fixed cost of the final run is estimated, not known."""
    return max(GRACE_SECONDS, 0.03 * minutes * 60)


def _trial_settings(seconds: float) -> dict:
    return {
        "train.epochs": LONG_ENOUGH,
        "train.max_seconds": round(seconds, 1),
        "data.test_source": None,  # selection sees validation rows only
        "eval.baseline": False,
        "eval.blend": False,  # trials compare adapters
        "eval.early_stopping.patience": 0,
        "checkpoint.every": None,
    }


def candidates(base: Config) -> tuple[list[Point], list[str]]:
    """The candidates that apply to this model and fit its budget, and a note for each one left out."""
    skeletons, points, notes = Skeletons(), [], []
    for c in CANDIDATES:
        try:
            (p,) = resolve_points(base, [c], skeletons=skeletons)
        except LorafitError as e:  # e.g. the mean head on a DistilBERT base
            notes.append(f"left out {describe(c)}: {e}")
            continue
        if p.over_budget:
            notes.append(f"left out {describe(c)}: {p.budget.total:,} trainable > {p.budget.max_trainable:,}")
            continue
        points.append(p)
    if not points:
        raise LorafitError(
            f"none of fit's {len(CANDIDATES)} candidate recipes applies to {base.model.name} within the budget of "
            f"{base.budget.max_trainable:,} ({'; '.join(notes)}); raise --budget, or train a layout from `lorafit plan` "
            "with `lorafit train`"
        )
    return points, notes


class Clock:
    """Seconds of the budget spent, across a kill: fit.json keeps what finished phases took."""

    def __init__(self, total: float, spent: float):
        self.total, self.start = total, time.perf_counter() - spent

    @property
    def spent(self) -> float:
        return time.perf_counter() - self.start

    @property
    def left(self) -> float:
        return self.total - self.spent


@contextmanager
def budget_bar(clock: Clock, phase: list[str]):
    """One progress bar for the whole budget, in seconds; the runs' own bars are hidden under it."""
    from tqdm.auto import tqdm

    bar = tqdm(total=round(clock.total), desc="fit", unit="s", disable=False, dynamic_ncols=True)
    stop = threading.Event()

    def tick():
        while not stop.wait(1.0):
            bar.n = min(round(clock.spent), bar.total)
            bar.set_postfix_str(phase[0], refresh=True)

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        with bars_hidden():
            yield
    finally:
        stop.set()
        thread.join()
        bar.n = round(clock.spent)
        bar.close()


def _read_state(out: Path, minutes: float) -> dict:
    path = out / FIT_FILE
    if not path.exists():
        return {"minutes": minutes, "spent_seconds": 0.0, "trial_seconds": {}, "final": None}
    state = json.loads(path.read_text())
    if state["minutes"] != minutes:
        raise LorafitError(
            f"{out} holds a fit of --minutes {state['minutes']:g}, not {minutes:g}; re-run with --minutes "
            f"{state['minutes']:g} to resume it, or pick a new -o folder"
        )
    return state


def _save_state(out: Path, state: dict) -> None:
    atomic_write_text(out / FIT_FILE, json.dumps(state, indent=1))


def _training(folder: Path) -> dict:
    return json.loads((folder / runs.METRICS).read_text())["training"]


def _overhead(folder: Path) -> float:
    """A finished run's seconds outside its training loop (setup, the last evaluation, saving, the report)."""
    info = json.loads((folder / POINT_FILE).read_text())
    return max(0.0, info["wall_seconds"] - _training(folder)["train_seconds"])


def _pick(trials: list[tuple[Point, Path]]) -> tuple[Point, Path]:
    """The best trial by validation accuracy; ties by the lower validation loss."""
    done = [(p, f) for p, f in trials if runs.is_complete(f)]
    if not done:
        raise LorafitError("no trial finished; fix the cause above and re-run the same command to resume the fit")
    return max(done, key=lambda pf: (read_record(pf[1])["val_accuracy"], -read_record(pf[1])["best_val_loss"]))


def _final_seconds(clock: Clock, trials: list[Path], n_val: int, n_test: int) -> tuple[float, float]:
    """Training seconds for the final run, from what the trials measured, and their training rate (samples/s)."""
    fixed = max(_overhead(f) for f in trials)
    test_cost = max(_training(f).get("val_eval_seconds", fixed) for f in trials) * n_test / max(n_val, 1)
    seconds = clock.left - OVERHEAD_FACTOR * fixed - test_cost
    rate = max(_training(f)["train_samples_per_s"] for f in trials)
    return seconds, rate


def _rows(trials: list[tuple[Point, Path]], final: Path, winner: Point) -> tuple[list[Row], list[str]]:
    keys = ["phase", *dict.fromkeys(k for p, _ in trials for k in p.overrides)]
    rows = []
    for (p, folder), phase in [*((t, "trial") for t in trials), ((winner, final), "final")]:
        done = runs.is_complete(folder)
        values = aggregate([read_record(folder)] if done else [])
        if values["trainable"][0] is None:
            values["trainable"] = [p.budget.total, None]
        cells = {"phase": phase} | {k: p.overrides.get(k, "") for k in keys[1:]}
        rows.append(Row(cells, "done" if done else "incomplete", int(done), values, [folder.name] if done else []))
    return rows, keys


def fit(base: Config, minutes: float, out: Path, budget: int | None = None, blend: bool = True) -> Path:
    """Spend `minutes` on trials and the winner's final run in `out`; returns the final run folder.

    blend: the final run blends its adapter with a TF-IDF model where that is more accurate on validation
    (eval.blend); the trials never do, so they compare adapters."""
    if not minutes > 0:
        raise LorafitError(f"--minutes {minutes:g}: expected a positive number of minutes, e.g. --minutes 30")
    if budget is not None:
        base = base.model_copy(deep=True)
        base.budget.max_trainable = budget
    points, notes = candidates(base)
    total = minutes * 60
    with lock(out):
        check_base(out, base)
        state = _read_state(out, minutes)
        clock = Clock(total, state["spent_seconds"])
        trial_budget = TRIAL_SHARE * total
        n = min(len(points), int(trial_budget // (2 * MIN_TRIAL_SECONDS)))
        if n < 2:  # one trial would select nothing: the base config gets the whole budget
            notes.append(f"no trials: {minutes:g} minutes are too few to tell candidates apart; training the first")
            n = 0
        elif n < len(points):
            notes.append(f"{len(points) - n} candidate(s) left out: {minutes:g} minutes leave too little for them")
        first, points = points[0], points[:n]
        trials = [(p, out / f"{p.name}-s{p.cfg.train.seed}") for p in points]
        log(
            f"fit {out}: {minutes:g} minutes (+ up to {grace(minutes):.0f}s grace): {len(trials)} trial(s) on "
            f"{TRIAL_SHARE:.0%} of the time, then the winner on all training rows to the deadline"
            if trials
            else f"fit {out}: {minutes:g} minutes (+ up to {grace(minutes):.0f}s grace): "
            f"{describe(first.overrides)} on all training rows to the deadline"
        )
        for note in notes:
            log(f"  {note}")
        phase = ["trials"]
        with budget_bar(clock, phase), sharing_inputs():
            for i, (p, folder) in enumerate(trials):
                if runs.is_complete(folder):
                    continue
                name = folder.name
                if name not in state["trial_seconds"]:
                    earlier = [f for _, f in trials[:i] if runs.is_complete(f)]
                    fixed = max((_overhead(f) for f in earlier), default=MIN_TRIAL_SECONDS)
                    share = (trial_budget - clock.spent) / (len(trials) - i)
                    state["trial_seconds"][name] = max(MIN_TRIAL_SECONDS, share - fixed)
                    _save_state(out, state)
                seconds = state["trial_seconds"][name]
                phase[0] = f"trial {i + 1}/{len(trials)}"
                log(f"\n=== fit trial {i + 1}/{len(trials)}: {describe(p.overrides)}, {seconds:.0f}s of training")
                cfg = _apply(p.cfg, _trial_settings(seconds))
                try:
                    run_one(cfg, folder, point=p.overrides, seed=cfg.train.seed, role="trial")
                except LorafitError as e:  # e.g. a diverging learning rate: the other candidates still run
                    log(f"lorafit: trial failed: {e}")
                state["spent_seconds"] = clock.spent
                _save_state(out, state)

            winner = _pick(trials)[0] if trials else first
            final = out / FINAL
            if state["final"] is None or state["final"]["point"] != winner.overrides:
                done = [f for _, f in trials if runs.is_complete(f)]
                if done:
                    n_val, n_test = _split_sizes(_data(base))
                    seconds, rate = _final_seconds(clock, done, n_val, n_test)
                    every = max(10, round(CHECKPOINT_SECONDS * rate / winner.cfg.train.batch_size))
                else:
                    reserved = UNMEASURED_FIXED_SECONDS + _evaluation_seconds(winner.cfg)
                    seconds, every = clock.left - reserved, UNMEASURED_CHECKPOINT_STEPS
                    log(f"  reserving {reserved:.0f}s after the deadline for the final run's evaluations and saving")
                if seconds < MIN_FINAL_SECONDS:
                    raise LorafitError(
                        f"only {clock.left:.0f}s of the {minutes:g} minutes are left for the final run; "
                        "give more --minutes (or a smaller data.source)"
                    )
                state["final"] = {
                    "point": winner.overrides,
                    "max_seconds": round(seconds, 1),
                    "checkpoint_every": every,
                }
                _save_state(out, state)
            f = state["final"]
            if not runs.is_complete(final):
                phase[0] = "final"
                log(
                    f"\n=== fit final: {describe(winner.overrides)} on all training rows, {f['max_seconds']:.0f}s of training"
                )
                settings = {
                    "train.max_seconds": f["max_seconds"],
                    "checkpoint.every": f["checkpoint_every"],
                    "eval.blend": blend,
                }
                cfg = _apply(winner.cfg, {"train.epochs": LONG_ENOUGH} | settings)
                run_one(cfg, final, point=winner.overrides, seed=cfg.train.seed, role="final")
                state["spent_seconds"] = clock.spent
                _save_state(out, state)
        rows, keys = _rows(trials, final, winner)
        md = write_tables(out, rows, keys, "val_accuracy", f"fit {out.name}: {minutes:g} minutes", 1)
    log("\n" + md)
    log(
        f"fit done in {state['spent_seconds']:.0f}s of {total:.0f}s asked: {describe(winner.overrides)} -> {final} "
        f"(val accuracy {read_record(final)['val_accuracy']:.4f})"
    )
    if line := blend_summary(json.loads((final / runs.METRICS).read_text())):
        log(line)
    return final


def _apply(cfg: Config, settings: dict) -> Config:
    return apply_point(cfg, settings, "fit")


def _evaluation_seconds(cfg: Config) -> float:
    """About how long the final run's evaluations of its validation and test rows will take on this machine, from
    the base model's time on a sample of validation rows. On a slow CPU they take minutes, which a fit without
    trials would otherwise spend past its deadline."""
    from ..batching import encode, predict_logits
    from ..fast.device import concurrent_passes, pick_device, resolve_precision
    from ..inference.loaded import for_inference
    from ..models import build_model, load_tokenizer

    data = _data(cfg)
    device = pick_device()
    dtype = resolve_precision(cfg.train.precision, device)
    model = build_model(cfg, len(data.label_names))
    for_inference(model, cfg, device, dtype)  # with prediction's speed patches, as `lorafit predict` runs
    tokenizer = load_tokenizer(cfg.model.name)
    batch = cfg.eval.batch_size

    def timed(texts: list[str]) -> float:
        enc = encode(tokenizer, texts, np.zeros(len(texts), dtype=np.int64), cfg.model.max_length)
        start = time.perf_counter()
        predict_logits(model, enc, batch, tokenizer.pad_token_id, device, dtype, passes=concurrent_passes(device))
        return time.perf_counter() - start

    timed(data.val.texts[:batch])  # warm-up: the first pass pays for allocations
    texts = data.val.texts[:PROBE_TEXTS]
    return PROBE_FACTOR * timed(texts) / len(texts) * sum(_split_sizes(data))


def _data(cfg: Config):
    from ..data import load_data

    return load_data(cfg.data, cfg.train.seed)


def _split_sizes(data) -> tuple[int, int]:
    """Validation and test rows of the data (the final run scores both)."""
    return len(data.val.texts), len(data.test.texts) if data.test else 0
