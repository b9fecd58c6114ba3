"""What a PEFT method needs from the training loop besides its forward pass.

Most need nothing. AdaLoRA allocates its ranks while it trains: peft leaves the calls to the loop (the schedule in
steps, the reallocation after every optimizer step, the orthogonality term of the loss), and a checkpoint must carry
its importance scores so a resumed run allocates exactly as the uninterrupted one.
"""

from __future__ import annotations

import math
import re

import torch

from ..config import Config


class MethodSteps:
    """The loop's calls for methods that need none of them."""

    def loss_term(self) -> torch.Tensor | None:
        return None

    def after_step(self, step: int) -> None:
        """After the optimizer step `step` (counted from 0), before the gradients are cleared."""

    def finish(self) -> bool:
        """Once training has ended and the best weights are back. Returns whether it changed the weights."""
        return False

    def ranks(self) -> dict[str, int] | None:
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class AdaLoraSteps(MethodSteps):
    """peft's AdaLoRA allocation driven by lorafit's loop: the run's own step count sets its schedule."""

    def __init__(self, model: torch.nn.Module, cfg: Config, total_steps: int):
        o = cfg.adalora
        self.tuner = model.base_model  # peft's AdaLoraModel
        self.config = model.peft_config["default"]
        tinit, tfinal = math.floor(o.warmup_share * total_steps), math.floor(o.final_share * total_steps)
        if tinit >= total_steps - tfinal:  # a run of a handful of steps: allocate over all of them
            tinit, tfinal = 0, 0
        self.config.total_step, self.config.tinit, self.config.tfinal = total_steps, tinit, tfinal
        self.weight = o.orth_reg_weight
        self.factors = [
            (p, "lora_A" in n)
            for n, p in model.named_parameters()
            if ("lora_A" in n or "lora_B" in n) and p.requires_grad
        ]

    def loss_term(self) -> torch.Tensor | None:
        """The orthogonality regulariser of AdaLoRA's SVD form, as peft's AdaLoraModel.forward computes it. peft adds
        it only to a loss the model computes itself from labels; lorafit computes its own (label smoothing), so it
        is added here."""
        if not self.weight or not self.factors:
            return None
        total = 0.0
        for p, is_a in self.factors:
            cov = p @ p.T if is_a else p.T @ p
            total = total + torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], device=cov.device, dtype=cov.dtype))
        return self.weight * total / len(self.factors)

    def after_step(self, step: int) -> None:
        self.tuner.update_and_allocate(step)

    def finish(self) -> bool:
        """The best weights may come from before the last cut: mask them with the final ranks, which are the ones the
        saved adapter keeps (peft resizes it to them), so the model in memory is the model saved."""
        if not self.config.rank_pattern:
            return False
        self.tuner.rankallocator.mask_using_rank_pattern(self.tuner.model, self.config.rank_pattern)
        return True

    def ranks(self) -> dict[str, int] | None:
        """Each adapted module's allocated rank (None before the first allocation)."""
        pattern = self.config.rank_pattern
        # keyed by the module's name (peft's keys end in .lora_E, and .default while training)
        return (
            {re.sub(r"\.lora_E(\.default)?$", "", name): int(sum(keep)) for name, keep in pattern.items()}
            if pattern
            else None
        )

    def state_dict(self) -> dict:
        allocator = self.tuner.rankallocator
        scores = {k: {n: t.detach().cpu().clone() for n, t in getattr(allocator, k).items()} for k in SCORES}
        return scores | {"rank_pattern": self.config.rank_pattern}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        allocator = self.tuner.rankallocator
        device = next(p.device for p, _ in self.factors) if self.factors else "cpu"
        for k in SCORES:
            setattr(allocator, k, {n: t.to(device) for n, t in state[k].items()})
        self.config.rank_pattern = state["rank_pattern"]


SCORES = ("ipt", "exp_avg_ipt", "exp_avg_unc")  # the rank allocator's running importance scores


def method_steps(model: torch.nn.Module, cfg: Config, total_steps: int) -> MethodSteps:
    return AdaLoraSteps(model, cfg, total_steps) if cfg.method == "adalora" else MethodSteps()
