"""The analytic budget (`lorafit.budget.compute`) equals what the PEFT-wrapped model really trains.

Tiny BERT-, RoBERTa- and DistilBERT-shaped classifiers are built from configs (random weights, no download);
for every adapter setting the figure from module shapes must equal the `requires_grad` count of
`lorafit.models.wrap(model, cfg)`, part by part.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from lorafit import budget, models
from lorafit.config import Config, load_config
from lorafit.errors import BudgetExceeded, LorafitError

LAYERS = 4

# the abstract names Q, K, V, D of the variants below, per architecture
NAMES = {
    "bert": {"Q": "query", "K": "key", "V": "value", "D": "dense"},
    "roberta": {"Q": "query", "K": "key", "V": "value", "D": "dense"},
    "distilbert": {"Q": "q_lin", "K": "k_lin", "V": "v_lin", "D": "out_lin", "F1": "lin1", "F2": "lin2"},
}
LINEAR_NAMES = {
    "bert": {"query", "key", "value", "dense"},
    "roberta": {"query", "key", "value", "dense"},
    "distilbert": {"q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"},
}

UPPER = r".*\.[23]\..*"  # layers 2 and 3 of 4, in every architecture's module names

# id -> the `lora` section; strings inside target_modules / regexes use Q, K, V, D as placeholders
VARIANTS = {
    "lora-qv": dict(target_modules=["Q", "V"]),
    "lora-qkvd": dict(target_modules=["Q", "K", "V", "D"]),
    "dora-qv": dict(target_modules=["Q", "V"], use_dora=True),
    "rslora-qkvd": dict(target_modules=["Q", "K", "V", "D"], use_rslora=True),
    "dora+rslora-qv": dict(target_modules=["Q", "V"], use_dora=True, use_rslora=True),
    "dora+rslora-qkvd": dict(target_modules=["Q", "K", "V", "D"], use_dora=True, use_rslora=True),
    "bias_all-qv": dict(target_modules=["Q", "V"], bias="all"),
    "bias_lora_only-qkvd": dict(target_modules=["Q", "K", "V", "D"], bias="lora_only"),
    "bias_lora_only-dora-qv": dict(target_modules=["Q", "V"], bias="lora_only", use_dora=True),
    "all_linear": dict(target_modules="all-linear"),
    "all_linear-dora-bias_all": dict(target_modules="all-linear", use_dora=True, bias="all"),
    "all_linear-bias_lora_only": dict(target_modules="all-linear", bias="lora_only"),
    "regex-qv": dict(target_modules=r".*\.(Q|V)"),
    "regex-upper_qkvd-dora": dict(target_modules=r".*\.[23]\..*\.(Q|K|V|D)", use_dora=True),
    "rank_alpha_pattern-qv": dict(
        target_modules=["Q", "V"], r=4, alpha=8, rank_pattern={UPPER: 8}, alpha_pattern={UPPER: 32}
    ),
    "rank_pattern-all_linear-dora": dict(target_modules="all-linear", r=2, rank_pattern={UPPER: 6}, use_dora=True),
    "layers_to_transform-qkvd": dict(target_modules=["Q", "K", "V", "D"], layers_to_transform=[2, 3]),
    "layers_to_transform-qv-dora-bias_lora_only": dict(
        target_modules=["Q", "V"], layers_to_transform=[3], use_dora=True, bias="lora_only"
    ),
}


def tiny_classifier(model_type: str, num_labels: int, head: str = "default", layers: int = LAYERS) -> torch.nn.Module:
    """A random 32-wide encoder classifier of the given type, with lorafit's head applied."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    common = dict(vocab_size=128, max_position_embeddings=64, num_labels=num_labels, pad_token_id=1)
    if model_type == "distilbert":
        mc = AutoConfig.for_model("distilbert", dim=32, hidden_dim=64, n_layers=layers, n_heads=2, **common)
    else:
        mc = AutoConfig.for_model(
            model_type, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2, **common
        )
    torch.manual_seed(0)
    return models.apply_head(AutoModelForSequenceClassification.from_config(mc), head)


def _fill(value, names: dict[str, str]):
    """Replace the Q/K/V/D placeholders by the architecture's module names."""
    if isinstance(value, list):
        return [names[v] for v in value]
    if isinstance(value, str) and value != "all-linear":
        for key in sorted(names, key=len, reverse=True):
            value = value.replace(key, names[key])
    return value


def make_config(model_type: str, head: str, lora: dict) -> Config:
    lora = dict(lora)
    lora["target_modules"] = _fill(lora["target_modules"], NAMES[model_type])
    return Config.model_validate({"model": {"name": f"tiny-{model_type}", "head": head}, "lora": lora})


def trained_parts(peft_model: torch.nn.Module) -> dict[str, int]:
    """The wrapped model's trainable parameters, sorted into the budget's parts by their names."""
    parts = {"lora_A": 0, "lora_B": 0, "dora_magnitude": 0, "head": 0, "bias": 0}
    for name, p in peft_model.named_parameters():
        if not p.requires_grad:
            continue
        if "modules_to_save" in name:
            assert "lora_" not in name, f"an adapter inside a fully trained head module: {name}"
            parts["head"] += p.numel()
        elif ".lora_A." in name:
            parts["lora_A"] += p.numel()
        elif ".lora_B." in name:
            parts["lora_B"] += p.numel()
        elif "lora_magnitude_vector" in name:
            parts["dora_magnitude"] += p.numel()
        elif name.endswith(".bias"):
            parts["bias"] += p.numel()
        else:
            raise AssertionError(f"unexpected trainable parameter {name}")
    return parts


def assert_budget_matches(model_type: str, head: str, lora: dict, num_labels: int) -> budget.Budget:
    cfg = make_config(model_type, head, lora)
    model = tiny_classifier(model_type, num_labels, head)
    computed = budget.compute(cfg, num_labels, model=model)  # before wrap: wrap modifies the model in place
    assert computed.total == sum(computed.parts.values())
    assert computed.base_total == sum(p.numel() for p in model.parameters())

    wrapped = models.wrap(model, cfg)
    assert budget.count_trainable(wrapped) == computed.total
    assert trained_parts(wrapped) == computed.parts
    adapted = {
        n.removeprefix("base_model.model.")
        for n, m in wrapped.named_modules()
        if hasattr(m, "lora_A") and "modules_to_save" not in n
    }
    assert sum(e["modules"] for e in computed.per_module.values()) == len(adapted)
    return computed


CASES = [
    pytest.param(mt, head, name, 4, id=f"{mt}-{head}-{name}")
    for mt in ("bert", "roberta", "distilbert")
    for head in ("default", "linear", "mean")
    for name in VARIANTS
    if not (mt == "distilbert" and head == "mean")  # refused: tests/test_mean_head.py
] + [
    pytest.param(mt, head, name, 2, id=f"{mt}-{head}-{name}-2labels")
    for mt, head, name in [
        ("bert", "default", "dora+rslora-qv"),
        ("roberta", "default", "lora-qkvd"),
        ("roberta", "linear", "all_linear"),
        ("distilbert", "default", "all_linear-dora-bias_all"),
        ("distilbert", "linear", "rank_alpha_pattern-qv"),
    ]
]


@pytest.mark.parametrize(("model_type", "head", "variant", "num_labels"), CASES)
def test_compute_equals_wrapped_trainable(model_type, head, variant, num_labels):
    assert_budget_matches(model_type, head, VARIANTS[variant], num_labels)


@pytest.mark.parametrize("model_type", ["bert", "roberta", "distilbert"])
def test_rank_pattern_gives_upper_layers_higher_rank(model_type):
    lora = VARIANTS["rank_alpha_pattern-qv"]
    cfg = make_config(model_type, "default", lora)
    model = tiny_classifier(model_type, 4)
    computed = budget.compute(cfg, 4, model=model)
    plain = budget.compute(make_config(model_type, "default", dict(target_modules=["Q", "V"], r=4)), 4, model=model)
    assert computed.total > plain.total

    wrapped = models.wrap(model, cfg)
    ranks = {
        n: m.r["default"] for n, m in wrapped.named_modules() if hasattr(m, "lora_A") and "modules_to_save" not in n
    }
    assert len(ranks) == 2 * LAYERS
    for name, r in ranks.items():
        upper = any(f".{i}." in name for i in (2, 3))
        assert r == (8 if upper else 4), name
    scalings = {
        n: m.scaling["default"] for n, m in wrapped.named_modules() if hasattr(m, "scaling") and hasattr(m, "lora_A")
    }
    assert {round(s, 6) for s in scalings.values()} == {2.0, 4.0}  # 8/4 below, 32/8 above


@pytest.mark.parametrize("model_type", ["bert", "roberta", "distilbert"])
def test_layers_to_transform_adapts_only_those_layers(model_type):
    cfg = make_config(model_type, "default", VARIANTS["layers_to_transform-qkvd"])
    matched = models.matched_modules(tiny_classifier(model_type, 4), cfg)
    per_layer = 4 if model_type == "distilbert" else 6  # BERT's 'dense' is in attention.output, intermediate and output
    assert len(matched) == 2 * per_layer
    assert all(".2." in n or ".3." in n for n in matched)
    # counted from the top: the same layers of a LAYERS-deep model, whatever its depth
    top = dict(VARIANTS["layers_to_transform-qkvd"], layers_to_transform=[2 - LAYERS, 3 - LAYERS])
    assert (
        models.matched_modules(tiny_classifier(model_type, 4), make_config(model_type, "default", top)).keys()
        == matched.keys()
    )


def test_a_layer_the_model_does_not_have_is_refused_by_number():
    for wanted in ([LAYERS], [-LAYERS - 1]):
        cfg = make_config("bert", "default", dict(VARIANTS["layers_to_transform-qkvd"], layers_to_transform=wanted))
        with pytest.raises(LorafitError, match=rf"bert has {LAYERS} layers \(0 to {LAYERS - 1}, or -{LAYERS} to -1"):
            models.matched_modules(tiny_classifier("bert", 4), cfg)


@pytest.mark.parametrize("model_type", ["bert", "roberta", "distilbert"])
@pytest.mark.parametrize("head", ["default", "linear"])
def test_all_linear_leaves_the_head_to_full_training(model_type, head):
    """all-linear adapts the encoder's Linear layers only; head modules (incl. DistilBERT's pre_classifier) train fully."""
    model = tiny_classifier(model_type, 4, head)
    cfg = make_config(model_type, head, dict(target_modules="all-linear"))
    matched = models.matched_modules(model, cfg)
    assert {n.rsplit(".", 1)[-1] for n in matched} == LINEAR_NAMES[model_type]
    heads = budget.compute(cfg, 4, model=model).head_modules
    assert heads and not any(n == h or n.startswith(h + ".") for n in matched for h in heads)


def test_linear_head_is_smaller_for_roberta_and_distilbert():
    for mt in ("roberta", "distilbert"):
        lora = dict(target_modules=["Q", "V"])
        default = budget.compute(make_config(mt, "default", lora), 4, model=tiny_classifier(mt, 4, "default"))
        linear = budget.compute(make_config(mt, "linear", lora), 4, model=tiny_classifier(mt, 4, "linear"))
        assert linear.parts["head"] == 32 * 4 + 4
        assert default.parts["head"] == 32 * 32 + 32 + 32 * 4 + 4
    bert = budget.compute(
        make_config("bert", "linear", dict(target_modules=["Q", "V"])), 4, model=tiny_classifier("bert", 4, "linear")
    )
    assert bert.parts["head"] == 32 * 4 + 4


def test_reference_roberta_base_dora_rslora():
    cfg = load_config(
        None,
        [
            "model.name=roberta-base",
            "lora.r=4",
            "lora.alpha=8",
            "lora.target_modules=[query,value]",
            "lora.use_dora=true",
            "lora.use_rslora=true",
        ],
    )
    b = budget.compute(cfg, 4)  # no model: built on the meta device from the shipped roberta-base config
    assert b.total == 759_556
    assert b.parts == {"lora_A": 73_728, "lora_B": 73_728, "dora_magnitude": 18_432, "head": 593_668, "bias": 0}
    assert b.margin == 1_000_000 - 759_556
    budget.check(b)
    assert "759,556" in b.table()


def test_over_budget_raises():
    cfg = load_config(None, ["model.name=roberta-base", "lora.r=64", "lora.target_modules=[query,key,value,dense]"])
    b = budget.compute(cfg, 4)
    assert b.margin < 0
    with pytest.raises(BudgetExceeded, match="exceed budget.max_trainable=1,000,000"):
        budget.check(b)


def test_cli_budget_over_limit_exits_3_with_one_line_error(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lorafit",
            "budget",
            "--set",
            "model.name=roberta-base",
            "--set",
            "lora.r=64",
            "--set",
            "lora.target_modules=[query,key,value,dense]",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 3, proc.stderr
    for part in ("lora_A", "lora_B", "dora_magnitude", "head", "bias", "total", "OVER BUDGET"):
        assert part in proc.stdout
    assert "trainable parameters for roberta-base" in proc.stdout
    assert "attention.self.query" in proc.stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("lorafit: error:")
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("model_type", ["bert", "roberta", "distilbert"])
def test_unknown_target_lists_the_models_linear_modules(model_type):
    cfg = Config.model_validate({"lora": {"target_modules": ["q_proj"]}})
    model = tiny_classifier(model_type, 4)
    with pytest.raises(LorafitError) as err:
        budget.compute(cfg, 4, model=model)
    msg = str(err.value)
    assert "q_proj" in msg
    for name in LINEAR_NAMES[model_type]:
        assert repr(name) in msg, msg
    assert "'classifier'" not in msg and "'out_proj'" not in msg  # head modules are not offered as targets
    with pytest.raises(LorafitError):
        models.wrap(model, cfg)
