"""Inference forward passes at once on a CPU (batching.predict_logits with `passes`, fast.device.concurrent_passes).

Two passes share one model: each must get its own batch's logits (the mean head's mask is per thread), a model
evaluated during training must come back in training mode, and a failing pass must fail the call.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import adapted_model, make_tiny_model, torch_threads
from lorafit import models
from lorafit.batching import encode, predict_logits
from lorafit.fast.device import concurrent_passes

CPU = torch.device("cpu")


@pytest.fixture()
def two_threads():
    with torch_threads(2):
        yield


@pytest.fixture(scope="module")
def rows(ag_sample):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models.builtin_model_dir())
    texts = ag_sample["text"].tolist()[:240]  # of every length: 30 batches of 8, each padded differently
    return encode(tokenizer, texts, np.zeros(len(texts), dtype=np.int64), 64), tokenizer.pad_token_id


def logits(model, rows, passes: int) -> np.ndarray:
    enc, pad_id = rows
    return predict_logits(model, enc, 8, pad_id, CPU, torch.float32, passes=passes)


@pytest.mark.parametrize("head", ["default", "mean"])
def test_two_passes_give_each_row_its_own_logits(head, rows, tmp_path, two_threads):
    model = adapted_model(make_tiny_model(tmp_path), head)
    alone = logits(model, rows, 1)
    for _ in range(3):  # the mean head reads its batch's mask from the encoder's hook: a shared one mixes batches up
        np.testing.assert_allclose(logits(model, rows, 2), alone, atol=1e-5, rtol=1e-5)
    assert torch.get_num_threads() == 2  # the passes' own thread counts stay in their threads


def test_a_model_in_training_comes_back_to_training_with_no_graph(rows, tmp_path, two_threads):
    model = adapted_model(make_tiny_model(tmp_path)).train()
    seen = []
    model.register_forward_hook(lambda m, a, out: seen.append((m.training, torch.is_grad_enabled())))
    logits(model, rows, 2)
    assert model.training
    assert len(seen) == 30 and set(seen) == {(False, False)}


def test_a_failing_pass_fails_the_call(rows, tmp_path, two_threads):
    model = adapted_model(make_tiny_model(tmp_path)).train()
    calls = []

    def fail_on_the_third(module, args, kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory, say")

    model.register_forward_pre_hook(fail_on_the_third, with_kwargs=True)
    with pytest.raises(RuntimeError, match="out of memory, say"):
        logits(model, rows, 2)
    assert model.training
    assert len(calls) < 30  # the batches not yet started were dropped


def test_passes_on_each_device(two_threads):
    assert concurrent_passes(CPU) == 2
    assert concurrent_passes(torch.device("cuda")) == 1
    torch.set_num_threads(1)
    assert concurrent_passes(CPU) == 1
