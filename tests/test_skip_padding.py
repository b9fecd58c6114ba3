"""Inference shortcuts for served and predicted batches: the encoder on real tokens only (`speed.skip_padding`) and
unmerged LoRA layers as one fused matmul-add (`speed.lean_lora`).

Both must leave every logit as it was (up to float rounding where the arithmetic differs), apply only where
nothing needs a gradient, and really do less: the linear layers see the batch's real tokens, not its padding.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import adapted_model, make_tiny_model
from lorafit import models
from lorafit.fast.patches import (
    Packing,
    first_token_last_layer,
    lean_lora,
    skip_padding,
    use_fast_dora,
    use_lorafit_attention,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest

# lengths differ a lot, so a padded batch is mostly padding
TEXTS = [
    "Oil prices rise",
    "The long report on markets, elections and football, released on Tuesday by the ministry of finance.",
    "Hi",
    "Shares of the chip maker fell after its quarterly results missed estimates.",
]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(models.builtin_model_dir())


def rows_seen(model: torch.nn.Module) -> list[int]:
    """Records how many rows each call of the first layer's query projection gets."""
    seen: list[int] = []
    query = next(m for n, m in model.named_modules() if n.endswith("layer.0.attention.self.query"))
    query.register_forward_hook(lambda m, args, out: seen.append(args[0].reshape(-1, args[0].shape[-1]).shape[0]))
    return seen


@pytest.mark.parametrize("head", ["default", "linear", "mean"])
@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_the_encoder_runs_on_real_tokens_and_gives_the_same_logits(model_type, head, tmp_path, tokenizer):
    folder = make_tiny_model(tmp_path, model_type)
    padded, packed = adapted_model(folder, head), adapted_model(folder, head)
    first_token_last_layer(padded), first_token_last_layer(packed)  # the fast path's last layer, where the head allows
    assert skip_padding(packed) and not hasattr(padded.base_model.model, "padded_forward")
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    seen = rows_seen(packed)
    with torch.inference_mode():
        want, got = padded(**batch).logits, packed(**batch).logits
    assert seen == [int(batch["attention_mask"].sum())] < [batch["attention_mask"].numel()]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_bf16_through_the_kernel_is_unchanged_by_skipping_padding(tmp_path, tokenizer):
    """On a bf16 CPU with the attention kernel (what `lorafit serve` runs): the same logits to the last bit, since
    every row is computed by the same ops and padding only ever reaches attention as masked keys."""
    from lorafit.fast import kernels

    if kernels.attention_kernel() is None:
        pytest.skip("the attention kernel needs AVX-512 BF16 and a C compiler")
    folder = make_tiny_model(tmp_path, "bert", hidden=64)
    padded, packed = adapted_model(folder).to(torch.bfloat16), adapted_model(folder).to(torch.bfloat16)
    for m in (padded, packed):
        assert use_lorafit_attention(m, cheap_dropout=False, kernel=True) == "lorafit_kernel"
        first_token_last_layer(m)
    skip_padding(packed)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.inference_mode():
        torch.testing.assert_close(packed(**batch).logits, padded(**batch).logits, atol=0, rtol=0)


def test_training_and_batches_without_padding_keep_the_padded_path(tmp_path, tokenizer):
    model = adapted_model(make_tiny_model(tmp_path, "bert"))
    skip_padding(model)
    seen = rows_seen(model)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    model.train()
    model(**batch).logits.sum().backward()  # with a gradient: padded, as training has always run
    model.eval()
    with torch.inference_mode():
        model(**tokenizer(TEXTS[:1] * 3, padding=True, return_tensors="pt"))  # nothing to skip
        model(**tokenizer(TEXTS[1:2], return_tensors="pt"))  # one text
    assert seen == [batch["attention_mask"].numel(), 3 * len(tokenizer(TEXTS[0])["input_ids"]), seen[2]]


def test_distilbert_is_left_as_it_is(tmp_path):
    assert not skip_padding(adapted_model(make_tiny_model(tmp_path, "distilbert")))


def test_packing_maps_each_padded_position_to_a_real_token_of_its_own_text():
    keys = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    p = Packing(keys)
    assert p.rows.tolist() == [0, 1, 2, 4, 8, 9, 10, 11]
    assert p.first.tolist() == [0, 3, 4]
    gathered = p.gather.view(3, 4)
    assert gathered[keys].tolist() == list(range(8))  # real positions read their own packed row
    for text, row in enumerate(gathered):  # padding reads a row of the same text (hidden by the mask)
        assert set(row.tolist()) <= set(range(int(p.first[text]), int(p.first[text]) + int(keys[text].sum())))
    hidden = torch.randn(3, 4, 5)
    torch.testing.assert_close(p.unpack(p.pack(hidden)), hidden * keys[..., None])
    assert Packing.of(torch.ones(3, 1, 4, 4, dtype=torch.bool)) is None  # no padding: nothing to gain
    mostly_real = torch.ones(4, 1, 10, 10, dtype=torch.bool)
    mostly_real[0, ..., -1] = False  # one padded position in 40: the gathers would cost more than they save
    assert Packing.of(mostly_real) is None
    assert Packing.of(keys[:, None, None, :].expand(3, 1, 4, 4)) is not None
    assert Packing.of(torch.zeros(3, 1, 4, 4)) is None  # an additive float mask: not ours to read


def test_lean_lora_gives_peft_s_logits_and_leaves_the_rest_to_peft(tmp_path, tokenizer):
    folder = make_tiny_model(tmp_path, "bert")
    plain, lean = adapted_model(folder), adapted_model(folder)
    n = lean_lora(lean)
    assert n == sum(1 for m in plain.modules() if type(m).__name__ == "Linear" and hasattr(m, "lora_A"))
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.inference_mode():
        torch.testing.assert_close(lean(**batch).logits, plain(**batch).logits, atol=1e-5, rtol=1e-5)
    lean.train()  # training: peft's forward, so the adapter gets its gradient
    lean(**batch).logits.sum().backward()
    grads = [p.grad for n, p in lean.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_lean_lora_skips_dora(tmp_path):
    model = adapted_model(make_tiny_model(tmp_path, "bert"), use_dora=True)
    use_fast_dora(model)
    assert lean_lora(model) == 0


def test_served_runs_use_both_and_answer_as_the_padded_peft_model(tiny_run, tmp_path):
    """A run loaded to serve gets both shortcuts; switched off in its config, the same logits come from peft's
    padded forward."""
    import shutil

    from lorafit.inference.loaded import load_runs

    slow_folder = shutil.copytree(tiny_run, tmp_path / "no-shortcuts")
    config = slow_folder / "config.yaml"
    text = config.read_text()
    assert "skip_padding: true" in text and "lean_lora: true" in text
    config.write_text(
        text.replace("skip_padding: true", "skip_padding: false").replace("lean_lora: true", "lean_lora: false")
    )
    fast, slow = load_runs([tiny_run, slow_folder])
    assert any(hasattr(m, "padded_forward") for m in fast.model.modules())
    assert any(hasattr(m, "peft_forward") for m in fast.model.modules())
    assert not any(hasattr(m, "padded_forward") or hasattr(m, "peft_forward") for m in slow.model.modules())
    np.testing.assert_allclose(
        fast.predict_logits(fast.encode(TEXTS)), slow.predict_logits(slow.encode(TEXTS)), atol=1e-5, rtol=1e-5
    )
