"""The training recipe: setup -> sanity check -> train (evaluate, early-stop) -> restore best -> final metrics -> save.

A plain PyTorch loop over a PEFT-wrapped model. It is shorter than configuring Trainer for the same
behaviour and lets the fast path (length grouping, dynamic padding, bf16-stored frozen base) be the default.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import budget as budget_mod
from .config import Config, save_config
from .data import Data, load_data
from .engine import (
    Encoded,
    autocast,
    collate,
    encode,
    pick_device,
    predict_logits,
    resolve_precision,
    set_threads,
    store_frozen_in,
    train_batches,
)
from .errors import LorafitError
from .metrics import classification_metrics
from .models import build_model, load_tokenizer, wrap


def log(msg: str) -> None:
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
    set_threads(cfg.train.num_threads)
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
    log(
        f"data: {len(train_enc)} train / {len(val_enc)} val" + (f" / {len(test_enc)} test" if test_enc else "")
        + f" rows, {len(data.label_names)} classes; device {device.type}, compute {str(dtype).replace('torch.', '')}, "
        f"{torch.get_num_threads()} threads; {counted:,} trainable parameters"
    )
    return Setup(cfg, data, b, tokenizer, model, device, dtype, train_enc, val_enc, test_enc)


class Schedule:
    """Linear warm-up, then cosine / linear / constant decay per step, or reduce-on-plateau per evaluation."""

    def __init__(self, optimizer, kind: str, total_steps: int, warmup_steps: int):
        from transformers import get_scheduler

        self.optimizer, self.kind, self.warmup = optimizer, kind, warmup_steps
        self.base = [g["lr"] for g in optimizer.param_groups]
        if kind == "reduce_on_plateau":
            self.step_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (warmup_steps + 1)) if warmup_steps else 1.0)
            self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.5, patience=1)
        else:
            name = {"constant": "constant_with_warmup"}.get(kind, kind)
            self.step_sched = get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
            self.plateau = None
        self.steps = 0

    def step(self) -> None:
        self.steps += 1
        if self.plateau is None or self.steps <= self.warmup:
            self.step_sched.step()

    def on_eval(self, val_loss: float) -> None:
        if self.plateau is not None and self.steps > self.warmup:
            self.plateau.step(val_loss)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float):
    """AdamW; like Trainer, no decay on biases and norm weights."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, fused=False)


def evaluate(s: Setup, enc: Encoded, progress: str | None = None) -> dict:
    logits = predict_logits(s.model, enc, s.cfg.train.eval_batch_size, s.tokenizer.pad_token_id, s.device, s.dtype, progress)
    return classification_metrics(logits, enc.labels, s.data.label_names) | {"_logits": logits}


def _improved(metric: str, value: float, best: float | None, threshold: float) -> bool:
    if best is None:
        return True
    return value < best - threshold if metric == "val_loss" else value > best + threshold


def train(s: Setup, history_path: Path | None = None, on_eval=None) -> Result:
    """The training loop. `on_eval(row)`, when given, receives every history row as it is written (sweeps
    use it to prune trials); an exception it raises ends training and propagates."""
    from tqdm.auto import tqdm

    cfg, t = s.cfg, s.cfg.train
    n = len(s.train_enc)
    steps_per_epoch = math.ceil(math.ceil(n / t.batch_size) / t.grad_accum)
    total = t.max_steps or max(1, math.ceil(steps_per_epoch * t.epochs))
    eval_every = steps_per_epoch if t.eval_every == "epoch" else t.eval_every
    optimizer = make_optimizer(s.model, t.lr, t.weight_decay)
    sched = Schedule(optimizer, t.scheduler, total, math.ceil(t.warmup_ratio * total))
    es = t.early_stopping
    res = Result()
    trainable = [p for p in s.model.parameters() if p.requires_grad]
    best_state = None

    # A broken setup should fail in seconds, not after an epoch: one forward/backward-free pass on validation rows.
    quick = Encoded(s.val_enc.ids[: t.eval_batch_size], s.val_enc.labels[: t.eval_batch_size])
    loss0 = evaluate(s, quick)["loss"]
    if not math.isfinite(loss0):
        raise LorafitError(f"the untrained model gives a non-finite validation loss ({loss0}); try train.precision=fp32")

    lengths = s.train_enc.lengths
    log(f"training {total} steps ({t.epochs:g} epochs of {steps_per_epoch} steps, batch {t.batch_size} x accum {t.grad_accum}), evaluating every {eval_every} steps")
    s.model.train()
    bar = tqdm(total=total, desc="train", unit="step", dynamic_ncols=True)
    start = time.perf_counter()
    step, epoch, run_loss, run_n, seen = 0, 0, 0.0, 0, 0
    done = False
    while not done:
        batches = train_batches(lengths, t.batch_size, t.seed, epoch, t.group_by_length)
        for i in range(0, len(batches), t.grad_accum):
            group = batches[i : i + t.grad_accum]
            rows = sum(len(b) for b in group)
            for index in group:
                batch = collate(s.train_enc, index, s.tokenizer.pad_token_id, s.device)
                labels = torch.from_numpy(s.train_enc.labels[index]).to(s.device)
                with autocast(s.device, s.dtype):
                    logits = s.model(**batch).logits
                loss = F.cross_entropy(logits.float(), labels, label_smoothing=t.label_smoothing)
                (loss * (len(index) / rows)).backward()
                run_loss += loss.item() * len(index)
                run_n += len(index)
            if not math.isfinite(run_loss):
                raise LorafitError(f"the training loss became {run_loss} at step {step + 1}; lower train.lr or use train.precision=fp32")
            if t.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(trainable, t.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sched.step()
            step += 1
            seen += rows
            bar.update(1)
            bar.set_postfix(loss=f"{run_loss / max(run_n, 1):.4f}", lr=f"{sched.lr:.2e}", refresh=False)
            last_in_epoch = i + t.grad_accum >= len(batches)
            done = step >= total
            if step % eval_every == 0 or done:
                val = evaluate(s, s.val_enc, "eval")
                frac_epoch = epoch + (i + len(group)) / len(batches)
                row = {
                    "step": step,
                    "epoch": round(frac_epoch, 4),
                    "train_loss": run_loss / max(run_n, 1),
                    "val_loss": val["loss"],
                    "val_accuracy": val["accuracy"],
                    "val_macro_f1": val["macro_f1"],
                    "lr": sched.lr,
                    "samples_seen": seen,
                    "elapsed_s": round(time.perf_counter() - start, 2),
                }
                res.history.append(row)
                if history_path:
                    with open(history_path, "a") as f:
                        f.write(json.dumps(row) + "\n")
                if on_eval is not None:
                    on_eval(row)
                run_loss, run_n = 0.0, 0
                sched.on_eval(val["loss"])
                value = row[es.metric]
                bar.write(f"step {step} epoch {frac_epoch:.2f}: train loss {row['train_loss']:.4f}, val loss {val['loss']:.4f}, val accuracy {val['accuracy']:.4f}")
                if _improved(es.metric, value, res.best_value, es.threshold if res.best_value is not None else 0.0):
                    res.best_value, res.best_step = value, step
                    best_state = {n_: p.detach().clone() for n_, p in s.model.named_parameters() if p.requires_grad}
                elif es.patience and sum(1 for h in res.history if h["step"] > res.best_step) >= es.patience:
                    bar.write(f"early stopping: {es.metric} has not improved by more than {es.threshold} for {es.patience} evaluations")
                    res.stopped_early = done = True
                res.epochs_run = frac_epoch
            if done:
                break
            if last_in_epoch:
                break
        epoch += 1
    bar.close()
    res.steps = step
    res.train_seconds = time.perf_counter() - start
    if best_state is not None and res.best_step != step:
        log(f"restoring the best checkpoint (step {res.best_step}, {es.metric} {res.best_value:.4f})")
        params = dict(s.model.named_parameters())
        with torch.no_grad():
            for n_, v in best_state.items():
                params[n_].copy_(v)
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
        "train_samples_per_s": round(res.steps * s.cfg.train.batch_size * s.cfg.train.grad_accum / max(res.train_seconds, 1e-9), 2),
        "trainable_parameters": s.budget.total,
        "precision": str(s.dtype).replace("torch.", ""),
        "device": s.device.type,
    }
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


def run(cfg: Config, out: Path, on_eval=None) -> Result:
    """Train cfg into the run folder `out`, written under a temporary name and renamed when complete."""
    from .runs import partial_folder

    s = setup(cfg)  # every config, budget and data error surfaces here, before anything is written
    with partial_folder(out) as work:
        save_config(cfg, work / "config.yaml")
        res = train(s, work / "history.jsonl", on_eval)
        final_metrics(s, res)
        save(s, res, work)
        from .report import write_run_report

        write_run_report(work)  # report.html and its PNGs; a plotting failure warns instead of losing the run
    log(summary_line(res, out))
    log(f"accuracy: {res.metrics['val']['accuracy']:.4f}")
    return res
