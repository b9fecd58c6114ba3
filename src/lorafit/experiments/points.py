"""Sweep points: config overrides by dotted key, their validation and budget, shared by `plan` and `sweep`.

A point is a flat mapping {'lora.r': 4, 'lora.target_modules': [query, value]} applied on top of a base
config. Budgets are counted on weightless meta-device skeletons, one per model (and head) for a whole sweep.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from .. import budget as budget_mod
from ..config import Config, all_keys, load_yaml, migrate_key, read_yaml, suggest, validate
from ..data import num_labels
from ..errors import LorafitError
from ..models import apply_head, build_model


@lru_cache(maxsize=1)
def leaf_keys() -> frozenset[str]:
    """Every settable dotted key (config leaves)."""
    return frozenset(k for k, _, _ in all_keys())


def check_keys(keys, origin: str) -> None:
    """Every key must be a config leaf (under its current or an earlier name); all unknown keys are reported at
    once with a suggestion."""
    bad = [k for k in dict.fromkeys(keys) if migrate_key(k) not in leaf_keys()]
    if bad:
        raise LorafitError(
            f"{origin}: unknown key(s) " + "; ".join(f"'{k}' ({suggest(k)})" for k in bad) + " (see `lorafit keys`)"
        )


def set_key(data: dict, key: str, value: Any) -> None:
    """Set a dotted key (current or earlier name) in a nested config dict of the current layout."""
    node = data
    parts = migrate_key(key).split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = copy.deepcopy(value)


def get_key(cfg: Config | dict, key: str) -> Any:
    node = cfg.to_dict() if isinstance(cfg, Config) else cfg
    for part in migrate_key(key).split("."):
        node = node[part]
    return node


def apply_point(base: Config, point: dict, origin: str) -> Config:
    data = base.to_dict()
    for key, value in point.items():
        set_key(data, key, value)
    return validate(data, origin)


def describe(point: dict) -> str:
    """'r=4 alpha=8' for messages and tables (leaf names, values as YAML flow); a leaf name two keys share is given
    in full ('model.dropout=0 lora.dropout=0'), so no two settings read alike."""
    leaves = [k.rsplit(".", 1)[-1] for k in point]
    names = [leaf if leaves.count(leaf) == 1 else k for k, leaf in zip(point, leaves, strict=True)]
    return " ".join(f"{n}={flow(v)}" for n, v in zip(names, point.values(), strict=True)) or "(base config)"


def flow(value: Any) -> str:
    return (
        yaml.safe_dump(value, default_flow_style=True, width=10**6, sort_keys=False).strip().removesuffix("...").strip()
    )


def point_name(point: dict) -> str:
    """A folder name that is stable for the same overrides: a readable slug plus a hash of the exact values."""
    digest = hashlib.sha1(json.dumps(point, sort_keys=True, default=str).encode()).hexdigest()[:6]
    slug = "_".join(f"{k.rsplit('.', 1)[-1]}={_compact(v)}" for k, v in point.items())
    slug = re.sub(r"[^A-Za-z0-9.+=_-]+", "-", slug).strip("-_")[:48].rstrip("-_")
    return f"{slug or 'base'}-{digest}"


def _compact(value: Any) -> str:
    if isinstance(value, list):
        return "+".join(_compact(v) for v in value)
    if isinstance(value, dict):
        # regex keys make poor names; the hash tells them apart
        return "+".join(_compact(v) for v in value.values()) or "none"
    return flow(value)


# ---------------------------------------------------------------------------------------------------------------------
# Reading grids and point files


def parse_values(raw: str, origin: str) -> list:
    """'2,4,8' -> [2, 4, 8]; '[query,value],[query,key,value]' -> two lists (YAML flow items)."""
    try:
        values = load_yaml("[" + raw + "]")
    except yaml.YAMLError as e:
        raise LorafitError(
            f"{origin}: the values are not a valid comma-separated YAML list ({str(e).splitlines()[0]}); put complex values in a --grid-file"
        ) from None
    if not values:
        raise LorafitError(f"{origin}: no values; expected KEY=V1,V2,... (e.g. --grid lora.r=2,4,8)")
    return values


def parse_grid_arg(item: str) -> tuple[str, list]:
    if "=" not in item:
        raise LorafitError(f"--grid {item!r}: expected KEY=V1,V2,... (e.g. --grid lora.r=2,4,8)")
    key, raw = item.split("=", 1)
    return key.strip(), parse_values(raw, f"--grid {item!r}")


def read_points_file(path: Path) -> tuple[dict[str, list], list[dict]]:
    """A sweep file: `grid: {key: [values]}` and/or `points: [{key: value, ...}, ...]` (what `lorafit plan -o` writes).
    A plain mapping of key -> list of values is read as a grid."""
    data = read_yaml(path)
    if not isinstance(data, dict) or not data:
        raise LorafitError(
            f"{path}: expected a mapping with 'grid: {{key: [values]}}' and/or 'points: [{{key: value}}, ...]'"
        )
    if not set(data) & {"grid", "points"}:
        data = {"grid": data}
    extra = set(data) - {"grid", "points"}
    if extra:
        raise LorafitError(f"{path}: unknown section(s) {sorted(extra)}; expected 'grid' and/or 'points'")
    grid = data["grid"] if data.get("grid") is not None else {}  # both sections are optional
    points = data["points"] if data.get("points") is not None else []
    if not isinstance(grid, dict) or any(not isinstance(v, list) or not v for v in grid.values()):
        raise LorafitError(f"{path}: 'grid' must map each key to a non-empty list of values (e.g. lora.r: [2, 4, 8])")
    if not isinstance(points, list) or any(not isinstance(p, dict) for p in points):
        raise LorafitError(
            f"{path}: 'points' must be a list of mappings of key: value (e.g. - {{lora.r: 4, lora.alpha: 8}})"
        )
    return {str(k): v for k, v in grid.items()}, [{str(k): v for k, v in p.items()} for p in points]


def expand(points: list[dict], grid: dict[str, list]) -> list[dict]:
    """Every point combined with every grid combination (the grid alone when there are no points)."""
    import itertools

    combos = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())] if grid else [{}]
    out = []
    for p in points or [{}]:
        clash = set(p) & set(grid)
        if clash:
            raise LorafitError(
                f"key(s) {sorted(clash)} are set both by a point and by the grid; keep each key in one place"
            )
        for c in combos:
            out.append({**p, **c})
    unique = {json.dumps(p, sort_keys=True, default=str): p for p in out}
    return list(unique.values())


# ---------------------------------------------------------------------------------------------------------------------
# Budgets on weightless skeletons


class Skeletons:
    """Meta-device models (no weights, no memory), built once per model and label count; the `linear` head is
    derived from the default one by a cheap copy, so a planner or a sweep over heads builds a model once."""

    def __init__(self):
        self._models: dict[tuple, Any] = {}
        self._labels: dict[str, int] = {}

    def num_labels(self, cfg: Config) -> int:
        """data.num_labels, read once per data source and label settings for a whole sweep."""
        key = json.dumps([cfg.data.source, cfg.data.label_column, cfg.data.label_names])
        if key not in self._labels:
            self._labels[key] = num_labels(cfg)
        return self._labels[key]

    def model(self, cfg: Config, num_labels: int):
        base_key = (cfg.model.name, num_labels, "default")
        if base_key not in self._models:
            default = Config.model_validate(cfg.to_dict() | {"model": cfg.model.model_dump() | {"head": "default"}})
            self._models[base_key] = build_model(default, num_labels, weights=False)
        key = (cfg.model.name, num_labels, cfg.model.head)
        if key not in self._models:
            self._models[key] = apply_head(copy.deepcopy(self._models[base_key]), cfg.model.head)
        return self._models[key]

    def budget(self, cfg: Config) -> budget_mod.Budget:
        n = self.num_labels(cfg)
        return budget_mod.compute(cfg, n, model=self.model(cfg, n))


@dataclass
class Point:
    overrides: dict
    cfg: Config
    budget: budget_mod.Budget
    name: str = ""
    seeds: list[int] = field(default_factory=list)

    @property
    def over_budget(self) -> bool:
        return self.budget.total > self.budget.max_trainable


def resolve_points(
    base: Config, overrides: list[dict], seeds: int = 1, skeletons: Skeletons | None = None
) -> list[Point]:
    """Validate every point and count its budget before anything trains; one error lists every bad point."""
    check_keys([k for p in overrides for k in p], "sweep")
    if seeds > 1 and any("train.seed" in p for p in overrides):
        raise LorafitError(
            "--seeds repeats each point with seeds train.seed, train.seed+1, ...; do not also sweep train.seed"
        )
    skeletons = skeletons or Skeletons()
    points, problems = [], []
    for p in overrides:
        origin = f"sweep point {describe(p)}"
        try:
            cfg = apply_point(base, p, origin)
            b = skeletons.budget(cfg)
        except LorafitError as e:
            problems.append(str(e) if str(e).startswith(origin) else f"{origin}: {e}")
            continue
        points.append(Point(p, cfg, b, point_name(p), [cfg.train.seed + i for i in range(seeds)]))
    if problems:
        raise LorafitError(
            f"{len(problems)} of {len(overrides)} sweep point(s) are invalid: " + " | ".join(dict.fromkeys(problems))
        )
    return points
