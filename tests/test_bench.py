"""`lorafit bench`: the FLOP count behind its FLOP/s column, the table's ratios, the docs file it keeps, and one
small end-to-end run of two pipelines (slow: real MiniLM)."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from lorafit.experiments import bench


def test_forward_flops_counts_every_matmul_of_a_bert_layer():
    cfg = SimpleNamespace(hidden_size=4, intermediate_size=8, num_hidden_layers=2)
    lengths = np.array([3, 5])
    # per token and layer: q, k, v, o (4·h·h) and the feed-forward (2·h·i) multiply-adds; attention: QK^T and PV
    linear = 2 * 2 * (4 * 4 * 4 + 2 * 4 * 8) * (3 + 5)
    attention = 2 * 2 * 2 * 4 * (3**2 + 5**2)
    assert bench.forward_flops(lengths, cfg) == linear + attention


def _result(name, train, predict, acc=0.5):
    return dict(
        pipeline=name,
        train_samples_per_s=train,
        train_tokens_per_s=train * 50,
        predict_samples_per_s=predict,
        peak_rss_mb=1000.0,
        accuracy=acc,
        train_flops_per_s=1e11,
        samples=640,
    )


def test_table_gives_ratios_against_the_reference_of_the_same_run():
    text = bench.table(
        [_result("reference", 10.0, 40.0), _result("lorafit", 50.0, 200.0)], {"fp32": 1e11, "bf16": 4e11}, None
    )
    row = next(line for line in text.splitlines() if line.startswith("| lorafit"))
    assert "50.0 (5.0×)" in row and "200.0 (5.0×)" in row
    ref = next(line for line in text.splitlines() if line.startswith("| reference"))
    assert "×" not in ref


def test_docs_file_keeps_the_other_sections(tmp_path):
    out = tmp_path / "benchmarks.md"
    bench._write_section(out, "first table", 1280, 1000, None)
    bench._write_section(out, "ten minutes", 1280, 2000, 10)
    bench._write_section(out, "second table", 1280, 1000, None)  # the same kind of run replaces its own section
    text = out.read_text()
    assert (
        text.count("## throughput, 1280 training samples") == 1 and "second table" in text and "first table" not in text
    )
    assert "## time-to-accuracy, 10 minutes" in text and "ten minutes" in text


@pytest.mark.slow
def test_bench_runs_two_pipelines_and_writes_the_table(tmp_path):
    out = tmp_path / "bench.md"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "lorafit",
            "bench",
            "--train-samples",
            "64",
            "--predict-samples",
            "64",
            "--pipelines",
            "reference",
            "lorafit",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=540,
    )  # under the per-test 600 s
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [
        line for line in out.read_text().splitlines() if line.startswith("| reference") or line.startswith("| lorafit")
    ]
    assert len(rows) == 2
    cells = rows[1].split("|")
    assert float(cells[2].split()[0]) > 0 and cells[2].strip().endswith("×)")  # lorafit's samples/s and its ratio
