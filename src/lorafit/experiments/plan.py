"""`lorafit plan`: the adapter layouts that fit the trainable-parameter budget, counted without loading weights.

It crosses target-module sets (query/value, query/key/value, + attention output, + feed-forward, all-linear,
mapped to the model's own module names), ranks, DoRA on/off, the head choice and three layer patterns
(all layers, upper layers only, double rank in the upper layers), counts every combination with
`lorafit.budget.compute` on one meta-device skeleton, and keeps those within the budget. The result is a
sweep file (`points:`) that `lorafit sweep --plan FILE` trains.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .. import budget as budget_mod
from ..atomic import atomic_write_text
from ..config import Config
from ..errors import LorafitError
from ..models import layers_pattern, linears_outside_head, matched_modules
from .points import Skeletons, apply_point, flow

DEFAULT_RANKS = (2, 4, 8, 16)

# Roles of the Linear modules inside one transformer block, by their name relative to the block.
ROLE_PATTERNS = {
    "q": r"(?:^|\.)(?:query|q_lin|q_proj|q)$",
    "k": r"(?:^|\.)(?:key|k_lin|k_proj|k)$",
    "v": r"(?:^|\.)(?:value|v_lin|v_proj|v)$",
    "o": r"(?:attention\.output\.dense|out_lin|o_proj|out_proj)$",
}
TARGET_SETS = {  # label -> roles (cumulative, as in the reference study); all-linear is peft's own rule
    "q,v": ("q", "v"),
    "q,k,v": ("q", "k", "v"),
    "q,k,v,o": ("q", "k", "v", "o"),
    "q,k,v,o,ffn": ("q", "k", "v", "o", "ffn"),
    "all-linear": None,
}
PATTERNS = ("all", "upper", "upper 2r")


@dataclass
class Candidate:
    targets: str  # label of the target set
    r: int
    dora: bool
    head: str
    layers: str  # label of the layer pattern
    overrides: dict  # dotted key -> value, only the keys that differ from the base config
    budget: budget_mod.Budget
    method: str = "lora"
    size: str = ""  # a method's own size setting, as the table shows it ("r 8", "n_frequency 1000", ...)

    @property
    def total(self) -> int:
        return self.budget.total


@dataclass
class Plan:
    model: str
    num_labels: int
    max_trainable: int
    fits: list[Candidate]
    counted: int  # configurations counted (after removing duplicates)
    roles: dict[str, list[str]]
    methods: tuple[str, ...] = ("lora",)
    counted_by_method: dict[str, int] | None = None


def block_roles(model) -> tuple[dict[str, list[str]], list[int], str]:
    """The non-head Linear modules of the transformer blocks by role (q, k, v, o, ffn), the layer indices and
    the name of the block list ('layer')."""
    lp = layers_pattern(model)
    if lp is None:
        raise LorafitError(
            f"lorafit plan: found no numbered transformer blocks in {model.config.model_type}; plan needs an encoder with layers like 'layer.0.'"
        )
    rx = re.compile(rf"^(?:.*\.)?{re.escape(lp)}\.(\d+)\.(.+)$")
    roles: dict[str, list[str]] = {"q": [], "k": [], "v": [], "o": [], "ffn": []}
    layers = set()
    for name in linears_outside_head(model):
        m = rx.match(name)
        if not m:
            continue  # e.g. BERT's pooler: outside the blocks
        layers.add(int(m.group(1)))
        rel = m.group(2)
        role = next((r for r, pat in ROLE_PATTERNS.items() if re.search(pat, rel)), None)
        if role is None:
            role = "o" if re.search(r"attn|attention", rel) else "ffn"
        roles[role].append(name)
    if not roles["q"] or not roles["v"]:
        found = sorted({n.rsplit(".", 1)[-1] for n in linears_outside_head(model)})
        raise LorafitError(
            f"lorafit plan: cannot tell the query/value projections of {model.config.model_type} (its Linear modules are {found}); write a sweep file by hand"
        )
    return roles, sorted(layers), lp


def target_names(names: list[str], wanted: set[str]) -> list[str]:
    """The shortest peft target names (suffixes) that select exactly `wanted` among `names`.

    'dense' alone would also catch BERT's pooler and the feed-forward layers, so the attention output becomes
    'attention.output.dense'; names like 'query' stay short. Suffixes work with layers_to_transform, which
    regexes do not."""
    out = []
    for name in names:
        if name not in wanted:
            continue
        parts = name.split(".")
        for i in range(len(parts) - 1, -1, -1):
            t = ".".join(parts[i:])
            if {n for n in names if n == t or n.endswith("." + t)} <= wanted:
                out.append(t)
                break
    return list(dict.fromkeys(out))


def _number(x: float):
    return int(x) if float(x).is_integer() else x


def _target_sets(base: Config, model, roles: dict[str, list[str]], names: list[str]) -> dict[str, object]:
    """Target sets as the model names them; a set that adapts the same modules as an earlier one is dropped."""
    targets: dict[str, object] = {}
    seen = set()
    for label, wanted_roles in TARGET_SETS.items():
        value = (
            "all-linear" if wanted_roles is None else target_names(names, {m for r in wanted_roles for m in roles[r]})
        )
        if not value:
            continue
        probe = apply_point(
            base,
            {
                "lora.target_modules": value,
                "lora.layers_to_transform": None,
                "lora.rank_pattern": {},
                "model.head": "default",
            },
            "plan",
        )
        matched = frozenset(matched_modules(model, probe))
        if matched in seen:
            continue
        seen.add(matched)
        targets[label] = value
    return targets


def _heads(base: Config, skeletons: Skeletons, qv_targets) -> list[str]:
    """The head choices worth counting: `linear` only where it differs from the model's own head."""
    probe = {"lora.target_modules": qv_targets, "lora.layers_to_transform": None, "lora.rank_pattern": {}}
    head_params = {
        h: skeletons.budget(apply_point(base, probe | {"model.head": h}, "plan")).parts["head"]
        for h in ("default", "linear")
    }
    return ["default"] + (["linear"] if head_params["linear"] != head_params["default"] else [])


# What the planner tries of each method besides LoRA: its size setting (key, values, as the table names it); IA3 has
# none (one scale per adapted feature), nor has BitFit (one bias). Values that do not fit a model are skipped (OFT's block sizes that do not
# divide the layers' inputs).
METHOD_SIZES = {
    "adalora": ("adalora.init_r", DEFAULT_RANKS, "init_r"),  # cut to half of it on average (target_r)
    "ia3": None,
    "vera": ("vera.r", (64, 256, 1024), "r"),
    "fourierft": ("fourierft.n_frequency", (250, 1000, 4000, 16000), "n_frequency"),
    "loha": ("loha.r", DEFAULT_RANKS, "r"),
    "lokr": ("lokr.r", DEFAULT_RANKS, "r"),
    "oft": ("oft.block_size", (4, 8, 16, 32, 64), "block"),
    "bitfit": None,
}


def make_plan(
    base: Config,
    max_trainable: int | None = None,
    ranks=DEFAULT_RANKS,
    skeletons: Skeletons | None = None,
    methods: tuple[str, ...] = ("lora",),
) -> Plan:
    """Count every combination on one weightless skeleton and keep those within the budget, largest first."""
    skeletons = skeletons or Skeletons()
    limit = max_trainable or base.budget.max_trainable
    n = skeletons.num_labels(base)
    model = skeletons.model(apply_point(base, {"model.head": "default"}, "base config"), n)
    roles, layers, lp = block_roles(model)
    names = linears_outside_head(model)
    upper = layers[len(layers) // 2 :]
    upper_regex = rf"{lp}\.({'|'.join(map(str, upper))})\..*"
    ratio = base.lora.alpha / base.lora.r

    targets = _target_sets(base, model, roles, names)
    heads = _heads(base, skeletons, targets["q,v"])
    base_dict = base.to_dict()
    fits, counted = [], 0
    counted_by_method: dict[str, int] = {}
    for method in methods:
        if method == "lora":
            continue
        found, n_counted = _method_candidates(base, base_dict, method, targets, heads, skeletons, limit, max_trainable)
        fits += found
        counted += n_counted
        counted_by_method[method] = n_counted
    for label, value in targets.items() if "lora" in methods else ():
        for r in ranks:
            alpha = _number(ratio * r)
            for dora in (False, True):
                for head in heads:
                    for pattern in PATTERNS:
                        if pattern == "upper" and not isinstance(value, list):
                            continue  # layers_to_transform needs a list; the q,k,v,o,ffn list covers the same blocks
                        point = {
                            "model.head": head,
                            "lora.target_modules": value,
                            "lora.r": r,
                            "lora.alpha": alpha,
                            "lora.use_dora": dora,
                            "lora.layers_to_transform": upper if pattern == "upper" else None,
                            "lora.rank_pattern": {upper_regex: 2 * r} if pattern == "upper 2r" else {},
                            "lora.alpha_pattern": {upper_regex: _number(2 * alpha)} if pattern == "upper 2r" else {},
                        }
                        if max_trainable and max_trainable != base.budget.max_trainable:
                            point["budget.max_trainable"] = max_trainable
                        cfg = apply_point(base, point, f"plan point {flow(point)}")
                        b = skeletons.budget(cfg)
                        counted += 1
                        if b.total > limit:
                            continue
                        changed = {k: v for k, v in point.items() if _get(base_dict, k) != v}
                        layers_label = (
                            "all"
                            if pattern == "all"
                            else f"{pattern.replace('upper', f'upper {upper[0]}-{upper[-1]}')}"
                        )
                        fits.append(Candidate(label, r, dora, head, layers_label, changed, b, size=f"r {r}"))
                        counted_by_method["lora"] = counted_by_method.get("lora", 0) + 1
    fits.sort(key=lambda c: (methods.index(c.method), -c.total, c.targets, c.r))
    roles = {k: v for k, v in roles.items() if v}
    return Plan(base.model.name, n, limit, fits, counted, roles, tuple(methods), counted_by_method)


def _method_candidates(
    base: Config,
    base_dict: dict,
    method: str,
    targets: dict,
    heads: list[str],
    skeletons: Skeletons,
    limit: int,
    max_trainable,
) -> tuple[list[Candidate], int]:
    """The layouts of a method other than LoRA: its target sets x its size setting x the heads."""
    key, values, shown = METHOD_SIZES[method] or (None, (None,), "")
    fits, counted = [], 0
    for label, value in targets.items():
        for size in values:
            for head in heads:
                point = {"method": method, "model.head": head, f"{method}.target_modules": value}
                if method == "ia3":
                    point["ia3.feedforward_modules"] = []
                if method == "adalora":
                    point["adalora.target_r"] = max(1, size // 2)
                if key:
                    point[key] = size
                if max_trainable and max_trainable != base.budget.max_trainable:
                    point["budget.max_trainable"] = max_trainable
                cfg = apply_point(base, point, f"plan point {flow(point)}")
                try:
                    b = skeletons.budget(cfg)
                except LorafitError:
                    continue  # a size this model cannot take (an OFT block size that divides no input size)
                counted += 1
                if b.total > limit:
                    continue
                changed = {k: v for k, v in point.items() if _get(base_dict, k) != v}
                size_label = f"{shown} {size}" if key else "-"
                fits.append(Candidate(label, 0, False, head, "all", changed, b, method=method, size=size_label))
    return fits, counted


def _get(data: dict, key: str):
    for part in key.split("."):
        data = data[part]
    return data


def table(plan: Plan) -> str:
    if plan.methods != ("lora",):
        return _methods_table(plan)
    lines = [
        f"plan for {plan.model} ({plan.num_labels} classes), budget {plan.max_trainable:,}: "
        f"{len(plan.fits)} of {plan.counted} configurations fit, largest first",
        f"  {'#':>4}  {'trainable':>10}  {'margin':>10}  {'targets':<12} {'r':>3}  {'dora':<5} {'head':<8} layers",
    ]
    for i, c in enumerate(plan.fits, 1):
        lines.append(
            f"  {i:>4}  {c.total:>10,}  {c.budget.margin:>10,}  {c.targets:<12} {c.r:>3}  {'yes' if c.dora else 'no':<5} {c.head:<8} {c.layers}"
        )
    return "\n".join(lines)


def _methods_table(plan: Plan) -> str:
    """One block per method, its layouts largest first: what the budget buys in each."""
    lines = [f"plan for {plan.model} ({plan.num_labels} classes), budget {plan.max_trainable:,}, by method:"]
    for method in plan.methods:
        fits = [c for c in plan.fits if c.method == method]
        counted = (plan.counted_by_method or {}).get(method, 0)
        lines.append(f"  {method}: {len(fits)} of {counted} layouts fit")
        if fits:
            lines.append(
                f"    {'#':>4}  {'trainable':>10}  {'margin':>10}  {'targets':<12} {'size':<18} {'dora':<5} {'head':<8} layers"
            )
        for c in fits:
            i = plan.fits.index(c) + 1
            dora = ("yes" if c.dora else "no") if method == "lora" else "-"
            lines.append(
                f"    {i:>4}  {c.total:>10,}  {c.budget.margin:>10,}  {c.targets:<12} {c.size:<18} {dora:<5} {c.head:<8} {c.layers}"
            )
    return "\n".join(lines)


def _describe(c: Candidate) -> str:
    if c.method == "lora":
        return f"{c.targets}, r {c.r}, dora {'on' if c.dora else 'off'}, head {c.head}, layers {c.layers}"
    return f"{c.method}, {c.targets}, {c.size}, head {c.head}"


def write(plan: Plan, path: Path, config_path: Path | None) -> None:
    """The plan as a sweep file: one `points:` entry per fitting configuration, its count in a comment."""
    cfg_arg = f"-c {config_path} " if config_path else ""
    lines = [
        f"# lorafit plan: {plan.model} ({plan.num_labels} classes), budget {plan.max_trainable:,}",
        f"# {len(plan.fits)} of {plan.counted} configurations fit, largest first; train them with",
        f"#   lorafit sweep {cfg_arg}--plan {path} -o sweeps/NAME",
        "points:",
    ]
    for i, c in enumerate(plan.fits, 1):
        lines.append(
            f"- {flow(c.overrides)}  # {i}: {c.total:,} trainable, margin {c.budget.margin:,} ({_describe(c)})"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "\n".join(lines) + "\n")
