"""The learning-rate schedule and the optimizer: training steps through them, the run report replays the schedule.

Its own module below both, so the report can draw the exact curve a run followed without importing training.
"""

from __future__ import annotations

import math

import torch


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
            self.step_sched = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda s: min(1.0, (s + 1) / (warmup_steps + 1)) if warmup_steps else 1.0
            )
            self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.5, patience=1)
        else:
            name = {"constant": "constant_with_warmup"}.get(kind, kind)
            self.step_sched = get_scheduler(
                name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps
            )
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
        return {
            "steps": self.steps,
            "step_sched": self.step_sched.state_dict(),
            "plateau": self.plateau.state_dict() if self.plateau else None,
        }

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


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, loraplus_lr_ratio: float | None = None):
    """AdamW; like Trainer, no decay on biases and norm weights. With a LoRA+ ratio, peft's grouping instead."""
    if loraplus_lr_ratio is not None:
        from peft.optimizers import create_loraplus_optimizer

        return create_loraplus_optimizer(
            model,
            torch.optim.AdamW,
            lr=lr,
            loraplus_lr_ratio=loraplus_lr_ratio,
            loraplus_weight_decay=weight_decay,
            fused=True,
        )
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused AdamW: one kernel for all parameters instead of a dozen small ops per tensor
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, fused=True)
