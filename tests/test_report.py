"""report.html in every run folder (self-contained, opened in headless Chromium), `lorafit report`, `lorafit compare`."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from lorafit.cli import main as cli
from lorafit.report.compare import compare
from lorafit.report.plots import lr_curve
from lorafit.report.run_files import read_run_files
from lorafit.report.run_report import PLOTS, write_run_report

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


def embedded_pngs(page: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_every_run_writes_a_self_contained_report(tiny_run):
    page = (tiny_run / "report.html").read_text(encoding="utf-8")
    pngs = embedded_pngs(page)
    assert len(pngs) == len(PLOTS) == len(re.findall(r"<img ", page))
    # the PNGs beside it, embedded
    assert sorted(pngs) == sorted((tiny_run / name).read_bytes() for name in PLOTS.values())
    assert all(p.startswith(b"\x89PNG\r\n\x1a\n") for p in pngs)
    # nothing to fetch: no external URL, stylesheet, script or font
    assert not re.search(r"(?:src|href)=\"(?!data:)", page) and "<script" not in page and "url(" not in page
    assert "http://" not in page and "https://" not in page
    budget = json.loads((tiny_run / "budget.json").read_text())
    for text in (
        f"{budget['total']:,}",
        f"{budget['parts']['lora_A']:,}",
        "attention.self.query",
        "target_modules:",
        "Confusion matrix",
        "Per-class F1",
        "Learning rate against",
        "Validation accuracy against",
        "validation loss against",
    ):
        assert text in page, text


def test_the_learning_rate_plot_replays_the_schedule(tiny_run):
    run = read_run_files(tiny_run)
    steps, lrs = lr_curve(run)
    assert steps == list(range(1, 13))
    for row in run.history:  # the replay agrees with every rate the training recorded
        assert lrs[row["step"] - 1] == pytest.approx(row["lr"], rel=1e-9)
    assert max(lrs) == pytest.approx(5e-3) and lrs[-1] < 1e-4  # warm-up to the peak, cosine down to ~0


def test_lorafit_report_rebuilds_it(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    for name in ["report.html", *PLOTS.values()]:
        (run / name).unlink()
    assert cli(["report", str(run)]) == 0
    assert "report.html" in capsys.readouterr().out
    assert (run / "report.html").is_file() and all((run / n).is_file() for n in PLOTS.values())
    assert len(embedded_pngs((run / "report.html").read_text())) == len(PLOTS)
    assert cli(["report", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lorafit: error:") and "not found" in err and "\n" not in err


def test_a_plotting_failure_warns_instead_of_losing_the_run(tiny_run, tmp_path, monkeypatch, capsys):
    import lorafit.report.run_report as report

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "report.html").unlink()
    monkeypatch.setattr(report, "plot_confusion", lambda *a: (_ for _ in ()).throw(ValueError("no fonts")))
    write_run_report(run)
    assert (
        "warning: report.html not written (ValueError: no fonts); rebuild it with `lorafit report RUN`"
        in capsys.readouterr().out
    )
    assert not (run / "report.html").exists()


@pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="headless Chromium is not installed (/usr/bin/chromium; Debian package `chromium`, which .ci/run installs)",
)
def test_report_opens_in_headless_chromium_with_every_image_loaded(tiny_run, tmp_path):
    from PIL import Image

    # the report itself has no script; a copy gets one that records, after load, whether each image decoded
    probe = tmp_path / "report.html"
    check = """<script>window.addEventListener('load', () => {
      const imgs = [...document.images];
      const out = document.createElement('pre'); out.id = 'image-check';
      out.textContent = JSON.stringify(imgs.map(i => ({ok: i.complete && i.naturalWidth > 0, w: i.naturalWidth, h: i.naturalHeight})));
      document.body.appendChild(out);
    });</script>"""
    probe.write_text(
        (tiny_run / "report.html").read_text(encoding="utf-8").replace("</body>", check + "</body>"), encoding="utf-8"
    )

    def chromium(*args):
        profile = tmp_path / f"profile-{len(list(tmp_path.iterdir()))}"  # a fresh profile per launch
        return subprocess.run(
            [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, probe.as_uri()],
            capture_output=True,
            text=True,
            timeout=120,
        )

    p = chromium("--dump-dom", "--virtual-time-budget=5000")
    assert p.returncode == 0, p.stderr[-2000:]
    found = re.search(r'<pre id="image-check">(.*?)</pre>', p.stdout, re.S)
    assert found, "the page script did not run: " + p.stdout[-500:]
    images = json.loads(found.group(1).replace("&quot;", '"'))
    assert len(images) == len(PLOTS) and all(i["ok"] and i["w"] > 100 and i["h"] > 100 for i in images), images

    shot = tmp_path / "shot.png"
    p = chromium(f"--screenshot={shot}", "--window-size=1200,1600")
    assert p.returncode == 0 and shot.is_file(), p.stderr[-2000:]
    img = Image.open(shot).convert("RGB")
    assert img.size == (1200, 1600)
    colours = img.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 200, "the screenshot is (nearly) blank"
    extrema = img.convert("L").getextrema()
    assert extrema[0] < 80 and extrema[1] > 200  # dark text and lines on a light page


def _fake_run(src: Path, dest: Path, config_changes: dict, val_losses: list[float], val_accuracy: float) -> Path:
    """A copy of a real run with another config and other results (comparisons read only the files)."""
    shutil.copytree(src, dest)
    cfg = yaml.safe_load((dest / "config.yaml").read_text())
    for key, value in config_changes.items():
        section, leaf = key.split(".")
        cfg[section][leaf] = value
    (dest / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    rows = [json.loads(line) for line in (dest / "history.jsonl").read_text().splitlines()]
    for row, loss in zip(rows, val_losses, strict=True):
        row["val_loss"] = loss
    (dest / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = json.loads((dest / "metrics.json").read_text())
    metrics["val"]["accuracy"] = val_accuracy
    metrics.pop("test")
    metrics.pop("baseline")  # as in a run from before lorafit trained baselines
    (dest / "metrics.json").write_text(json.dumps(metrics))
    return dest


def test_compare_runs(tiny_run, tmp_path, capsys):
    other = _fake_run(
        tiny_run, tmp_path / "dora-rslora", {"lora.use_dora": True, "lora.use_rslora": True}, [1.2, 0.9, 0.95], 0.75
    )
    out = tmp_path / "cmp"
    assert cli(["compare", str(tiny_run), str(other), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [
        "comparison.csv",
        "comparison.html",
        "comparison.md",
        "val_loss.png",
    ]
    rows = list(csv.DictReader(io.StringIO((out / "comparison.csv").read_text())))
    assert list(rows[0]) == [
        "run",
        "lora.use_dora",
        "lora.use_rslora",
        "trainable_params",
        "best_val_loss",
        "val_accuracy",
        "baseline_val_accuracy",
        "blend_val_accuracy",
        "test_accuracy",
        "wall_time_s",
    ]
    base = json.loads((tiny_run / "metrics.json").read_text())
    history = [json.loads(line) for line in (tiny_run / "history.jsonl").read_text().splitlines()]
    assert rows[0]["run"] == "run" and rows[0]["lora.use_dora"] == "False"
    assert float(rows[0]["val_accuracy"]) == base["val"]["accuracy"]
    assert float(rows[0]["test_accuracy"]) == base["test"]["accuracy"]
    assert float(rows[0]["baseline_val_accuracy"]) == base["baseline"]["val"]["accuracy"]
    assert float(rows[0]["best_val_loss"]) == min(h["val_loss"] for h in history)
    assert int(rows[0]["trainable_params"]) == base["training"]["trainable_parameters"]
    assert float(rows[0]["wall_time_s"]) == base["training"]["train_seconds"]
    assert (
        rows[1]["run"],
        rows[1]["lora.use_dora"],
        rows[1]["best_val_loss"],
        rows[1]["val_accuracy"],
        rows[1]["baseline_val_accuracy"],
        rows[1]["blend_val_accuracy"],
        rows[1]["test_accuracy"],
    ) == ("dora-rslora", "True", "0.9", "0.75", "", "", "")
    md = (out / "comparison.md").read_text()
    assert md in printed and "| dora-rslora | True | True |" in md and "| 0.7500 | — | — |" in md
    page = (out / "comparison.html").read_text()
    assert embedded_pngs(page) == [(out / "val_loss.png").read_bytes()] and "https://" not in page


def test_compare_a_sweep_folder(tiny_run, tmp_path, capsys):
    sweep = tmp_path / "sweeps" / "lr"
    for i, lr in enumerate([1e-3, 3e-3]):
        _fake_run(tiny_run, sweep / f"trial-{i}", {"train.lr": lr}, [1.0 - i / 10] * 3, 0.5 + i / 10)
    interrupted = sweep / "trial-2"
    shutil.copytree(tiny_run, interrupted)
    (interrupted / "INCOMPLETE").write_text("interrupted\n")
    (sweep / "notes").mkdir()  # not a run: ignored
    out = tmp_path / "cmp"
    assert cli(["compare", str(sweep), str(sweep / "trial-0"), "-o", str(out)]) == 0  # trial-0 twice counts once
    rows = list(csv.DictReader(io.StringIO((out / "comparison.csv").read_text())))
    assert [(r["run"], r["train.lr"]) for r in rows] == [("trial-0", "0.001"), ("trial-1", "0.003")]
    assert "skipped 1 unfinished run(s): trial-2" in capsys.readouterr().err


def test_compare_names_runs_apart_when_folder_names_repeat(tiny_run, tmp_path):
    for sweep in ("a", "b"):
        _fake_run(tiny_run, tmp_path / sweep / "trial-0", {"lora.r": 2 if sweep == "a" else 6}, [1.0] * 3, 0.5)
    compare([tmp_path / "a", tmp_path / "b"], tmp_path / "cmp")
    rows = list(csv.DictReader(io.StringIO((tmp_path / "cmp" / "comparison.csv").read_text())))
    assert [r["run"] for r in rows] == ["a/trial-0", "b/trial-0"] and [r["lora.r"] for r in rows] == ["2", "6"]


def test_compare_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for args, message in [
        ([str(tmp_path / "missing")], "not found"),
        ([str(tmp_path / "empty")], "neither a run folder"),
    ]:
        assert cli(["compare", *args, "-o", str(tmp_path / "cmp")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("lorafit: error:") and message in err and "\n" not in err
    assert not (tmp_path / "cmp").exists()
