"""lorafit's attention kernel (kernels.py, csrc/attention.c): the numbers SDPA gives, where it applies, and SDPA
wherever it cannot be built or does not apply."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny_model
from lorafit.fast import kernels

needs_kernel = pytest.mark.skipif(
    not kernels.cpu_supports(), reason="the attention kernel needs a CPU with AVX-512 BF16"
)


@pytest.fixture()
def kernel():
    if kernels.attention_kernel() is None:
        pytest.fail("AVX-512 BF16 is here but the kernel did not build (is a C compiler with OpenMP on PATH?)")
    return kernels.attention


def _qkv(b, h, lq, lk, d, seed=0, scale=2.0):
    """bf16 (b, h, l, d) views with the strides of a linear layer's output, as BertSelfAttention passes them."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(b, lk, 3 * h * d, generator=g) * scale).to(torch.bfloat16)
    q, k, v = (t.reshape(b, lk, h, d).transpose(1, 2) for t in x.split(h * d, -1))
    return q[:, :, :lq], k, v


def _padding_mask(b, lq, lk, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, lk + 1, (b,), generator=g)
    lengths[0] = lk
    keep = torch.arange(lk)[None, :] < lengths[:, None]
    return keep[:, None, None, :].expand(b, 1, lq, lk)  # what transformers' sdpa_mask gives an encoder


def _errors(out, q, k, v, mask):
    """Largest and mean error of `out` against float64 attention on the same bf16 inputs."""
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask).transpose(1, 2)
    diff = (out.double() - want).abs()
    return diff.max().item(), diff.mean().item()


@needs_kernel
@pytest.mark.parametrize("d", [32, 64, 128])
@pytest.mark.parametrize("lq,lk", [(1, 1), (1, 57), (15, 15), (16, 16), (17, 17), (33, 33), (130, 130)])
@pytest.mark.parametrize("masked", [False, True])
def test_kernel_is_as_accurate_as_sdpa(kernel, d, lq, lk, masked):
    """Every remainder of the 16-key and 4-query blocks, one query against many keys (the first-token layer), head
    sizes of MiniLM, BERT-base and the largest supported; against float64, the kernel's error is SDPA's."""
    q, k, v = _qkv(3, 2, lq, lk, d)
    mask = _padding_mask(3, lq, lk) if masked else None
    got = kernel(q, k, v, mask)
    assert got.shape == (3, lq, 2, d) and got.dtype == torch.bfloat16 and got.is_contiguous()
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
    (gmax, gmean), (smax, smean) = _errors(got, q, k, v, mask), _errors(sdpa, q, k, v, mask)
    assert gmax <= 2 * smax + 1e-3 and gmean <= 1.5 * smean + 1e-4, (gmax, smax, gmean, smean)


@needs_kernel
def test_kernel_masks_per_head_and_per_query(kernel):
    """A full (b, h, lq, lk) mask, different in every row, and a broadcast (1, 1, 1, lk) one."""
    q, k, v = _qkv(2, 3, 20, 20, 32, seed=1)
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(2, 3, 20, 20, generator=g) < 0.6
    mask[..., 0] = True  # every query sees at least one key
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
    assert _errors(kernel(q, k, v, mask), q, k, v, mask)[0] <= 2 * _errors(sdpa, q, k, v, mask)[0] + 1e-3
    row = torch.arange(20)[None, None, None, :] < 11
    assert _errors(kernel(q, k, v, row), q, k, v, row)[0] < 0.05


@needs_kernel
def test_kernel_gives_zeros_where_every_key_is_masked(kernel):
    q, k, v = _qkv(2, 2, 5, 5, 32)
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    mask[1, :, 2] = False
    out = kernel(q, k, v, mask)
    assert torch.equal(out[1, 2], torch.zeros(2, 32, dtype=torch.bfloat16)) and not out.isnan().any()
    assert _errors(out[0:1], q[0:1], k[0:1], v[0:1], mask[0:1])[0] < 0.05


@needs_kernel
def test_kernel_result_does_not_depend_on_the_thread_count(kernel):
    q, k, v = _qkv(4, 3, 40, 40, 32, seed=2)
    mask = _padding_mask(4, 40, 40, seed=2)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernel(q, k, v, mask)
        torch.set_num_threads(2)
        two = kernel(q, k, v, mask)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


@needs_kernel
def test_kernel_applies_only_to_what_it_computes(kernel):
    q, k, v = _qkv(2, 2, 8, 8, 32)
    mask = _padding_mask(2, 8, 8)
    assert kernels.attention_applies(q, k, v, mask) and kernels.attention_applies(q, k, v, None)
    assert not kernels.attention_applies(q.float(), k.float(), v.float(), mask)  # bf16 only
    assert not kernels.attention_applies(*_qkv(2, 2, 8, 8, 48), None)  # head size not a multiple of 32
    assert not kernels.attention_applies(q, k, v, torch.zeros(2, 1, 8, 8))  # additive float masks go to SDPA
    assert not kernels.attention_applies(q, k, v, mask[:, :, :, :4])  # a mask of the wrong length
    leaf = q.detach().requires_grad_()
    assert not kernels.attention_applies(leaf, k, v, mask)  # training needs gradients: SDPA
    with torch.no_grad():
        assert kernels.attention_applies(leaf, k, v, mask)


def test_kernel_builds_once_and_failures_fall_back_to_sdpa(tmp_path, monkeypatch):
    """The library is built once per source and flags into the cache folder; a compiler that fails leaves no
    library behind and turns the kernel off with one warning, and LORAFIT_KERNELS=0 turns it off."""
    monkeypatch.setenv("LORAFIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(kernels, "cpu_supports", lambda: True)
    kernels.attention_kernel.cache_clear()
    try:
        monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
        with pytest.warns(UserWarning, match="attention kernel unavailable.*'false' failed"):
            assert kernels.attention_kernel() is None
        assert not list((tmp_path / "cache").glob("*"))  # nothing half-written
        kernels.attention_kernel.cache_clear()
        monkeypatch.setenv("CC", "no-such-compiler-here")
        with pytest.warns(UserWarning, match="no C compiler 'no-such-compiler-here'"):
            assert kernels.attention_kernel() is None
        kernels.attention_kernel.cache_clear()
        monkeypatch.setenv("LORAFIT_KERNELS", "0")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert kernels.attention_kernel() is None
    finally:
        kernels.attention_kernel.cache_clear()


@needs_kernel
def test_kernel_library_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFIT_CACHE_DIR", str(tmp_path))
    lib = kernels._build("cc")
    assert lib.exists() and lib.parent == tmp_path and [p.name for p in tmp_path.iterdir()] == [lib.name]

    def no_compiler(*a, **k):
        raise AssertionError("rebuilt a cached kernel")

    monkeypatch.setattr(kernels.subprocess, "run", no_compiler)
    assert kernels._build("cc") == lib


@needs_kernel
def test_saved_runs_predict_through_the_kernel_as_through_sdpa(small_csv, tmp_path, monkeypatch, kernel):
    """A bf16 run with 32-wide heads: loaded for prediction, every attention call (the first-token last layer's
    included) goes to the kernel, and the logits are SDPA's up to bf16 rounding; speed.fast_attention=false is SDPA."""
    from lorafit.batching import encode, predict_logits
    from lorafit.config import load_config
    from lorafit.inference.loaded import load_run
    from lorafit.training.recipe import run

    model = make_tiny_model(tmp_path / "model", hidden=64)
    run(
        load_config(
            None,
            [
                f"model.name={model}",
                f"data.source={small_csv}",
                "model.max_length=32",
                "lora.target_modules=[query,value]",
                "train.precision=bf16",
                "train.max_steps=4",
                "train.batch_size=16",
                "data.val_fraction=0.2",
            ],
        ),
        tmp_path / "r",
    )
    fast = load_run(tmp_path / "r", merge=True)
    config = tmp_path / "r" / "config.yaml"
    # without the padding skip too: that runs SDPA through lorafit_attention (PLAIN_ATTENTION), which pads back per text
    config.write_text(
        config.read_text()
        .replace("fast_attention: true", "fast_attention: false")
        .replace("skip_padding: true", "skip_padding: false")
    )
    plain = load_run(tmp_path / "r", merge=True)
    assert (
        fast.model.config._attn_implementation == "lorafit_kernel" and plain.model.config._attn_implementation == "sdpa"
    )
    calls = []
    monkeypatch.setattr(kernels, "attention", lambda *a: calls.append(a[0].shape[2]) or kernel(*a))
    texts = [f"news item number {i} about markets and games " * (1 + i % 3) for i in range(40)]
    enc = encode(plain.tokenizer, texts, np.zeros(40, dtype=np.int64), 32)
    a = predict_logits(plain.model, enc, 16, plain.tokenizer.pad_token_id, plain.device, plain.dtype)
    assert not calls
    b = predict_logits(fast.model, enc, 16, fast.tokenizer.pad_token_id, fast.device, fast.dtype)
    assert len(calls) == 2 * 3 and calls[1::2] == [1, 1, 1]  # 2 layers x 3 batches; the last layer: one query
    np.testing.assert_allclose(a, b, atol=0.05)
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.95
