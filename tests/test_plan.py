"""`lorafit plan`: every listed layout fits the budget, checked against peft's real wrapping (not our own counter)."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import yaml

from conftest import make_tiny_model
from lorafit import budget, cli, models
from lorafit.config import load_config
from lorafit.experiments.plan import block_roles, make_plan, target_names
from lorafit.experiments.points import Skeletons, apply_point, read_points_file

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "configs" / "agnews-roberta-base.yaml"


def wrapped_count(cfg, skeletons: dict, num_labels: int) -> int:
    """requires_grad parameters of the peft-wrapped meta-device model: peft decides what is trained."""
    key = cfg.model.head
    if key not in skeletons:
        skeletons[key] = models.build_model(cfg, num_labels, weights=False)
    return budget.count_trainable(models.wrap(copy.deepcopy(skeletons[key]), cfg))


def test_plan_on_the_reference_roberta_config_lists_only_layouts_under_one_million(tmp_path, capsys):
    out = tmp_path / "plan.yaml"
    assert cli.main(["plan", "-c", str(REFERENCE), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    listed = [int(m.group(1).replace(",", "")) for m in re.finditer(r"^\s+\d+\s+([\d,]+)\s+[\d,]+\s", printed, re.M)]

    grid, points = read_points_file(out)
    assert grid == {} and len(points) == len(listed) > 50
    comments = [int(m.group(1).replace(",", "")) for m in re.finditer(r"# \d+: ([\d,]+) trainable", out.read_text())]
    assert comments == listed == sorted(listed, reverse=True)

    base = load_config(REFERENCE)
    skeletons: dict = {}
    layouts = set()
    for point, count in zip(points, listed, strict=True):
        cfg = apply_point(base, point, "plan point")
        real = wrapped_count(cfg, skeletons, 4)
        assert real == count < 1_000_000, point
        layouts.add(
            (
                flow_key(cfg.lora.target_modules),
                cfg.lora.r,
                cfg.lora.use_dora,
                cfg.model.head,
                flow_key(cfg.lora.layers_to_transform),
                flow_key(cfg.lora.rank_pattern),
            )
        )
    assert len(layouts) == len(points)  # no layout listed twice
    # the reference study's own layout is there, with its known count
    assert 759_556 in listed
    ref = apply_point(base, points[listed.index(759_556)], "x")
    assert 759_556 == budget.compute(load_config(REFERENCE), 4).total
    # the plan covers every dimension of the issue
    heads = {apply_point(base, p, "x").model.head for p in points}
    assert heads == {"default", "linear"}
    assert any(apply_point(base, p, "x").lora.layers_to_transform == [6, 7, 8, 9, 10, 11] for p in points)
    assert any(apply_point(base, p, "x").lora.rank_pattern for p in points)
    assert {apply_point(base, p, "x").lora.use_dora for p in points} == {True, False}
    assert ref.lora.r in (2, 4, 8, 16)


def flow_key(v) -> str:
    return yaml.safe_dump(v, default_flow_style=True)


def test_over_budget_layouts_are_left_out_and_counted():
    base = load_config(REFERENCE)
    plan = make_plan(base, max_trainable=300_000)
    assert plan.fits and all(c.total <= 300_000 for c in plan.fits)
    assert plan.counted > len(plan.fits)
    # RoBERTa's own head alone is 593,668: under 300k only the linear head fits
    assert {c.head for c in plan.fits} == {"linear"}
    assert all(c.overrides["budget.max_trainable"] == 300_000 for c in plan.fits)


def test_target_sets_use_exact_module_names_for_bert(tiny_bert):
    cfg = load_config(None, [f"model.name={tiny_bert}", "data.label_names=[a,b,c,d]"])
    sk = Skeletons()
    model = sk.model(cfg, 4)
    roles, layers, lp = block_roles(model)
    assert layers == [0, 1] and lp == "layer"
    assert [n.rsplit(".", 1)[-1] for n in roles["o"]] == ["dense", "dense"]
    assert all("attention.output" in n for n in roles["o"])
    names = [n for n, m in model.named_modules() if type(m).__name__ == "Linear" and not n.startswith("classifier")]
    everything = {m for r in roles.values() for m in r}
    # 'dense' alone would also take BERT's pooler: the feed-forward set names its modules exactly
    assert target_names(names, everything) == ["query", "key", "value", "output.dense", "intermediate.dense"]
    attention = {m for r in "qkvo" for m in roles[r]}
    assert target_names(names, attention) == ["query", "key", "value", "attention.output.dense"]
    plan = make_plan(cfg, max_trainable=10**9, ranks=[2])
    assert {c.targets for c in plan.fits} == {
        "q,v",
        "q,k,v",
        "q,k,v,o",
        "q,k,v,o,ffn",
        "all-linear",
    }  # all-linear adds the pooler
    assert {c.head for c in plan.fits} == {"default"}  # BERT's linear head is its default head
    upper = [c for c in plan.fits if c.layers == "upper 1-1"]
    assert upper and all(c.overrides["lora.layers_to_transform"] == [1] for c in upper)


def test_plan_layer_patterns_adapt_what_they_say(tmp_path):
    """Wrap the tiny DistilBERT with each pattern of the plan and look at the adapted modules' ranks."""
    folder = make_tiny_model(tmp_path / "distil", "distilbert")
    cfg = load_config(None, [f"model.name={folder}", "data.label_names=[a,b]", "lora.r=2", "lora.alpha=4"])
    plan = make_plan(cfg, max_trainable=10**9, ranks=[2])
    by = {(c.targets, c.dora, c.head, c.layers): c for c in plan.fits}
    assert {c.targets for c in plan.fits} == {"q,v", "q,k,v", "q,k,v,o", "q,k,v,o,ffn"}  # all-linear = q,k,v,o,ffn here
    for layers, expect in [("all", {0: 2, 1: 2}), ("upper 1-1", {1: 2}), ("upper 1-1 2r", {0: 2, 1: 4})]:
        c = by[("q,v", False, "default", layers)]
        point_cfg = apply_point(cfg, c.overrides, "x")
        wrapped = models.wrap(models.build_model(point_cfg, 2), point_cfg)
        ranks = {}
        for n, m in wrapped.named_modules():
            if hasattr(m, "lora_A") and "modules_to_save" not in n:
                assert n.endswith(("q_lin", "v_lin")), n
                ranks.setdefault(int(re.search(r"layer\.(\d+)\.", n).group(1)), set()).add(m.r["default"])
        assert {k: v.pop() for k, v in ranks.items()} == expect, layers
        assert budget.count_trainable(wrapped) == c.total


def test_plan_errors_are_one_line(tmp_path, capsys):
    code = cli.main(["plan", "-c", str(REFERENCE), "--budget", "1000"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("lorafit: error: none of the") and err.count("\n") == 1
    code = cli.main(["plan", "-c", str(REFERENCE), "--ranks", "4,x"])
    err = capsys.readouterr().err
    assert code == 2 and "--ranks" in err and err.count("\n") == 1


def test_plan_file_feeds_sweep_points(tmp_path):
    from lorafit.experiments.points import resolve_points

    out = tmp_path / "plan.yaml"
    assert cli.main(["plan", "-c", str(REFERENCE), "--ranks", "2", "--budget", "400000", "-o", str(out)]) == 0
    _, points = read_points_file(out)
    resolved = resolve_points(load_config(REFERENCE), points)
    assert resolved and not any(p.over_budget for p in resolved)
    assert len({p.name for p in resolved}) == len(resolved)
