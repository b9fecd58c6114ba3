"""The training recipe: setup -> sanity check -> train (evaluate, early-stop, checkpoint) -> restore best -> final metrics -> save.

A plain PyTorch loop over a PEFT-wrapped model. It is shorter than configuring Trainer for the same
behaviour and lets the fast path (length grouping, dynamic padding, bf16-stored frozen base) be the default.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import budget as budget_mod
from . import distributed, fastpath
from .atomic import atomic_write_text
from .checkpoint import RESUME_OVERRIDES, Checkpoints, rng_state, set_rng_state
from .config import Config, save_config
from .data import Data, load_data
from .engine import (
    Encoded,
    autocast,
    collate,
    encode,
    pick_device,
    predict_logits,
    release_free_memory,
    resolve_precision,
    set_threads,
    store_frozen_in,
    train_batches,
)
from .errors import LorafitError
from .metrics import classification_metrics
from .models import build_model, load_tokenizer, wrap

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
    dist: distributed.Dist = field(default_factory=distributed.Dist)  # this process's place in a multi-process run


@dataclass
class Result:
    history: list[dict] = field(default_factory=list)
    best_step: int = 0
    best_value: float | None = None
    steps: int = 0
    epochs_run: float = 0.0
    stopped_early: bool = False
    train_seconds: float = 0.0
    metrics: dict = field(default_factory=dict)


def num_labels_for(cfg: Config) -> int | None:
    from .data import AG_NEWS_LABELS

    if cfg.data.label_names:
        return len(cfg.data.label_names)
    if cfg.data.source.startswith("builtin:ag_news"):
        return len(AG_NEWS_LABELS)
    return None


def check_budget(cfg: Config, num_labels: int) -> budget_mod.Budget:
    b = budget_mod.compute(cfg, num_labels)
    log(b.table())
    budget_mod.check(b)
    return b


def setup(cfg: Config) -> Setup:
    d = distributed.current()
    set_threads(cfg.train.num_threads or (d.cpu_threads() if d.active else None))
    device = pick_device()
    dtype = resolve_precision(cfg.train.precision, device)
    known = num_labels_for(cfg)
    b = check_budget(cfg, known) if known else None  # over budget: stop before reading any data
    data = load_data(cfg.data, cfg.train.seed)
    for note in data.train.notes:
        log(f"note: {note}")
    if b is None:
        b = check_budget(cfg, len(data.label_names))
    tokenizer = load_tokenizer(cfg.model.name)
    encode_split = lambda s: encode(tokenizer, s.texts, s.labels, cfg.model.max_length)  # noqa: E731
    train_enc, val_enc = encode_split(data.train), encode_split(data.val)
    test_enc = encode_split(data.test) if data.test else None

    torch.manual_seed(cfg.train.seed)
    model = wrap(build_model(cfg, len(data.label_names), data.label_names), cfg)
    counted = budget_mod.count_trainable(model)
    if counted != b.total:
        raise RuntimeError(f"budget mismatch: computed {b.total} but the wrapped model trains {counted} parameters")
    model.to(device)
    store_frozen_in(model, dtype)
    fast = fastpath.apply(model, cfg.train)
    log(
        f"data: {len(train_enc)} train / {len(val_enc)} val" + (f" / {len(test_enc)} test" if test_enc else "")
        + f" rows, {len(data.label_names)} classes; device {device.type}, compute {str(dtype).replace('torch.', '')}, "
        f"{torch.get_num_threads()} threads; {counted:,} trainable parameters" + (f"; {', '.join(fast)}" if fast else "")
    )
    return Setup(cfg, data, b, tokenizer, model, device, dtype, train_enc, val_enc, test_enc)


class Schedule:
    """Linear warm-up, then cosine / linear / constant decay per step, or reduce-on-plateau per evaluation.

    With a time limit (`max_seconds`) the schedule runs on whichever is further along, steps or time, so it
    ends when training does even when the deadline comes before the planned steps.
    """

    def __init__(self, optimizer, kind: str, total_steps: int, warmup_steps: int, max_seconds: float | None = None):
        from transformers import get_scheduler

        self.optimizer, self.kind, self.warmup = optimizer, kind, warmup_steps
        self.total, self.max_seconds = total_steps, max_seconds
        self.base = [g["lr"] for g in optimizer.param_groups]
        if kind == "reduce_on_plateau":
            self.step_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (warmup_steps + 1)) if warmup_steps else 1.0)
            self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.5, patience=1)
        else:
            name = {"constant": "constant_with_warmup"}.get(kind, kind)
            self.step_sched = get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
            self.plateau = None
        self.steps = 0

    def step(self, elapsed: float = 0.0) -> None:
        """One optimizer step done, `elapsed` training seconds so far."""
        self.steps += 1
        if self.plateau is None or self.steps <= self.warmup:
            at = self.steps
            if self.max_seconds:
                at = max(at, math.floor(self.total * min(1.0, elapsed / self.max_seconds)))
            self.step_sched.last_epoch = at - 1  # the LambdaLR's step counter: step() moves it to `at`
            self.step_sched.step()

    def on_eval(self, val_loss: float) -> None:
        if self.plateau is not None and self.steps > self.warmup:
            self.plateau.step(val_loss)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {"steps": self.steps, "step_sched": self.step_sched.state_dict(), "plateau": self.plateau.state_dict() if self.plateau else None}

    def load_state_dict(self, state: dict) -> None:
        """Restore after optimizer.load_state_dict (the current lr lives in the optimizer's param groups)."""
        self.steps = state["steps"]
        self.step_sched.load_state_dict(state["step_sched"])
        if self.plateau is not None:
            self.plateau.load_state_dict(state["plateau"])

    def rescale(self, factor: float) -> None:
        """Scale the whole schedule from here on: a resumed run given a lower train.lr."""
        for g in self.optimizer.param_groups:
            g["lr"] *= factor
            if "initial_lr" in g:
                g["initial_lr"] *= factor
        self.step_sched.base_lrs = [b * factor for b in self.step_sched.base_lrs]
        self.base = [b * factor for b in self.base]


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float):
    """AdamW; like Trainer, no decay on biases and norm weights."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused AdamW: one kernel for all parameters instead of a dozen small ops per tensor
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, fused=True)


def evaluate(s: Setup, enc: Encoded, progress: str | None = None) -> dict:
    def predict(rows: Encoded) -> np.ndarray:
        return predict_logits(s.model, rows, s.cfg.train.eval_batch_size, s.tokenizer.pad_token_id, s.device, s.dtype, progress if s.dist.main else None)

    logits = s.dist.gather_rows(enc, predict) if s.dist.active else predict(enc)  # several processes: each scores a share
    return classification_metrics(logits, enc.labels, s.data.label_names) | {"_logits": logits}


def _improved(metric: str, value: float, best: float | None, threshold: float) -> bool:
    if best is None:
        return True
    return value < best - threshold if metric == "val_loss" else value > best + threshold


@dataclass
class Progress:
    """Where the loop stands: what a checkpoint holds besides weights, optimizer, schedule, RNG and results."""

    step: int = 0
    epoch: int = 0
    batch: int = 0  # index of the next batch in the epoch's order (a pure function of seed and epoch)
    done: bool = False
    run_loss: float = 0.0  # train loss summed since the last evaluation
    run_n: int = 0
    seen: int = 0
    elapsed: float = 0.0  # training seconds spent before this process took over


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) and k not in ("rank_pattern", "alpha_pattern") else {prefix + k: v})
    return out


def _checkpoint(s: Setup, p: Progress, res: Result, optimizer, sched: Schedule, trainable: dict, best_state: dict | None, rngs: list | None = None) -> dict:
    extra = {"processes": s.dist.world, "rng_ranks": rngs} if s.dist.active else {}  # every process's RNG (LoRA dropout)
    return extra | {
        "config": s.cfg.to_dict(),
        "progress": asdict(p),
        "result": asdict(res),
        "trainable": {k: v.detach().cpu().clone() for k, v in trainable.items()},
        "best": {k: v.cpu() for k, v in best_state.items()} if best_state is not None else None,
        "optimizer": optimizer.state_dict(),
        "schedule": sched.state_dict(),
        "rng": rng_state(),
    }


def _restore(s: Setup, state: dict, optimizer, sched: Schedule, trainable: dict) -> tuple[Progress, Result, dict | None]:
    """Load a checkpoint into the freshly set-up model, optimizer and schedule (the RNG is restored by the caller, last)."""
    processes = state.get("processes", 1)
    if processes != s.dist.world:
        run_folder = Path(state["path"]).parent.parent
        how = f"`{s.dist.resume_command(run_folder, processes)}`" if processes > 1 else f"one process: `lorafit train --resume {run_folder}` without a launcher"
        raise LorafitError(f"{state['path']} was written by {processes} process(es) and this is {s.dist.world}: the effective batch size would change; "
                           f"resume it with {how}")
    saved, now = _flat(state["config"]), _flat(s.cfg.to_dict())
    changed = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k) and k not in RESUME_OVERRIDES]
    if changed:
        raise LorafitError(f"{state['path']} was written with a different config ({', '.join(changed[:5])} differ); resume with the run's own config.yaml or start a new run")
    if set(state["trainable"]) != set(trainable):
        raise LorafitError(f"{state['path']} does not hold this model's trainable parameters; resume with the run's own config.yaml or start a new run")
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(state["trainable"][name])
    optimizer.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["schedule"])
    old_lr = state["config"]["train"]["lr"]
    if s.cfg.train.lr != old_lr:
        log(f"note: train.lr changes from {old_lr:g} to {s.cfg.train.lr:g}: the schedule is scaled by {s.cfg.train.lr / old_lr:g} from here on")
        sched.rescale(s.cfg.train.lr / old_lr)
    best = {k: v.to(s.device) for k, v in state["best"].items()} if state["best"] is not None else None
    return Progress(**state["progress"]), Result(**state["result"]), best


def _numerical_fault(s: Setup, what: str, value: float, step: int, epoch: int, checkpoints: Checkpoints | None) -> LorafitError:
    """One line: where it happened, the usual fixes, and the last good checkpoint, which is kept.

    A train loss or gradient of step k comes from the weights after step k-1: a checkpoint of step k-1 holds
    the weights that failed, so it is dropped, and resuming starts from the one before.
    """
    t = s.cfg.train
    fixes = f"lower train.lr (now {t.lr:g})" + (f" or use train.precision=fp32 (now {str(s.dtype).replace('torch.', '')})" if s.dtype != torch.float32 else "")
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
    batch = collate(s.train_enc, index, s.tokenizer.pad_token_id, s.device, s.cfg.train.pad_to_multiple_of)
    labels = torch.from_numpy(s.train_enc.labels[index]).to(s.device)
    with autocast(s.device, s.dtype):
        logits = s.model(**batch).logits
    return F.cross_entropy(logits.float(), labels, label_smoothing=s.cfg.train.label_smoothing)


def train(s: Setup, history_path: Path | None = None, on_eval=None, checkpoints: Checkpoints | None = None, resume: dict | None = None) -> Result:
    """The training loop. `on_eval(row)`, when given, receives every history row as it is written (sweeps
    use it to prune trials); an exception it raises ends training and propagates.

    With `checkpoints`, a checkpoint is written at the end of every epoch, every `train.checkpoint_every` steps
    and when training ends. `resume`, a loaded checkpoint, continues exactly where it was written: same weights,
    optimizer moments, schedule, RNG streams (LoRA dropout) and position in the epoch's batch order.
    """
    from tqdm.auto import tqdm

    t, d = s.cfg.train, s.dist
    n = len(s.train_enc)
    gb = t.batch_size * d.world  # the rows of one forward pass over all processes; each process takes its share
    steps_per_epoch = math.ceil(math.ceil(n / gb) / t.grad_accum)
    total = t.max_steps or max(1, math.ceil(steps_per_epoch * t.epochs))
    eval_every = steps_per_epoch if t.eval_every == "epoch" else t.eval_every
    optimizer = make_optimizer(s.model, t.lr, t.weight_decay)
    sched = Schedule(optimizer, t.scheduler, total, math.ceil(t.warmup_ratio * total), t.max_seconds)
    es = t.early_stopping
    trainable = {name: p for name, p in s.model.named_parameters() if p.requires_grad}
    res, p, best_state = Result(), Progress(), None
    if d.active:
        d.broadcast_params(list(trainable.values()))  # every process starts from rank 0's weights
        if not d.main:  # LoRA dropout: each process draws its own masks; rank 0 keeps the stream one process would have
            torch.manual_seed(t.seed * 1_000_003 + d.rank)

    # A broken setup should fail in seconds, not after an epoch: one forward/backward-free pass on validation rows.
    quick = Encoded(s.val_enc.ids[: t.eval_batch_size], s.val_enc.labels[: t.eval_batch_size])
    loss0 = evaluate(s, quick)["loss"]
    if not math.isfinite(loss0):
        raise LorafitError(f"the untrained model gives a non-finite validation loss ({loss0}); try train.precision=fp32")

    if resume is not None:
        p, res, best_state = _restore(s, resume, optimizer, sched, trainable)
        where = "training had finished" if p.done else f"epoch {p.epoch + 1}, batch {p.batch} of {math.ceil(n / gb)}"
        log(f"resuming from {resume['path']}: step {p.step} of {total} ({where}), {len(res.history)} evaluations so far")
        if history_path:  # rows evaluated after the checkpoint were lost with the process; they are computed again
            atomic_write_text(history_path, "".join(json.dumps(row) + "\n" for row in res.history))
        set_rng_state(resume["rng_ranks"][d.rank] if d.active else resume["rng"])

    lengths = s.train_enc.lengths
    if d.active:
        log(f"training {total} steps ({t.epochs:g} epochs of {steps_per_epoch} steps) on {d.world} processes: batch {t.batch_size} per process x {d.world} processes "
            f"x accum {t.grad_accum} = effective batch {gb * t.grad_accum}, lr {t.lr:g} (not scaled with the number of processes); evaluating every {eval_every} steps")
    else:
        log(f"training {total} steps ({t.epochs:g} epochs of {steps_per_epoch} steps, batch {t.batch_size} x accum {t.grad_accum}), evaluating every {eval_every} steps")
    s.model.train()
    bar = tqdm(total=total, initial=p.step, desc="train", unit="step", dynamic_ncols=True)
    say = bar.write if d.main else lambda msg: None
    start = time.perf_counter()
    try:
        while not p.done:
            epoch = p.epoch
            batches = train_batches(lengths, gb, t.seed, epoch, t.group_by_length)  # the same on every process
            for i in range(p.batch, len(batches), t.grad_accum):
                group = batches[i : i + t.grad_accum]
                rows = sum(len(b) for b in group)
                for index in group:
                    local = d.shard(index)  # one process: the whole batch
                    loss = _batch_loss(s, local) if len(local) else None
                    value = d.global_mean(loss.item() if loss is not None else 0.0, len(local), len(index))
                    if not math.isfinite(value):  # stop before the optimizer spreads it into the weights
                        raise _numerical_fault(s, "training loss", value, p.step + 1, epoch, checkpoints)
                    if loss is not None:  # weighted by its share of all rows: the summed gradients are the mean over the global batch
                        (loss * (len(local) / rows)).backward()
                    p.run_loss += value * len(index)
                    p.run_n += len(index)
                d.sum_grads(list(trainable.values()))
                if t.max_grad_norm:
                    norm = torch.nn.utils.clip_grad_norm_(list(trainable.values()), t.max_grad_norm)
                    if not torch.isfinite(norm):
                        raise _numerical_fault(s, "gradient norm", norm.item(), p.step + 1, epoch, checkpoints)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if s.device.type == "cpu" and (p.step + 1) % TRIM_EVERY == 0:
                    release_free_memory()
                now = p.elapsed + time.perf_counter() - start
                sched.step(d.from_main(now) if t.max_seconds else now)  # a time-limited schedule follows rank 0's clock everywhere
                p.step += 1
                p.seen += rows
                bar.update(1)
                bar.set_postfix(loss=f"{p.run_loss / max(p.run_n, 1):.4f}", lr=f"{sched.lr:.2e}", refresh=False)
                last_in_epoch = i + t.grad_accum >= len(batches)
                frac_epoch = epoch + (i + len(group)) / len(batches)
                p.epoch, p.batch = (epoch + 1, 0) if last_in_epoch else (epoch, i + t.grad_accum)
                p.done = p.step >= total or bool(t.max_seconds and d.any(p.elapsed + time.perf_counter() - start >= t.max_seconds))
                if p.step % eval_every == 0 or p.done:
                    val = evaluate(s, s.val_enc, "eval")
                    if not math.isfinite(val["loss"]):
                        raise _numerical_fault(s, "validation loss", val["loss"], p.step, epoch, checkpoints)
                    row = {
                        "step": p.step,
                        "epoch": round(frac_epoch, 4),
                        "train_loss": p.run_loss / max(p.run_n, 1),
                        "val_loss": val["loss"],
                        "val_accuracy": val["accuracy"],
                        "val_macro_f1": val["macro_f1"],
                        "lr": sched.lr,
                        "samples_seen": p.seen,
                        "elapsed_s": round(p.elapsed + time.perf_counter() - start, 2),
                    }
                    res.history.append(row)
                    if history_path:
                        with open(history_path, "a") as f:
                            f.write(json.dumps(row) + "\n")
                    if on_eval is not None:
                        on_eval(row)
                    p.run_loss, p.run_n = 0.0, 0
                    sched.on_eval(val["loss"])
                    metric = row[es.metric]
                    say(f"step {p.step} epoch {frac_epoch:.2f}: train loss {row['train_loss']:.4f}, val loss {val['loss']:.4f}, val accuracy {val['accuracy']:.4f}")
                    if _improved(es.metric, metric, res.best_value, es.threshold if res.best_value is not None else 0.0):
                        res.best_value, res.best_step = metric, p.step
                        best_state = {k: v.detach().clone() for k, v in trainable.items()}
                    elif es.patience and sum(1 for h in res.history if h["step"] > res.best_step) >= es.patience:
                        say(f"early stopping: {es.metric} has not improved by more than {es.threshold} for {es.patience} evaluations")
                        res.stopped_early = p.done = True
                    res.epochs_run = frac_epoch
                due = checkpoints.due(p.step) if checkpoints is not None else bool(t.checkpoint_every) and p.step % t.checkpoint_every == 0
                if (checkpoints is not None or d.active) and (p.done or last_in_epoch or due):
                    rngs = d.all_gather_object(rng_state()) if d.active else None  # only rank 0 holds `checkpoints`
                    if checkpoints is not None:
                        elapsed = p.elapsed + time.perf_counter() - start
                        state = _checkpoint(s, replace(p, elapsed=elapsed), res, optimizer, sched, trainable, best_state, rngs)
                        checkpoints.save(state, p.step, res.best_step)
                if p.done or last_in_epoch:
                    break
    finally:
        bar.close()  # an error message then starts on a line of its own
    res.steps = p.step
    res.train_seconds = p.elapsed + time.perf_counter() - start
    if best_state is not None and res.best_step != p.step:
        log(f"restoring the best checkpoint (step {res.best_step}, {es.metric} {res.best_value:.4f})")
        with torch.no_grad():
            for k, v in best_state.items():
                trainable[k].copy_(v)
    return res


def final_metrics(s: Setup, res: Result) -> dict:
    val = evaluate(s, s.val_enc, "eval val")
    out = {"val": {k: v for k, v in val.items() if k != "_logits"}}
    if s.test_enc is not None:
        test = evaluate(s, s.test_enc, "eval test")
        out["test"] = {k: v for k, v in test.items() if k != "_logits"}
    out["training"] = {
        "steps": res.steps,
        "epochs": res.epochs_run,
        "best_step": res.best_step,
        "best_" + s.cfg.train.early_stopping.metric: res.best_value,
        "stopped_early": res.stopped_early,
        "train_seconds": round(res.train_seconds, 2),
        "train_samples_per_s": round(res.steps * s.cfg.train.batch_size * s.dist.world * s.cfg.train.grad_accum / max(res.train_seconds, 1e-9), 2),
        "trainable_parameters": s.budget.total,
        "precision": str(s.dtype).replace("torch.", ""),
        "device": s.device.type,
    }
    if s.dist.active:
        out["training"]["processes"] = s.dist.world
    res.metrics = out
    return out


def save(s: Setup, res: Result, folder: Path) -> None:
    """Everything a run needs to be reloaded, evaluated and compared.

    The adapter is saved as trained. For PiSSA/OLoRA, which move part of the base weights into the adapter,
    reloading re-runs the same deterministic initialisation on the base before loading these weights.
    """
    save_config(s.cfg, folder / "config.yaml")
    (folder / "labels.json").write_text(json.dumps(s.data.label_names, indent=1))
    (folder / "budget.json").write_text(json.dumps(s.budget.to_dict(), indent=1))
    (folder / "metrics.json").write_text(json.dumps(res.metrics, indent=1))
    s.model.save_pretrained(folder / "adapter")
    s.tokenizer.save_pretrained(folder / "tokenizer")


def summary_line(res: Result, folder: Path) -> str:
    m = res.metrics
    parts = [f"val accuracy {m['val']['accuracy']:.4f}", f"val loss {m['val']['loss']:.4f}"]
    if "test" in m:
        parts.append(f"test accuracy {m['test']['accuracy']:.4f}")
    tr = m["training"]
    parts += [f"{tr['trainable_parameters']:,} trainable", f"{tr['steps']} steps in {tr['train_seconds']:.0f}s ({tr['train_samples_per_s']:.0f} samples/s)"]
    return f"done: {', '.join(parts)} -> {folder}"


def run(cfg: Config, out: Path, on_eval=None, resume: bool = False) -> Result:
    """Train cfg into the run folder `out`; with resume=True continue the interrupted run in `out`.

    The folder is locked and marked INCOMPLETE while it trains (runs.training_folder); checkpoints land in
    out/checkpoints/, so a crash or kill costs at most the steps since the last one, and the folder is marked
    complete only once every file is written.

    Under a launcher (torchrun, accelerate launch) every process runs this: the processes join a group once
    setup has passed, train together, and only rank 0 touches the run folder (see distributed.py).
    """
    import contextlib

    from .runs import training_folder

    d = distributed.current()
    try:
        s = setup(cfg)  # every config, budget and data error surfaces here, before anything is written
    except LorafitError as e:
        d.fail_together(e)  # several processes: all of them stop with this error; one process: raises it
    s.dist = d.start(s.device, out)
    d.agree(None)  # the other processes passed their checks too
    with d.guard(out, resume), contextlib.ExitStack() as stack:

        def enter_folder():  # rank 0 only; its errors (a lock held by someone else) end every process
            work = stack.enter_context(training_folder(out, resume))
            state = Checkpoints(work, cfg.train.checkpoint_every, cfg.train.keep_checkpoints).load_latest() if resume else None
            if resume and state is None:
                log(f"note: {out} has no checkpoint yet: training it from the start")
            if state is None:
                (work / "history.jsonl").unlink(missing_ok=True)
            save_config(cfg, work / "config.yaml")
            return work, state

        work, state = d.on_main(enter_folder)  # the checkpoint reaches every process from rank 0
        work = work if d.main else None
        checkpoints = Checkpoints(work, cfg.train.checkpoint_every, cfg.train.keep_checkpoints) if work else None
        res = train(s, work / "history.jsonl" if work else None, on_eval, checkpoints, state)
        final_metrics(s, res)

        def write_run():
            save(s, res, work)
            from .report import write_run_report

            write_run_report(work)  # report.html and its PNGs; a plotting failure warns instead of losing the run

        d.on_main(write_run)
    d.stop()
    log(summary_line(res, out))
    log(f"accuracy: {res.metrics['val']['accuracy']:.4f}")
    return res
