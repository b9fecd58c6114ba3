"""`model.dropout`: one rate for every dropout inside the base model (hidden states, attention, head) while training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import make_tiny_model
from lorafit import models
from lorafit.config import load_config
from lorafit.errors import LorafitError

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest


def built(folder, *overrides):
    return models.build_model(load_config(None, [f"model.name={folder}", *overrides]), num_labels=4)


def dropout_rates(model: nn.Module) -> set[float]:
    return {m.p for m in model.modules() if isinstance(m, nn.Dropout)}


@pytest.mark.parametrize(
    "model_type, head",
    [("bert", "default"), ("roberta", "default"), ("distilbert", "default"), ("bert", "mean"), ("roberta", "linear")],
)
def test_every_dropout_of_the_model_takes_the_rate(model_type, head, tmp_path):
    folder = make_tiny_model(tmp_path, model_type)
    assert 0.1 in dropout_rates(built(folder, f"model.head={head}"))  # the model's own (DistilBERT's head has 0.2)
    for rate in (0.3, 0.0):
        assert dropout_rates(built(folder, f"model.head={head}", f"model.dropout={rate}")) == {rate}


@pytest.mark.parametrize("model_type", ["bert", "roberta", "distilbert"])
def test_without_dropout_training_mode_is_deterministic(model_type, tmp_path):
    """Attention dropout is no nn.Dropout call in the SDPA path: only the config reaches it."""
    cfg = load_config(
        None, [f"model.name={make_tiny_model(tmp_path, model_type)}", "model.dropout=0", "lora.dropout=0"]
    )
    model = models.wrap(models.build_model(cfg, num_labels=4), cfg).train()
    batch = {"input_ids": torch.randint(5, 1000, (4, 12)), "attention_mask": torch.ones(4, 12, dtype=torch.long)}
    torch.manual_seed(0)
    first = model(**batch).logits
    torch.manual_seed(1)
    torch.testing.assert_close(model(**batch).logits, first, rtol=0, atol=0)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, first, rtol=1e-6, atol=1e-6)


def test_a_config_without_dropout_settings_is_a_one_line_error():
    class NoDropout:
        model_type = "toy"

    with pytest.raises(LorafitError, match=r"model.dropout .* 'toy' .* leave model.dropout null") as e:
        models.set_dropout(NoDropout(), 0.0)
    assert "\n" not in str(e.value)
