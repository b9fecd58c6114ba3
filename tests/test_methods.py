"""The PEFT methods besides LoRA (`method: adalora | ia3 | vera | fourierft | loha | lokr | oft | bitfit`): an exact budget for each,
counted on the weightless skeleton, and the whole life of a run (train, reload, resume, export) for each."""

from __future__ import annotations

import copy
import json
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import history, untimed
from lorafit import budget, models
from lorafit.config import METHODS, Config, load_config
from lorafit.errors import BudgetExceeded, LorafitError
from lorafit.inference.evaluate import evaluate_run
from lorafit.inference.export import export_merged
from lorafit.inference.loaded import load_run, load_runs
from lorafit.model_card import METHOD_NAMES
from lorafit.training.recipe import run
from test_budget import NAMES, _fill, tiny_classifier
from test_export import merged_logits, run_logits
from test_resume import RESUMABLE, Crash, crash_at
from test_train import tiny_cfg

OTHER_METHODS = [m for m in METHODS if m != "lora"]

# each method's options on the tiny 32-wide models, Q/K/V/D/F2 standing for the architecture's module names
OPTIONS = {
    "adalora": dict(target_modules=["Q", "V", "D"], init_r=4, target_r=2),
    "ia3": dict(target_modules=["K", "V", "F2"], feedforward_modules=["F2"]),
    "vera": dict(target_modules=["Q", "V"], r=8),
    "fourierft": dict(target_modules=["Q", "K", "V", "D"], n_frequency=64),
    "loha": dict(target_modules=["Q", "V"], r=2),
    "lokr": dict(target_modules=["Q", "V", "D"], r=2, decompose_both=True),
    "oft": dict(target_modules=["Q", "V"], block_size=8),
    "bitfit": dict(target_modules=["Q", "K", "V", "D", "F2"]),
}
ALL_LINEAR = {"fourierft": dict(n_frequency=64), "oft": dict(block_size=8)}
FF_NAME = {"bert": "output.dense", "roberta": "output.dense", "distilbert": "lin2"}


def method_config(method: str, model_type: str, head: str, options: dict) -> Config:
    names = NAMES[model_type] | {"F2": FF_NAME[model_type]}
    options = {k: _fill(v, names) if k in ("target_modules", "feedforward_modules") else v for k, v in options.items()}
    return Config.model_validate(
        {"model": {"name": f"tiny-{model_type}", "head": head}, "method": method, method: options}
    )


def skeleton(model_type: str, head: str) -> torch.nn.Module:
    with torch.device("meta"):
        return tiny_classifier(model_type, 3, head)


@pytest.mark.parametrize("model_type", ["bert", "roberta", "distilbert"])
@pytest.mark.parametrize("head", ["default", "linear"])
@pytest.mark.parametrize("method", OTHER_METHODS)
@pytest.mark.parametrize("targets", ["listed", "all-linear"])
def test_budget_equals_what_the_wrapped_model_trains(method, model_type, head, targets):
    options = OPTIONS[method] if targets == "listed" else ALL_LINEAR.get(method, {})
    cfg = method_config(method, model_type, head, options)
    computed = budget.compute(cfg, 3, model=skeleton(model_type, head))  # weightless, before any weights exist
    wrapped = models.wrap(tiny_classifier(model_type, 3, head), cfg)  # real weights
    assert computed.total == budget.count_trainable(wrapped) == sum(computed.parts.values())
    head_params = sum(p.numel() for n, p in wrapped.named_parameters() if p.requires_grad and "modules_to_save" in n)
    assert computed.parts["head"] == head_params > 0
    assert computed.total > head_params  # the method trains something besides the head
    assert computed.base_total == sum(p.numel() for p in tiny_classifier(model_type, 3, head).parameters())
    adapted = {n.removeprefix("base_model.model.") for n, m in wrapped.named_modules() if hasattr(m, "base_layer")}
    assert sum(e["modules"] for e in computed.per_module.values()) == len({a for a in adapted if "." in a})


def test_the_count_follows_each_method_own_arithmetic():
    """Independent of peft's counting: the per-layer formulas of the methods' papers, on tiny BERT (32 wide, 64 in the
    feed-forward, 4 layers), query and value adapted."""
    qv = ["Q", "V"]
    layers, d, head = 4, 32, 32 * 3 + 3  # BERT's own head: one Linear on the pooled first token
    cases = {
        ("adalora", (("init_r", 4), ("target_r", 2))): layers
        * 2
        * 4
        * (d + d + 1),  # P (r x in), Q (out x r), the r singular values
        ("ia3", ()): layers * 2 * d,  # one scale per output feature
        ("vera", (("r", 8),)): layers * 2 * (8 + d),  # lambda_d (rank) + lambda_b (outputs)
        ("fourierft", (("n_frequency", 64),)): layers * 2 * 64,
        ("loha", (("r", 2),)): layers * 2 * 2 * 2 * (d + d),  # two Hadamard factors, each an r x in and out x r pair
        ("oft", (("block_size", 8),)): layers * 2 * (d // 8) * (8 * 7 // 2),  # skew-symmetric blocks
        ("bitfit", ()): layers * 2 * d,  # one bias per output feature
    }
    for (method, extra), adapter in cases.items():
        cfg = method_config(method, "bert", "default", {"target_modules": qv, **dict(extra)})
        b = budget.compute(cfg, 3, model=skeleton("bert", "default"))
        assert b.total == adapter + head, method


@pytest.mark.parametrize("method", OTHER_METHODS)
def test_over_budget_is_refused_with_the_method_own_fix(method):
    cfg = method_config(method, "bert", "default", OPTIONS[method]).model_copy(
        update={"budget": Config().budget.model_copy(update={"max_trainable": 100})}
    )
    b = budget.compute(cfg, 3, model=skeleton("bert", "default"))
    with pytest.raises(BudgetExceeded, match=rf"exceed budget.max_trainable=100 .*{method}.target_modules"):
        budget.check(b)


def test_bad_method_options_are_one_line():
    with pytest.raises(LorafitError, match=r"unknown key 'vera.rank' \(did you mean 'vera.r'\?\)"):
        load_config(None, ["method=vera", "vera.rank=4"])
    with pytest.raises(LorafitError, match=r"oft.block_size: got 'big': Input should be a valid integer"):
        load_config(None, ["method=oft", "oft.block_size=big"])
    with pytest.raises(LorafitError, match=r"method: got 'dora': Input should be 'lora', 'adalora', 'ia3'"):
        load_config(None, ["method=dora"])
    with pytest.raises(LorafitError, match=r"feedforward_modules \['lin2'\] are not among target_modules"):
        load_config(None, ["method=ia3", "ia3.target_modules=[q_lin]", "ia3.feedforward_modules=[lin2]"])
    with pytest.raises(LorafitError, match=r"lora.loraplus_lr_ratio is LoRA\+, for method lora"):
        load_config(None, ["method=loha", "lora.loraplus_lr_ratio=8"])
    cfg = Config.model_validate(
        {"model": {"name": "tiny-bert"}, "method": "fourierft", "fourierft": {"target_modules": ["nope"]}}
    )
    with pytest.raises(LorafitError, match=r"fourierft.target_modules: \['nope'\] not found in bert"):
        budget.compute(cfg, 3, model=skeleton("bert", "default"))
    cfg = method_config("oft", "bert", "default", {"block_size": 5})  # 32 inputs are no multiple of 5
    with pytest.raises(LorafitError, match=r"^oft"):
        budget.compute(cfg, 3, model=skeleton("bert", "default"))


# ---------------------------------------------------------------------------------------------------------------------
# The life of a run, per method, on a tiny BERT

# the options of the run tests: the OPTIONS above with BERT's names, plus the method's own dropout where it has one
RUN_SETTINGS = {
    "adalora": ["adalora.target_modules=[query,value]", "adalora.init_r=4", "adalora.target_r=2", "adalora.every=2"],
    "ia3": ["ia3.target_modules=[key,value,output.dense]", "ia3.feedforward_modules=[output.dense]"],
    "vera": ["vera.target_modules=[query,value]", "vera.r=8", "vera.dropout=0.3"],
    "fourierft": ["fourierft.target_modules=[query,value]", "fourierft.n_frequency=64"],
    "loha": ["loha.target_modules=[query,value]", "loha.r=2", "loha.rank_dropout=0.3"],
    "lokr": ["lokr.target_modules=[query,value]", "lokr.r=2", "lokr.rank_dropout=0.3"],
    "oft": ["oft.target_modules=[query,value]", "oft.block_size=8", "oft.module_dropout=0.3"],
    "bitfit": ["bitfit.target_modules=[query,value,dense]"],
}


@pytest.fixture(autouse=True)
def no_report(monkeypatch):
    monkeypatch.setattr("lorafit.training.recipe.write_run_report", lambda folder: None)


def adapter_weights(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter" / "adapter_model.safetensors")


def initial_adapter(cfg: Config) -> dict[str, torch.Tensor]:
    """The adapter as the run starts it (same seed), keyed as the saved file keys it."""
    from peft import get_peft_model_state_dict

    label_names = ["World", "Sports", "Business", "Sci/Tech"]
    return get_peft_model_state_dict(models.wrap(models.build_model(cfg, 4, label_names), cfg))


@pytest.mark.parametrize("method", OTHER_METHODS)
def test_train_reload_resume_and_export(method, tiny_bert, small_csv, tmp_path):
    cfg = tiny_cfg(tiny_bert, small_csv, f"method={method}", *RUN_SETTINGS[method], *RESUMABLE)
    ref, out = tmp_path / "ref", tmp_path / "run"
    run(cfg, ref)
    budget_json = json.loads((ref / "budget.json").read_text())
    assert budget_json["method"] == method and budget_json["total"] == budget.compute(cfg, 4).total
    card = (ref / "adapter" / "README.md").read_text()
    assert f"- Method: {METHOD_NAMES[method]} (peft)" in card and f"\n- {method}\n" in card  # the text, a hub tag

    # training moved the adapter away from where it started
    start, trained = initial_adapter(cfg), adapter_weights(ref)
    adapter_keys = [k for k in trained if "classifier" not in k and k in start]
    assert adapter_keys, sorted(trained)
    # (AdaLoRA's saved factors are cut to the allocated ranks: a changed shape is a change too)
    assert any(trained[k].shape != start[k].shape or not torch.equal(trained[k], start[k]) for k in adapter_keys)

    # reloaded, it scores the test rows as the in-memory model did at the end of training
    metrics = json.loads((ref / "metrics.json").read_text())
    again = evaluate_run(load_run(ref, "fp32"), str(small_csv))
    assert again["loss"] == pytest.approx(metrics["test"]["loss"], abs=1e-5)
    assert again["accuracy"] == metrics["test"]["accuracy"]

    # in bf16, alone or sharing a base with other runs (where frozen layers are packed for oneDNN), it predicts alike
    texts = ["Stocks fell sharply on Monday.", "The team won the cup final.", "A new chip doubles battery life", ""]
    fp32 = run_logits(ref, texts)
    for loaded in (load_run(ref, "bf16"), load_runs([ref], "bf16", merge=False)[0]):
        assert np.abs(loaded.predict_logits(loaded.encode(texts)) - fp32).max() < 0.05

    # killed after a checkpoint, resumed: the same run exactly
    with pytest.raises(Crash):
        run(cfg, out, on_eval=crash_at(9))
    run(cfg, out, resume=True)
    resumed = adapter_weights(out)
    assert resumed.keys() == trained.keys()
    assert all(torch.equal(resumed[k], trained[k]) for k in trained)
    assert untimed(json.loads((out / "metrics.json").read_text())) == untimed(metrics)
    assert untimed(history(out)) == untimed(history(ref))
    shutil.rmtree(out)

    # merged into a plain transformers model, it predicts what the run predicts
    export_merged(ref, tmp_path / "merged")
    assert np.abs(merged_logits(tmp_path / "merged", texts) - fp32).max() < 1e-4


def test_a_skeleton_given_to_the_budget_is_left_unwrapped():
    model = skeleton("bert", "default")
    before = copy.deepcopy([n for n, _ in model.named_modules()])
    budget.compute(method_config("ia3", "bert", "default", OPTIONS["ia3"]), 3, model=model)
    assert [n for n, _ in model.named_modules()] == before


# ---------------------------------------------------------------------------------------------------------------------
# The planner crosses methods


def test_plan_crosses_every_method_and_lists_only_what_fits(tiny_bert, tmp_path, capsys):
    from lorafit import cli
    from lorafit.experiments.points import apply_point, read_points_file

    out = tmp_path / "plan.yaml"
    limit = 6_000
    args = ["plan", "--set", f"model.name={tiny_bert}", "--methods", "all", "--budget", str(limit), "-o", str(out)]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    for method in METHODS:
        assert re.search(rf"^  {method}: [1-9]\d* of \d+ layouts fit$", printed, re.M), method

    _, points = read_points_file(out)
    listed = [int(m.group(1).replace(",", "")) for m in re.finditer(r"# \d+: ([\d,]+) trainable", out.read_text())]
    assert len(points) == len(listed)
    base = load_config(None, [f"model.name={tiny_bert}"])
    seen = set()
    for point, count in zip(points, listed, strict=True):
        cfg = apply_point(base, point, "plan point")
        seen.add(cfg.method)
        real = models.wrap(models.build_model(cfg, 4), cfg)  # real weights: peft decides what trains
        assert budget.count_trainable(real) == count <= limit, point
    assert seen == set(METHODS)


def test_plan_refuses_an_unknown_method_in_one_line(capsys):
    from lorafit import cli

    assert cli.main(["plan", "--methods", "lora,dora"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--methods 'lora,dora': unknown method(s) ['dora']; expected" in err[0]


def test_adalora_moves_its_ranks_resumes_them_and_reloads_with_them(tiny_bert, small_csv, tmp_path):
    """Ranks start at init_r everywhere and end where the importance scores put them, target_r on average; a run
    killed while it allocates resumes to the same ranks and weights; the reloaded run has exactly those ranks."""
    settings = ["adalora.target_modules=[query,key,value]", "adalora.init_r=6", "adalora.target_r=2", "adalora.every=1"]
    settings += [
        "adalora.beta1=0.99",
        "adalora.beta2=0.99",
    ]  # long memories: a resume that lost them would cut elsewhere
    steps = ["train.max_steps=20", "eval.every=10", "checkpoint.every=4", "train.lr=2e-2"]
    cfg = tiny_cfg(tiny_bert, small_csv, "method=adalora", *settings, *steps)
    ref, out = tmp_path / "ref", tmp_path / "run"
    run(cfg, ref)
    ranks = json.loads((ref / "metrics.json").read_text())["training"]["adapter_ranks"]
    assert len(ranks) == 2 * 3  # 2 layers x query, key, value
    assert sum(ranks.values()) == 2 * len(ranks)  # the total budget is target_r per module
    assert set(ranks.values()) != {2} and max(ranks.values()) <= 6  # moved, unequally, within init_r

    with pytest.raises(Crash):
        run(cfg, out, on_eval=crash_at(10))  # after the step-8 checkpoint, in the middle of the allocation
    run(cfg, out, resume=True)
    assert json.loads((out / "metrics.json").read_text())["training"]["adapter_ranks"] == ranks
    resumed, trained = adapter_weights(out), adapter_weights(ref)
    assert all(torch.equal(resumed[k], trained[k]) for k in trained)

    model = load_run(ref, "fp32").model
    loaded = {
        n.removeprefix("base_model.model.").removesuffix(".lora_E.default"): p.shape[0]
        for n, p in model.named_parameters()
        if ".lora_E." in n
    }
    assert loaded == ranks


# ---------------------------------------------------------------------------------------------------------------------
# EVA initialisation (LoRA)


def test_eva_initialisation_is_data_driven_logged_reloads_and_resumes(tiny_bert, small_csv, tmp_path, capsys):
    eva = ["lora.init=eva", "lora.eva_batches=3", *RESUMABLE]
    cfg = tiny_cfg(tiny_bert, small_csv, *eva)
    ref, out = tmp_path / "ref", tmp_path / "run"
    run(cfg, ref)
    assert re.search(r"EVA initialisation: 3 training batches in \d+\.\ds", capsys.readouterr().out)
    metrics = json.loads((ref / "metrics.json").read_text())
    again = evaluate_run(load_run(ref, "fp32"), str(small_csv))
    assert again["loss"] == pytest.approx(metrics["test"]["loss"], abs=1e-5)

    # the start differs from LoRA's default (random A) and from another data set's EVA start: it comes from the data
    def start_a(config) -> torch.Tensor:
        from lorafit.training.recipe import setup

        model = setup(config).model
        return torch.cat([p.detach().flatten() for n, p in model.named_parameters() if "lora_A" in n])

    eva_start = start_a(cfg)
    assert not torch.allclose(eva_start, start_a(tiny_cfg(tiny_bert, small_csv, *RESUMABLE)))
    assert not torch.allclose(eva_start, start_a(tiny_cfg(tiny_bert, small_csv, *eva, "data.max_train_samples=40")))

    with pytest.raises(Crash):
        run(cfg, out, on_eval=crash_at(9))
    run(cfg, out, resume=True)
    resumed, trained = adapter_weights(out), adapter_weights(ref)
    assert all(torch.equal(resumed[k], trained[k]) for k in trained)
