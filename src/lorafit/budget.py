"""Counting the trainable-parameter budget from the architecture and the adapter config, before any weights load.

The figure is computed from module shapes (the model is built on the meta device) and peft's own rules for
which modules an adapter reaches, so `lorafit budget` needs no download and no memory. Tests check that it
equals the `requires_grad` count of the wrapped model.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from torch import nn

from .config import Config
from .errors import BudgetExceeded
from .models import build_model, head_modules, in_head, matched_modules, wrap


@dataclass
class Budget:
    model: str
    parts: dict[str, int]  # what trains: the adapter's own parts (lora_A, lora_B, dora_magnitude, ...), head, bias
    per_module: dict[str, dict[str, int]]  # module name suffix -> {modules, params}
    total: int
    max_trainable: int
    base_total: int = 0  # all parameters of the base model with its head
    head_modules: list[str] = field(default_factory=list)
    method: str = "lora"

    @property
    def margin(self) -> int:
        return self.max_trainable - self.total

    def to_dict(self) -> dict:
        return asdict(self) | {"margin": self.margin}

    def table(self) -> str:
        lines = [
            f"trainable parameters for {self.model}" + (f", method {self.method}" if self.method != "lora" else "")
        ]
        width = max(len(k) for k in list(self.parts) + list(self.per_module) + ["total"]) + 4
        lines.append("  by part:")
        for k, v in self.parts.items():
            lines.append(f"    {k:<{width}}{v:>12,}")
        lines.append("  by module type (adapted modules, their adapter parameters):")
        if not self.per_module:
            lines.append("    (none: a method whose parameters all adapted layers share)")
        for k, v in self.per_module.items():
            lines.append(f"    {k:<{width}}{v['params']:>12,}  in {v['modules']} modules")
        if self.head_modules:
            lines.append(f"  head modules (train fully): {', '.join(self.head_modules)}")
        lines.append(
            f"  {'total':<{width + 2}}{self.total:>12,}  ({100 * self.total / max(self.base_total, 1):.2f}% of {self.base_total:,})"
        )
        word = "margin" if self.margin >= 0 else "OVER BUDGET by"
        lines.append(f"  {'budget':<{width + 2}}{self.max_trainable:>12,}  {word} {abs(self.margin):,}")
        return "\n".join(lines)


def compute(cfg: Config, num_labels: int, model: nn.Module | None = None) -> Budget:
    """Trainable parameters of cfg's adapter on cfg's model, by part and by module type.

    `model` may be given (unwrapped, any device); otherwise a weightless skeleton is built.
    """
    if cfg.method != "lora":
        return counted(cfg, num_labels, model)
    if model is None:
        model = build_model(cfg, num_labels, weights=False)
    lora = cfg.lora
    matched = matched_modules(model, cfg)
    from peft.utils.other import get_pattern_key

    parts = {"lora_A": 0, "lora_B": 0, "dora_magnitude": 0, "head": 0, "bias": 0}
    per_module: dict[str, dict[str, int]] = {}
    for name, lin in matched.items():
        r = lora.rank_pattern.get(get_pattern_key(lora.rank_pattern.keys(), name), lora.r)
        a, b = r * lin.in_features, r * lin.out_features
        m = lin.out_features if lora.use_dora else 0
        parts["lora_A"] += a
        parts["lora_B"] += b
        parts["dora_magnitude"] += m
        kind = re.sub(r"^.*?\.\d+\.", "", name)  # 'bert.encoder.layer.3.attention.self.query' -> 'attention.self.query'
        entry = per_module.setdefault(kind, {"modules": 0, "params": 0})
        entry["modules"] += 1
        entry["params"] += a + b + m

    heads = head_modules(model)
    parts["head"] = sum(p.numel() for n, p in model.named_parameters() if in_head(n, heads))
    if lora.bias == "all":
        parts["bias"] = sum(
            p.numel() for n, p in model.named_parameters() if n.endswith(".bias") and not in_head(n, heads)
        )
    elif lora.bias == "lora_only":
        parts["bias"] = sum(lin.bias.numel() for lin in matched.values() if lin.bias is not None)
    return _budget(cfg, parts, per_module, sum(p.numel() for p in model.parameters()), heads)


def counted(cfg: Config, num_labels: int, model: nn.Module | None = None) -> Budget:
    """The budget of a method other than LoRA, counted on a weightless skeleton that peft itself wrapped: what it
    trains, by part (the adapter's own parameter names: ia3_l, vera_lambda_b, fourierft_spectrum, hada_w1_a, ...),
    so a method needs no arithmetic of its own. `model` (unwrapped) is copied first: peft wraps a model in place."""
    import copy

    from peft.tuners.tuners_utils import BaseTunerLayer

    model = build_model(cfg, num_labels, weights=False) if model is None else copy.deepcopy(model)
    heads = head_modules(model)
    base_total = sum(p.numel() for p in model.parameters())
    wrapped = wrap(model, cfg)
    adapter_names, fixed = set(), set()
    for m in wrapped.modules():
        if isinstance(m, BaseTunerLayer):
            adapter_names.update(m.adapter_layer_names)
            fixed.update(m.other_param_names)
    prefix = "base_model.model."
    parts: dict[str, int] = {}
    per_module: dict[str, dict[str, int]] = {}
    modules_seen: dict[str, set[str]] = {}
    for name, p in wrapped.named_parameters():
        inner = name.removeprefix(prefix)
        segments = inner.split(".")
        # AdaLoRA's ranknum is a parameter peft never trains, but on the meta device it comes out requiring grad
        if not p.requires_grad or fixed.intersection(segments):
            continue
        at = next((i for i, seg in enumerate(segments) if seg in adapter_names), None)
        if in_head(inner, heads):
            part = "head"
        elif at is not None:
            part = segments[at]
            module = ".".join(segments[:at])
            kind = re.sub(r"^.*?\.\d+\.", "", module)
            entry = per_module.setdefault(kind, {"modules": 0, "params": 0})
            entry["params"] += p.numel()
            modules_seen.setdefault(kind, set()).add(module)
            entry["modules"] = len(modules_seen[kind])
        else:
            part = "bias" if inner.endswith(".bias") else segments[-1]
        parts[part] = parts.get(part, 0) + p.numel()
    parts = {k: parts[k] for k in sorted(parts, key=lambda k: (k in ("head", "bias"), k))}  # the adapter's first
    return _budget(cfg, parts, per_module, base_total, heads)


def _budget(cfg: Config, parts: dict, per_module: dict, base_total: int, heads: list[str]) -> Budget:
    return Budget(
        model=cfg.model.name,
        parts=parts,
        per_module=per_module,
        total=sum(parts.values()),
        max_trainable=cfg.budget.max_trainable,
        base_total=base_total,
        head_modules=heads,
        method=cfg.method,
    )


def check(budget: Budget) -> None:
    if budget.total > budget.max_trainable:
        raise BudgetExceeded(
            f"{budget.total:,} trainable parameters exceed budget.max_trainable={budget.max_trainable:,} by {-budget.margin:,}; "
            f"{_fewer(budget.method)}, use model.head=linear, or raise budget.max_trainable"
        )


def _fewer(method: str) -> str:
    """How to train fewer parameters with a method's own options."""
    if method == "lora":
        return "lower lora.r, adapt fewer modules (lora.target_modules, lora.layers_to_transform)"
    size = {  # the method's own size setting; IA3, VeRA's trained vectors and BitFit have none worth lowering
        "adalora": "lower adalora.init_r, ",
        "fourierft": "lower fourierft.n_frequency, ",
        "loha": "lower loha.r, ",
        "lokr": "lower lokr.r, ",
        "oft": "lower oft.block_size, ",
    }
    return f"{size.get(method, '')}adapt fewer modules ({method}.target_modules)"


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
