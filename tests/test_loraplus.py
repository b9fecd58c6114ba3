"""LoRA+ (`lora.loraplus_lr_ratio`): the B matrices learn faster than the A matrices, through the whole schedule and
across a resume."""

from __future__ import annotations

import shutil

import pytest

from lorafit.config import load_config
from lorafit.errors import LorafitError
from lorafit.training.recipe import run
from test_resume import RESUMABLE, Crash, assert_same_run, crash_at
from test_train import tiny_cfg

RATIO = 8.0


@pytest.fixture(autouse=True)
def no_report(monkeypatch):
    monkeypatch.setattr("lorafit.training.recipe.write_run_report", lambda folder: None)


def groups_by_kind(optimizer, model) -> dict[str, set[float]]:
    """The learning rates each kind of trainable parameter sees."""
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    kinds: dict[str, set[float]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            kind = (
                "lora_B" if "lora_B" in name else "lora_A" if "lora_A" in name else "vector" if p.ndim == 1 else "head"
            )
            kinds.setdefault(kind, set()).add(lr_of[id(p)])
    return kinds


def test_b_matrices_and_vectors_get_the_ratio(tiny_bert, small_csv, tmp_path, monkeypatch):
    from lorafit.training import recipe

    seen = {}
    real = recipe.make_optimizer

    def spy(model, lr, weight_decay, ratio=None):
        seen["opt"], seen["model"], seen["lr"] = real(model, lr, weight_decay, ratio), model, lr
        return seen["opt"]

    monkeypatch.setattr(recipe, "make_optimizer", spy)
    # a constant schedule: after the warm-up every group is back at its own peak when the run ends
    common = ["lora.use_dora=true", "train.scheduler=constant"]
    cfg = tiny_cfg(tiny_bert, small_csv, f"lora.loraplus_lr_ratio={RATIO}", *common)
    run(cfg, tmp_path / "run")
    peak = cfg.train.lr
    kinds = groups_by_kind(seen["opt"], seen["model"])
    assert sorted(kinds["lora_A"]) == pytest.approx([peak])
    assert sorted(kinds["lora_B"]) == pytest.approx([RATIO * peak])
    assert sorted(kinds["vector"]) == pytest.approx([RATIO * peak])  # DoRA magnitudes and the head's bias
    assert sorted(kinds["head"]) == pytest.approx([peak])

    run(tiny_cfg(tiny_bert, small_csv, *common), tmp_path / "plain")
    assert sorted(set().union(*groups_by_kind(seen["opt"], seen["model"]).values())) == pytest.approx([peak])


def test_a_loraplus_run_resumes_exactly(tiny_bert, small_csv, tmp_path):
    cfg = tiny_cfg(tiny_bert, small_csv, *RESUMABLE, f"lora.loraplus_lr_ratio={RATIO}")
    ref, out = tmp_path / "ref", tmp_path / "run"
    run(cfg, ref)
    with pytest.raises(Crash):
        run(cfg, out, on_eval=crash_at(9))
    run(cfg, out, resume=True)
    assert_same_run(ref, out)
    shutil.rmtree(out)


def test_a_bad_ratio_is_refused_in_one_line():
    with pytest.raises(LorafitError, match=r"lora.loraplus_lr_ratio: got -1: Input should be greater than 0"):
        load_config(None, ["lora.loraplus_lr_ratio=-1"])
