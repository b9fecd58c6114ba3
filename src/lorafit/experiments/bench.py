"""`lorafit bench`: the reference Trainer recipe, the tuned Trainer, and lorafit's own path, side by side.

Each pipeline runs in its own subprocess (so peak RSS is its own), one after the other, on the same model,
data, LoRA configuration and number of training samples; the table reports ratios against the reference.
Absolute numbers swing with machine load; the ratios from one run are what to compare.

lorafit's own modules are imported inside the pipeline that uses them, so the Trainer pipelines' processes load
none of them and their import time and memory are their own.
"""

from __future__ import annotations

import json
import math
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PIPELINES = ("reference", "tuned", "lorafit")
DESCRIPTION = {
    "reference": "HF Trainer, padding='max_length' 128, fp32",
    "tuned": "HF Trainer, dynamic padding, bf16, group_by_length",
    "lorafit": "lorafit default path (length-grouped, bf16-stored base, fast dropout and DoRA, first-token last layer, merged and packed prediction, attention kernel)",
}
# The reference study's adapter: DoRA + rsLoRA, r 4, alpha 8, dropout 0.6, query/value, batch 32, lr 2e-4.
REFERENCE_LORA = dict(
    r=4, alpha=8, dropout=0.6, target_modules=["query", "value"], use_dora=True, use_rslora=True, init="gaussian"
)
BATCH, LR, MAX_LENGTH = 32, 2e-4, 128


def _data(train_samples: int, predict_samples: int, seed: int = 0):
    import pandas as pd

    from ..data import builtin_path

    train = pd.read_parquet(builtin_path("builtin:ag_news_sample"))
    test = pd.read_parquet(builtin_path("builtin:ag_news_sample_test"))
    train = (
        train.sample(n=min(train_samples, len(train)), random_state=seed)
        if train_samples
        else train.sample(frac=1.0, random_state=seed)
    )
    test = test.iloc[: min(predict_samples, len(test))]
    return train.text.tolist(), train.label.to_numpy(), test.text.tolist(), test.label.to_numpy()


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def forward_flops(lengths: np.ndarray, cfg) -> float:
    """Matmul FLOPs of one forward pass over texts of these (unpadded) lengths, for a BERT-like encoder."""
    h, i, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    per_token = n * 2 * (4 * h * h + 2 * h * i)
    attention = n * 2 * 2 * h * (lengths.astype(np.float64) ** 2).sum()
    return float(per_token * lengths.sum() + attention)


def _trainer_pipeline(
    kind: str, texts, labels, test_texts, test_labels, max_steps: int | None, minutes: float | None, seed: int
):
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from ..models import builtin_model_dir

    torch.manual_seed(seed)
    path = builtin_model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=4)
    lc = REFERENCE_LORA
    model = get_peft_model(
        model,
        LoraConfig(
            task_type="SEQ_CLS",
            r=lc["r"],
            lora_alpha=lc["alpha"],
            lora_dropout=lc["dropout"],
            target_modules=lc["target_modules"],
            use_dora=True,
            use_rslora=True,
            init_lora_weights="gaussian",
        ),
    )
    pad = "max_length" if kind == "reference" else False

    def tokenize(batch):
        return tok(batch["text"], truncation=True, max_length=MAX_LENGTH, padding=pad)

    train_ds = Dataset.from_dict({"text": texts, "label": labels.tolist()}).map(
        tokenize, batched=True, remove_columns=["text"]
    )
    test_ds = Dataset.from_dict({"text": test_texts, "label": test_labels.tolist()}).map(
        tokenize, batched=True, remove_columns=["text"]
    )
    args = TrainingArguments(
        output_dir=str(Path("/tmp") / f"lorafit-bench-{kind}"),
        per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=64 if kind == "reference" else 128,
        learning_rate=LR,
        lr_scheduler_type="cosine",
        warmup_steps=0.1,
        weight_decay=0.1,
        num_train_epochs=1,
        max_steps=max_steps,
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=seed,
        bf16=(kind == "tuned"),
        dataloader_num_workers=0,
        train_sampling_strategy="group_by_length" if kind == "tuned" else "random",
        disable_tqdm=True,
    )

    class Deadline(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            if minutes and time.perf_counter() - start > minutes * 60:
                control.should_training_stop = True

    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        data_collator=DataCollatorWithPadding(tok) if pad is False else None,
        callbacks=[Deadline()],
    )
    start = time.perf_counter()
    out = trainer.train()
    train_s = time.perf_counter() - start
    steps = out.global_step
    t = time.perf_counter()
    pred = trainer.predict(test_ds)
    predict_s = time.perf_counter() - t
    # with train_sampling_strategy='group_by_length', transformers 5 also length-groups predict(): the predictions
    # come back out of dataset order, with label_ids in that same order
    acc = float((pred.predictions.argmax(-1) == pred.label_ids).mean())
    return dict(
        steps=steps,
        samples=min(steps * BATCH, len(texts) * math.ceil(steps * BATCH / len(texts))),
        train_s=train_s,
        predict_s=predict_s,
        accuracy=acc,
        model_config=model.config,
    )


def _lorafit_pipeline(texts, labels, test_texts, test_labels, max_steps: int | None, minutes: float | None, seed: int):
    import tempfile

    import pandas as pd

    from ..config import load_config
    from ..inference.loaded import load_run
    from ..training.recipe import run

    tmp = Path(tempfile.mkdtemp(prefix="lorafit-bench-"))
    pd.DataFrame({"text": texts, "label": labels}).to_parquet(tmp / "train.parquet")
    # validation is not what is timed here: 32 rows, scored once at the end
    pd.DataFrame({"text": test_texts[:32], "label": test_labels[:32]}).to_parquet(tmp / "val.parquet")
    lc = REFERENCE_LORA
    overrides = [
        f"data.source={tmp / 'train.parquet'}",
        "data.label_names=[World, Sports, Business, Sci/Tech]",
        f"data.val_source={tmp / 'val.parquet'}",
        f"lora.r={lc['r']}",
        f"lora.alpha={lc['alpha']}",
        f"lora.dropout={lc['dropout']}",
        "lora.target_modules=[query,value]",
        "lora.use_dora=true",
        "lora.use_rslora=true",
        "lora.init=gaussian",
        f"train.batch_size={BATCH}",
        f"train.lr={LR}",
        "train.weight_decay=0.1",
        "train.scheduler=cosine",
        "train.warmup_ratio=0.1",
        "eval.every=1000000",
        "eval.early_stopping.patience=0",
        f"train.seed={seed}",
        # with a time budget lorafit plans its schedule to the deadline (train.max_seconds) and makes as many passes
        # over the data as fit; without one it trains the same number of steps as the Trainer pipelines
        *([f"train.max_seconds={minutes * 60}", "train.epochs=1000"] if minutes else [f"train.max_steps={max_steps}"]),
    ]
    res = run(load_config(None, overrides), tmp / "run")
    run = load_run(tmp / "run", merge=True)
    enc = run.encode(test_texts, test_labels)
    t = time.perf_counter()
    logits = run.predict_logits(enc)
    predict_s = time.perf_counter() - t
    acc = float((logits.argmax(-1) == test_labels).mean())
    return dict(
        steps=res.steps,
        samples=res.steps * BATCH,
        train_s=res.train_seconds,
        predict_s=predict_s,
        accuracy=acc,
        model_config=run.model.config,
    )


def run_one(kind: str, train_samples: int, predict_samples: int, minutes: float | None, seed: int) -> dict:
    """One pipeline, in this process; returns its measurements as a JSON-able dict."""
    texts, labels, test_texts, test_labels = _data(train_samples if not minutes else 0, predict_samples, seed)
    from ..models import builtin_model_dir  # noqa: F401  (fail early if the model package is missing)

    # one epoch over the data sets the schedule; with a time budget, training also stops at the deadline
    steps = math.ceil(len(texts) / BATCH)
    if kind == "lorafit":
        r = _lorafit_pipeline(texts, labels, test_texts, test_labels, steps, minutes, seed)
    else:
        r = _trainer_pipeline(kind, texts, labels, test_texts, test_labels, steps, minutes, seed)
    peak_rss_mb = _peak_rss_mb()  # the pipeline's own: what follows is the bench's bookkeeping
    cfg = r.pop("model_config")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(builtin_model_dir())
    lens = lambda ts: np.array([len(x) for x in tok(ts, truncation=True, max_length=MAX_LENGTH)["input_ids"]])  # noqa: E731
    train_len = np.resize(lens(texts), r["samples"])  # the samples seen: the training texts in order, pass after pass
    test_len = lens(test_texts)
    r.update(
        pipeline=kind,
        train_samples_per_s=r["samples"] / r["train_s"],
        train_tokens_per_s=float(train_len.sum()) / r["train_s"],
        predict_samples_per_s=len(test_texts) / r["predict_s"],
        train_flops_per_s=2
        * forward_flops(train_len, cfg)
        / r["train_s"],  # forward + activation gradients; frozen weights get none
        predict_flops_per_s=forward_flops(test_len, cfg) / r["predict_s"],
        peak_rss_mb=peak_rss_mb,
    )
    return r


def matmul_peak() -> dict[str, float]:
    """This machine's matmul throughput at MiniLM's shapes (1920x384 @ 384x1536), fp32 and bf16, in FLOP/s."""
    import torch

    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(1920, 384, dtype=dtype), torch.randn(384, 1536, dtype=dtype)
        for _ in range(5):
            a @ b
        n, t = 0, time.perf_counter()
        while time.perf_counter() - t < 1.5:
            a @ b
            n += 1
        out[name] = 2 * 1920 * 384 * 1536 * n / (time.perf_counter() - t)
    return out


def machine() -> str:
    import torch

    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from ..fast.device import cpu_has_bf16

    return f"{cpu}, {torch.get_num_threads()} threads, AVX-512 BF16: {'yes' if cpu_has_bf16() else 'no'}, torch {torch.__version__}, Python {platform.python_version()}"


def table(results: list[dict], peak: dict[str, float], minutes: float | None) -> str:
    ref = next((r for r in results if r["pipeline"] == "reference"), None)
    lines = [
        "| pipeline | train samples/s | train tokens/s | predict samples/s | peak RSS MB | test accuracy | train FLOP/s (% of bf16 peak) | training samples |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ratio = lambda k, r=r: f" ({r[k] / ref[k]:.1f}×)" if ref and r is not ref else ""  # noqa: E731
        lines.append(
            f"| {r['pipeline']}: {DESCRIPTION[r['pipeline']]} | {r['train_samples_per_s']:.1f}{ratio('train_samples_per_s')} | {r['train_tokens_per_s']:.0f} "
            f"| {r['predict_samples_per_s']:.1f}{ratio('predict_samples_per_s')} | {r['peak_rss_mb']:.0f} | {100 * r['accuracy']:.2f}% "
            f"| {r['train_flops_per_s'] / 1e9:.0f} G ({100 * r['train_flops_per_s'] / peak['bf16']:.0f}%) | {r['samples']} |"
        )
    head = (
        f"Matmul peak at MiniLM shapes: fp32 {peak['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s. "
        "Train FLOP/s counts the model's FLOPs (the full forward over the unpadded tokens plus activation gradients) "
        "for every pipeline alike, whatever a pipeline skips or pads."
    )
    if minutes:
        head += (
            f" Each pipeline trained for {minutes:g} wall-clock minutes: the Trainer pipelines schedule one epoch over the "
            "data (they cannot finish it in time), lorafit plans its schedule to the deadline (train.max_seconds) and makes "
            "as many passes as fit."
        )
    return head + "\n\n" + "\n".join(lines)


def main(
    train_samples: int = 1280,
    predict_samples: int = 1000,
    minutes: float | None = None,
    seed: int = 0,
    out: Path | None = Path("docs/benchmarks.md"),
    pipelines=PIPELINES,
) -> list[dict]:
    peak = matmul_peak()
    results = []
    for kind in pipelines:
        print(f"bench: {kind} ({DESCRIPTION[kind]}) ...", flush=True)
        cmd = [
            sys.executable,
            "-m",
            "lorafit.experiments.bench",
            kind,
            str(train_samples),
            str(predict_samples),
            str(minutes or 0),
            str(seed),
        ]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"bench pipeline {kind} failed:\n{p.stderr[-3000:]}")
        results.append(json.loads(p.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(
            f"  {r['train_samples_per_s']:.1f} train samples/s, {r['predict_samples_per_s']:.1f} predict samples/s, accuracy {r['accuracy']:.4f}, peak RSS {r['peak_rss_mb']:.0f} MB",
            flush=True,
        )
    text = table(results, peak, minutes)
    print(text)
    if out:
        _write_section(out, text, train_samples, predict_samples, minutes)
    return results


def _write_section(out: Path, text: str, train_samples: int, predict_samples: int, minutes: float | None) -> None:
    """Replace (or add) this kind of run's section in docs/benchmarks.md, keeping the others."""
    key = f"time-to-accuracy, {minutes:g} minutes" if minutes else f"throughput, {train_samples} training samples"
    section = (
        f"## {key}\n\n"
        f"Measured {time.strftime('%Y-%m-%d')} on {machine()}.\n"
        f"Model all-MiniLM-L6-v2 (builtin:minilm); adapter DoRA + rsLoRA r 4, alpha 8, dropout 0.6 on query/value; batch 32, lr 2e-4, cosine, warm-up 10%; "
        f"prediction and accuracy on the first {predict_samples} rows of builtin:ag_news_sample_test.\n"
        f"Reproduce: `lorafit bench"
        + (f" --budget-minutes {minutes:g}" if minutes else f" --train-samples {train_samples}")
        + (f" --predict-samples {predict_samples}" if predict_samples != 1000 else "")
        + "`\n\n"
        + text
        + "\n"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    old = (
        out.read_text()
        if out.exists()
        else "# Benchmarks\n\nWritten by `lorafit bench`; ratios are against the reference pipeline measured in the same run.\n"
    )
    parts = old.split("\n## ")
    kept = [parts[0].rstrip() + "\n"] + ["## " + p.rstrip() + "\n" for p in parts[1:] if not p.startswith(key)]
    out.write_text("\n".join(kept + [section]))


if __name__ == "__main__":
    kind, n_train, n_pred, minutes, seed = (
        sys.argv[1],
        int(sys.argv[2]),
        int(sys.argv[3]),
        float(sys.argv[4]) or None,
        int(sys.argv[5]),
    )
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from ..models import quiet_transformers

    quiet_transformers()
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        result = run_one(kind, n_train, n_pred, minutes, seed)
    print(json.dumps(result))
