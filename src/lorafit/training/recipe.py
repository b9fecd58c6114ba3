"""The training recipe: setup -> sanity check -> train (evaluate, early-stop, checkpoint) -> restore best -> final metrics -> save.

A plain PyTorch loop over a PEFT-wrapped model. It is shorter than configuring Trainer for the same
behaviour and lets the fast path (length grouping, dynamic padding, bf16-stored frozen base) be the default.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import baseline, model_card, runs
from .. import blend as blend_mod
from .. import budget as budget_mod
from ..atomic import atomic_write_text
from ..batching import Encoded, bars_are_hidden, collate, encode, predict_logits, train_batches
from ..config import Config, save_config
from ..data import Data, known_num_labels, load_data
from ..errors import LorafitError
from ..fast import patches
from ..fast.device import (
    autocast,
    concurrent_passes,
    pick_device,
    release_free_memory,
    resolve_precision,
    set_threads,
    store_frozen_in,
)
from ..metrics import classification_metrics
from ..models import build_model, load_tokenizer, wrap
from ..report.run_report import write_run_report
from ..schedule import Schedule, make_optimizer
from . import distributed
from .checkpoint import Checkpoints, Result, TrainingState, pack, restore, rng_state, set_rng_state
from .frozen_prefix import FrozenPrefix, cache_frozen_layers
from .methods import method_steps

TRIM_EVERY = 16  # optimizer steps between returns of freed heap memory to the OS (CPU)


def log(msg: str) -> None:
    if distributed.current().main:  # one copy of every message in a multi-process run
        print(msg, flush=True)


@dataclass
class Setup:
    cfg: Config
    data: Data
    budget: budget_mod.Budget
    tokenizer: object
    model: torch.nn.Module
    device: torch.device
    dtype: torch.dtype
    train_enc: Encoded
    val_enc: Encoded
    test_enc: Encoded | None
    frozen_prefix: FrozenPrefix | None = None  # the kept outputs of the frozen lower layers (cache_frozen_layers)
    dist: distributed.Dist = field(default_factory=distributed.Dist)  # this process's place in a multi-process run
    blend: blend_mod.Blend | None = None  # the adapter's blend with a TF-IDF model, when eval.blend kept one


def check_budget(cfg: Config, num_labels: int) -> budget_mod.Budget:
    b = budget_mod.compute(cfg, num_labels)
    log(b.table())
    budget_mod.check(b)
    return b


class SharedInputs:
    """The data and its tokenised splits, kept for the runs of one process that read the same rows (the trials of
    `lorafit fit`): otherwise each run reads and tokenises them again, a fixed cost that short runs feel."""

    def __init__(self):
        self._kept: dict[str, object] = {}

    def get(self, key: list, make):
        k = json.dumps(key, sort_keys=True, default=str)
        if k not in self._kept:
            self._kept[k] = make()
        return self._kept[k]


_shared: SharedInputs | None = None


@contextlib.contextmanager
def sharing_inputs():
    """Within this block, runs with the same data settings share one loaded copy of the data and its tokens."""
    global _shared
    before, _shared = _shared, SharedInputs()
    try:
        yield
    finally:
        _shared = before


def _inputs(key: list, make):
    return _shared.get(key, make) if _shared is not None else make()


def setup(cfg: Config) -> Setup:
    d = distributed.current()
    set_threads(cfg.speed.num_threads or (d.cpu_threads() if d.active else None))
    device = pick_device()
    dtype = resolve_precision(cfg.train.precision, device)
    known = known_num_labels(cfg)
    b = check_budget(cfg, known) if known else None  # over budget: stop before reading any data
    data_key = [cfg.data.model_dump(), cfg.train.seed]
    data = _inputs(["data", *data_key], lambda: load_data(cfg.data, cfg.train.seed))
    for note in data.train.notes:
        log(f"note: {note}")
    if b is None:
        b = check_budget(cfg, len(data.label_names))
    tokenizer = _inputs(["tokenizer", cfg.model.name], lambda: load_tokenizer(cfg.model.name))

    def encode_split(name: str):
        split = getattr(data, name)
        make = lambda: encode(tokenizer, split.texts, split.labels, cfg.model.max_length)  # noqa: E731
        return _inputs(["encoded", name, cfg.model.name, cfg.model.max_length, *data_key], make)

    train_enc, val_enc = encode_split("train"), encode_split("val")
    test_enc = encode_split("test") if data.test else None

    torch.manual_seed(cfg.train.seed)
    model = wrap(build_model(cfg, len(data.label_names), data.label_names), cfg)
    counted = budget_mod.count_trainable(model)
    if counted != b.total:
        raise RuntimeError(f"budget mismatch: computed {b.total} but the wrapped model trains {counted} parameters")
    model.to(device)
    if cfg.method == "lora" and cfg.lora.init == "eva":
        eva_init(model, cfg, train_enc, tokenizer.pad_token_id, device)
    store_frozen_in(model, dtype)
    fast = patches.apply(model, cfg.speed)
    prefix, said = (
        cache_frozen_layers(model, train_enc.lengths, device, dtype) if cfg.train.cache_frozen_layers else (None, None)
    )
    if said and prefix is None:
        log(said)
    elif said:
        fast.append(said)
    log(
        f"data: {len(train_enc)} train / {len(val_enc)} val"
        + (f" / {len(test_enc)} test" if test_enc else "")
        + f" rows, {len(data.label_names)} classes; device {device.type}, compute {str(dtype).replace('torch.', '')}, "
        f"{torch.get_num_threads()} threads; {counted:,} trainable parameters"
        + (f"; {', '.join(fast)}" if fast else "")
    )
    return Setup(cfg, data, b, tokenizer, model, device, dtype, train_enc, val_enc, test_enc, prefix)


def eva_init(model: torch.nn.Module, cfg: Config, train_enc: Encoded, pad_id: int, device: torch.device) -> None:
    """EVA: peft sets each LoRA A from the SVD of its layer's inputs, over the first lora.eva_batches batches of the
    first epoch's order (in fp32, without dropout); the RNG is left as it was, so training draws what it would."""
    from peft import initialize_lora_eva_weights

    started = time.perf_counter()
    order = train_batches(train_enc.lengths, cfg.train.batch_size, cfg.train.seed, 0, cfg.speed.group_by_length)
    batches = [
        collate(train_enc, index, pad_id, device, cfg.speed.pad_to_multiple_of)
        for index in order[: cfg.lora.eva_batches]
    ]
    rng = torch.get_rng_state()
    model.eval()
    with torch.no_grad():
        initialize_lora_eva_weights(model, batches, show_progress_bar=False)
    model.train()
    torch.set_rng_state(rng)
    log(f"EVA initialisation: {len(batches)} training batches in {time.perf_counter() - started:.1f}s")


def evaluate(s: Setup, enc: Encoded, progress: str | None = None) -> dict:
    def predict(rows: Encoded) -> np.ndarray:
        return predict_logits(
            s.model,
            rows,
            s.cfg.eval.batch_size,
            s.tokenizer.pad_token_id,
            s.device,
            s.dtype,
            progress if s.dist.main else None,
            concurrent_passes(s.device),
        )

    started = time.perf_counter()
    # several processes: each scores a share
    logits = s.dist.gather_rows(enc, predict) if s.dist.active else predict(enc)
    seconds = time.perf_counter() - started
    return classification_metrics(logits, enc.labels, s.data.label_names) | {"_logits": logits, "seconds": seconds}


def _figures(evaluation: dict) -> dict:
    """An evaluation's figures as metrics.json keeps them: without its logits and its timing."""
    return {k: v for k, v in evaluation.items() if k not in ("_logits", "seconds")}


def _improved(metric: str, value: float, best: float | None, threshold: float = 0.0) -> bool:
    if best is None:
        return True
    return value < best - threshold if metric == "val_loss" else value > best + threshold


def evaluations_without_gain(history: list[dict], metric: str, threshold: float) -> int:
    """How many evaluations have passed since the last one that beat the best before it by more than `threshold`.

    This drives early stopping only. The best weights are those of the best evaluation, by any margin, as
    Trainer's metric_for_best_model keeps them: a threshold that also picked the weights would restore an
    earlier checkpoint over a later one that is better, only by less than the threshold.
    """
    best, since = None, 0
    for row in history:
        value = row[metric]
        since = 0 if _improved(metric, value, best, threshold) else since + 1
        if _improved(metric, value, best):
            best = value
    return since


def _numerical_fault(
    s: Setup, what: str, value: float, step: int, epoch: int, checkpoints: Checkpoints | None
) -> LorafitError:
    """One line: where it happened, the usual fixes, and the last good checkpoint, which is kept.

    A train loss or gradient of step k comes from the weights after step k-1: a checkpoint of step k-1 holds
    the weights that failed, so it is dropped, and resuming starts from the one before.
    """
    t = s.cfg.train
    fixes = f"lower train.lr (now {t.lr:g})" + (
        f" or use train.precision=fp32 (now {str(s.dtype).replace('torch.', '')})" if s.dtype != torch.float32 else ""
    )
    kept = ""
    if checkpoints is not None:
        if what != "validation loss":
            checkpoints.discard(step - 1)
        last = checkpoints.latest_step()
        if last is None:
            kept = "; no good checkpoint had been written yet"
        else:
            kept = f"; the last good checkpoint (step {last}) is kept: continue from it with `lorafit train --resume {checkpoints.folder.parent} --set train.lr=...`"
    return LorafitError(f"the {what} became {value} at step {step} (epoch {epoch + 1}); {fixes}{kept}")


def _batch_loss(s: Setup, index) -> torch.Tensor:
    batch = collate(s.train_enc, index, s.tokenizer.pad_token_id, s.device, s.cfg.speed.pad_to_multiple_of)
    labels = torch.from_numpy(s.train_enc.labels[index]).to(s.device)
    cached = s.frozen_prefix.batch(index) if s.frozen_prefix is not None else contextlib.nullcontext()
    with autocast(s.device, s.dtype), cached:
        logits = s.model(**batch).logits
    return F.cross_entropy(logits.float(), labels, label_smoothing=s.cfg.train.label_smoothing)


class Loop:
    """The training loop of one run: optimizer steps, evaluations with early stopping, checkpoints.

    `on_eval(row)`, when given, receives every history row as it is written (sweeps use it to prune trials);
    an exception it raises ends training and propagates. With `checkpoints`, a checkpoint is written at the end
    of every epoch, every `checkpoint.every` steps and when training ends; `resume`, a loaded checkpoint,
    continues exactly where it was written: same weights, optimizer moments, schedule, RNG streams (LoRA dropout)
    and position in the epoch's batch order.
    """

    def __init__(self, s: Setup, history_path: Path | None, on_eval, checkpoints: Checkpoints | None):
        self.s, self.history_path, self.on_eval, self.checkpoints = s, history_path, on_eval, checkpoints
        t, d = s.cfg.train, s.dist
        # the rows of one forward pass over all processes; each process takes its share
        self.global_batch = t.batch_size * d.world
        self.steps_per_epoch = math.ceil(math.ceil(len(s.train_enc) / self.global_batch) / t.grad_accum)
        self.total = t.max_steps or max(1, math.ceil(self.steps_per_epoch * t.epochs))
        every = s.cfg.eval.every
        self.eval_every = self.steps_per_epoch if every == "epoch" else every
        ratio = s.cfg.lora.loraplus_lr_ratio if s.cfg.method == "lora" else None  # LoRA+ is LoRA's
        optimizer = make_optimizer(s.model, t.lr, t.weight_decay, ratio)
        schedule = Schedule(optimizer, t.scheduler, self.total, math.ceil(t.warmup_ratio * self.total), t.max_seconds)
        trainable = {name: p for name, p in s.model.named_parameters() if p.requires_grad}
        self.method = method_steps(s.model, s.cfg, self.total)  # AdaLoRA's rank allocation
        self.state = TrainingState(optimizer, schedule, trainable, method=self.method)
        self.start = time.perf_counter()
        self.say = log
        # The validation scores of the best weights (with the seconds they took), while nothing has changed those
        # weights since: the final metrics then reuse them instead of scoring the same weights again. Not in
        # checkpoints: a resumed run that restores earlier best weights scores them again.
        self.best_val: dict | None = None

    @property
    def elapsed(self) -> float:
        """Training seconds of this run, including those before a resume."""
        return self.state.progress.elapsed + time.perf_counter() - self.start

    def sanity_check(self) -> None:
        """A broken setup should fail in seconds, not after an epoch: one forward pass on a batch of validation rows."""
        s = self.s
        quick = Encoded(s.val_enc.ids[: s.cfg.eval.batch_size], s.val_enc.labels[: s.cfg.eval.batch_size])
        loss0 = evaluate(s, quick)["loss"]
        if not math.isfinite(loss0):
            raise LorafitError(
                f"the untrained model gives a non-finite validation loss ({loss0}); try train.precision=fp32"
            )

    def resume_from(self, saved: dict) -> None:
        s, st, d = self.s, self.state, self.s.dist
        processes = saved.get("processes", 1)
        if processes != d.world:
            run_folder = Path(saved["path"]).parent.parent
            how = (
                f"`{d.resume_command(run_folder, processes)}`"
                if processes > 1
                else f"one process: `lorafit train --resume {run_folder}` without a launcher"
            )
            raise LorafitError(
                f"{saved['path']} was written by {processes} process(es) and this is {d.world}: the effective batch size would change; "
                f"resume it with {how}"
            )
        old_lr = restore(st, saved, s.cfg.to_dict(), s.device)
        if old_lr is not None:
            log(
                f"note: train.lr changes from {old_lr:g} to {s.cfg.train.lr:g}: the schedule is scaled by {s.cfg.train.lr / old_lr:g} from here on"
            )
            st.schedule.rescale(s.cfg.train.lr / old_lr)
        p = st.progress
        where = (
            "training had finished"
            if p.done
            else f"epoch {p.epoch + 1}, batch {p.batch} of {math.ceil(len(s.train_enc) / self.global_batch)}"
        )
        log(
            f"resuming from {saved['path']}: step {p.step} of {self.total} ({where}), {len(st.result.history)} evaluations so far"
        )
        if self.history_path:  # rows evaluated after the checkpoint were lost with the process; they are computed again
            atomic_write_text(self.history_path, "".join(json.dumps(row) + "\n" for row in st.result.history))
        set_rng_state(saved["rng_ranks"][d.rank] if d.active else saved["rng"])

    def announce(self) -> None:
        t, d = self.s.cfg.train, self.s.dist
        if d.active:
            log(
                f"training {self.total} steps ({t.epochs:g} epochs of {self.steps_per_epoch} steps) on {d.world} processes: batch {t.batch_size} per process "
                f"x {d.world} processes x accum {t.grad_accum} = effective batch {self.global_batch * t.grad_accum}, lr {t.lr:g} "
                f"(not scaled with the number of processes); evaluating every {self.eval_every} steps"
            )
        else:
            log(
                f"training {self.total} steps ({t.epochs:g} epochs of {self.steps_per_epoch} steps, batch {t.batch_size} x accum {t.grad_accum}), "
                f"evaluating every {self.eval_every} steps"
            )

    def step(self, group: list[np.ndarray], epoch: int) -> None:
        """One optimizer step over a group of grad_accum batches (each split across the processes)."""
        s, st, d, t = self.s, self.state, self.s.dist, self.s.cfg.train
        p, params = st.progress, list(st.trainable.values())
        rows = sum(len(b) for b in group)
        for index in group:
            local = d.shard(index)  # one process: the whole batch
            loss = _batch_loss(s, local) if len(local) else None
            if loss is not None and (term := self.method.loss_term()) is not None:
                loss = loss + term
            value = d.global_mean(loss.item() if loss is not None else 0.0, len(local), len(index))
            if not math.isfinite(value):  # stop before the optimizer spreads it into the weights
                raise _numerical_fault(s, "training loss", value, p.step + 1, epoch, self.checkpoints)
            if loss is not None:  # weighted by its share of all rows: the summed gradients are the global batch's mean
                (loss * (len(local) / rows)).backward()
            p.run_loss += value * len(index)
            p.run_n += len(index)
        d.sum_grads(params)
        if t.max_grad_norm:
            norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
            if not torch.isfinite(norm):
                raise _numerical_fault(s, "gradient norm", norm.item(), p.step + 1, epoch, self.checkpoints)
        st.optimizer.step()
        self.method.after_step(p.step)  # reads the gradients
        st.optimizer.zero_grad(set_to_none=True)
        if s.device.type == "cpu" and (p.step + 1) % TRIM_EVERY == 0:
            release_free_memory()
        now = self.elapsed
        # a time-limited schedule follows rank 0's clock everywhere
        st.schedule.step(d.from_main(now) if t.max_seconds else now)
        p.step += 1
        p.seen += rows

    def evaluate(self, epoch: int, frac_epoch: float) -> None:
        """Score validation, record the history row, keep the best weights, decide on early stopping."""
        s, st = self.s, self.state
        p, res, es = st.progress, st.result, s.cfg.eval.early_stopping
        val = evaluate(s, s.val_enc, "eval")
        if not math.isfinite(val["loss"]):
            raise _numerical_fault(s, "validation loss", val["loss"], p.step, epoch, self.checkpoints)
        row = {
            "step": p.step,
            "epoch": round(frac_epoch, 4),
            "train_loss": p.run_loss / max(p.run_n, 1),
            "val_loss": val["loss"],
            "val_accuracy": val["accuracy"],
            "val_macro_f1": val["macro_f1"],
            "lr": st.schedule.lr,
            "samples_seen": p.seen,
            "elapsed_s": round(self.elapsed, 2),
        }
        res.history.append(row)
        if self.history_path:
            with open(self.history_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if self.on_eval is not None:
            self.on_eval(row)
        p.run_loss, p.run_n = 0.0, 0
        st.schedule.on_eval(val["loss"])
        self.say(
            f"step {p.step} epoch {frac_epoch:.2f}: train loss {row['train_loss']:.4f}, val loss {val['loss']:.4f}, val accuracy {val['accuracy']:.4f}"
        )
        if _improved(es.metric, row[es.metric], res.best_value):
            res.best_value, res.best_step = row[es.metric], p.step
            st.best = {k: v.detach().clone() for k, v in st.trainable.items()}
            self.best_val = val
        if es.patience and evaluations_without_gain(res.history, es.metric, es.threshold) >= es.patience:
            self.say(
                f"early stopping: {es.metric} has not improved by more than {es.threshold} for {es.patience} evaluations"
            )
            res.stopped_early = p.done = True
        res.epochs_run = frac_epoch

    def checkpoint(self, end_of_epoch: bool) -> None:
        """At the end of training, of an epoch, and every checkpoint.every steps; only rank 0 writes it."""
        s, st, d = self.s, self.state, self.s.dist
        p, every = st.progress, s.cfg.checkpoint.every
        due = self.checkpoints.due(p.step) if self.checkpoints is not None else bool(every) and p.step % every == 0
        if (self.checkpoints is None and not d.active) or not (p.done or end_of_epoch or due):
            return
        # every process takes part; only rank 0 holds `checkpoints`
        rngs = d.all_gather_object(rng_state()) if d.active else None
        if self.checkpoints is not None:
            now = replace(st, progress=replace(p, elapsed=self.elapsed))
            self.checkpoints.save(pack(now, s.cfg.to_dict(), d.world, rngs), p.step, st.result.best_step)

    def run(self) -> Result:
        from tqdm.auto import tqdm

        s, st, d, t = self.s, self.state, self.s.dist, self.s.cfg.train
        p = st.progress
        s.model.train()
        hidden = {"disable": True} if bars_are_hidden() else {}  # else the user's TQDM_DISABLE decides
        bar = tqdm(total=self.total, initial=p.step, desc="train", unit="step", dynamic_ncols=True, **hidden)
        self.say = bar.write if d.main else lambda msg: None
        self.start = time.perf_counter()
        try:
            while not p.done:
                epoch = p.epoch
                # the same on every process
                batches = train_batches(
                    s.train_enc.lengths, self.global_batch, t.seed, epoch, s.cfg.speed.group_by_length
                )
                for i in range(p.batch, len(batches), t.grad_accum):
                    group = batches[i : i + t.grad_accum]
                    self.step(group, epoch)
                    bar.update(1)
                    bar.set_postfix(
                        loss=f"{p.run_loss / max(p.run_n, 1):.4f}", lr=f"{st.schedule.lr:.2e}", refresh=False
                    )
                    end_of_epoch = i + t.grad_accum >= len(batches)
                    p.epoch, p.batch = (epoch + 1, 0) if end_of_epoch else (epoch, i + t.grad_accum)
                    p.done = p.step >= self.total or bool(t.max_seconds and d.any(self.elapsed >= t.max_seconds))
                    if p.step % self.eval_every == 0 or p.done:
                        self.evaluate(epoch, epoch + (i + len(group)) / len(batches))
                    self.checkpoint(end_of_epoch)
                    if p.done or end_of_epoch:
                        break
        finally:
            bar.close()  # an error message then starts on a line of its own
        st.result.steps = p.step
        st.result.train_seconds = self.elapsed
        self.restore_best()
        if self.method.finish():  # the weights changed after their last evaluation
            self.best_val = None
        st.result.adapter_ranks = self.method.ranks()
        return st.result

    def restore_best(self) -> None:
        st, es = self.state, self.s.cfg.eval.early_stopping
        res = st.result
        if st.best is not None and res.best_step != st.progress.step:
            log(f"restoring the best checkpoint (step {res.best_step}, {es.metric} {res.best_value:.4f})")
            with torch.no_grad():
                for k, v in st.best.items():
                    st.trainable[k].copy_(v)


def train(
    s: Setup,
    history_path: Path | None = None,
    on_eval=None,
    checkpoints: Checkpoints | None = None,
    resume: dict | None = None,
) -> tuple[Result, dict | None]:
    """Train the set-up model (see Loop); with `resume`, continue from that loaded checkpoint. Returns the result
    and, where this process evaluated the weights it ends with, that validation evaluation."""
    d = s.dist
    loop = Loop(s, history_path, on_eval, checkpoints)
    if d.active:
        d.broadcast_params(list(loop.state.trainable.values()))  # every process starts from rank 0's weights
        if not d.main:  # LoRA dropout: each process draws its own masks; rank 0 keeps the stream one process would have
            torch.manual_seed(s.cfg.train.seed * 1_000_003 + d.rank)
    loop.sanity_check()
    if resume is not None:
        loop.resume_from(resume)
    loop.announce()
    result = loop.run()
    return result, loop.best_val


def final_metrics(s: Setup, res: Result, val: dict | None = None) -> dict:
    """The run's figures, from the weights training ended with; `val`: their validation evaluation, if known."""
    if val is None:
        val = evaluate(s, s.val_enc, "eval val")
    out = {"val": _figures(val)}
    test = None
    if s.test_enc is not None:
        test = evaluate(s, s.test_enc, "eval test")
        out["test"] = _figures(test)
    out["training"] = {
        "steps": res.steps,
        "epochs": res.epochs_run,
        "best_step": res.best_step,
        "best_" + s.cfg.eval.early_stopping.metric: res.best_value,
        "stopped_early": res.stopped_early,
        "train_seconds": round(res.train_seconds, 2),
        "train_samples_per_s": round(
            res.steps * s.cfg.train.batch_size * s.dist.world * s.cfg.train.grad_accum / max(res.train_seconds, 1e-9), 2
        ),
        "val_eval_seconds": round(val["seconds"], 2),  # lets `lorafit fit` foresee what scoring more rows costs
        "trainable_parameters": s.budget.total,
        **({"adapter_ranks": res.adapter_ranks} if res.adapter_ranks else {}),
        "precision": str(s.dtype).replace("torch.", ""),
        "device": s.device.type,
    }
    if s.dist.active:
        out["training"]["processes"] = s.dist.world
    # the other processes would only repeat these; the blend starts from the baseline where it fits the budget
    tfidf = baseline.fit(s.data) if s.dist.main and (s.cfg.eval.baseline or s.cfg.eval.blend) else None
    if s.cfg.eval.baseline and s.dist.main:
        out["baseline"] = baseline.fit_and_score(s.data, tfidf)
    if s.cfg.eval.blend and s.dist.main:
        d = s.data
        s.blend, out["blend"] = blend_mod.make(
            d.train.texts,
            d.train.labels,
            (d.val.texts, d.val.labels, val["_logits"]),
            (d.test.texts, d.test.labels, test["_logits"]) if test is not None else None,
            d.label_names,
            s.budget.margin,
            tfidf,
        )
    res.metrics = out
    return out


def save(s: Setup, res: Result, folder: Path) -> None:
    """Everything a run needs to be reloaded, evaluated and compared.

    The adapter is saved as trained. For PiSSA/OLoRA, which move part of the base weights into the adapter,
    reloading re-runs the same deterministic initialisation on the base before loading these weights.

    So that the folder travels, the adapter names its base by hub id (`builtin:minilm` as
    sentence-transformers/all-MiniLM-L6-v2, not this machine's path of the installed package), and peft's empty
    model card is replaced by one written from the run's files (model_card.py).
    """
    save_config(s.cfg, folder / runs.CONFIG)
    (folder / runs.LABELS).write_text(json.dumps(s.data.label_names, indent=1))
    (folder / runs.BUDGET).write_text(json.dumps(s.budget.to_dict(), indent=1))
    (folder / runs.METRICS).write_text(json.dumps(res.metrics, indent=1))
    s.model.save_pretrained(folder / runs.ADAPTER)
    if s.blend is not None:
        blend_mod.save(s.blend, folder)
    model_card.name_base_by_hub_id(folder, s.cfg.model.name)
    model_card.write_model_card(folder)
    s.tokenizer.save_pretrained(folder / runs.TOKENIZER)


def summary_line(res: Result, folder: Path) -> str:
    m = res.metrics
    parts = [f"val accuracy {m['val']['accuracy']:.4f}", f"val loss {m['val']['loss']:.4f}"]
    if "test" in m:
        parts.append(f"test accuracy {m['test']['accuracy']:.4f}")
    tr = m["training"]
    parts += [
        f"{tr['trainable_parameters']:,} trainable",
        f"{tr['steps']} steps in {tr['train_seconds']:.0f}s ({tr['train_samples_per_s']:.0f} samples/s)",
    ]
    return f"done: {', '.join(parts)} -> {folder}"


def run(cfg: Config, out: Path, on_eval=None, resume: bool = False) -> Result:
    """Train cfg into the run folder `out`; with resume=True continue the interrupted run in `out`.

    The folder is locked and marked INCOMPLETE while it trains (runs.training_folder); checkpoints land in
    out/checkpoints/, so a crash or kill costs at most the steps since the last one, and the folder is marked
    complete only once every file is written.

    Under a launcher (torchrun, accelerate launch) every process runs this: the processes join a group once
    setup has passed, train together, and only rank 0 touches the run folder (see distributed.py).
    """
    d = distributed.current()
    try:
        s = setup(cfg)  # every config, budget and data error surfaces here, before anything is written
    except LorafitError as e:
        d.fail_together(e)  # several processes: all of them stop with this error; one process: raises it
    s.dist = d.start(s.device, out)
    d.agree(None)  # the other processes passed their checks too
    every, keep = cfg.checkpoint.every, cfg.checkpoint.keep
    with d.guard(out, resume), contextlib.ExitStack() as stack:

        def enter_folder():  # rank 0 only; its errors (a lock held by someone else) end every process
            work = stack.enter_context(runs.training_folder(out, resume))
            state = Checkpoints(work, every, keep).load_latest() if resume else None
            if resume and state is None:
                log(f"note: {out} has no checkpoint yet: training it from the start")
            if state is None:
                (work / runs.HISTORY).unlink(missing_ok=True)
            save_config(cfg, work / runs.CONFIG)
            return work, state

        work, state = d.on_main(enter_folder)  # the checkpoint reaches every process from rank 0
        work = work if d.main else None
        checkpoints = Checkpoints(work, every, keep) if work else None
        res, val = train(s, work / runs.HISTORY if work else None, on_eval, checkpoints, state)
        final_metrics(s, res, val)

        def write_run():
            save(s, res, work)
            write_run_report(work)  # report.html and its PNGs; a plotting failure warns instead of losing the run

        d.on_main(write_run)
    d.stop()
    log(summary_line(res, out))
    if line := baseline.verdict(res.metrics):
        log(line)
    if line := blend_mod.summary(res.metrics):
        log(line)
    log(f"accuracy: {res.metrics['val']['accuracy']:.4f}")
    return res
