"""`lorafit fit --minutes M`: trials picked by validation only, the winner trained to the deadline, the deadline
kept, and a killed fit resumed to a finished run.

The real budgets are minutes; here a tiny BERT, a few seconds, and a trial floor of one second stand in for them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import TINY_SETTINGS, wait_for
from lorafit import runs
from lorafit.batching import encode
from lorafit.cli import main as cli
from lorafit.config import load_config
from lorafit.experiments import fit as fit_mod
from lorafit.experiments.tables import read_record

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest

# two recipes that differ enough for validation to tell them apart within a second or two of training
TINY_CANDIDATES = [{"train.lr": 1e-6}, {"model.head": "mean", "train.lr": 2e-2}]
CLASS_WORDS = ["football", "election", "market", "software"]
SECONDS = 36.0  # enough for two trials and a final run of a tiny model on a slow 2-core machine


@pytest.fixture()
def settings(tiny_bert, ag_sample, tmp_path) -> list[str]:
    data = tmp_path / "small.csv"
    df = ag_sample.groupby("label", group_keys=False).head(60).reset_index(drop=True)
    # a class word in every text: learnable by a random tiny encoder in a few dozen steps
    df["text"] = [f"{CLASS_WORDS[y]} {t}" for y, t in zip(df["label"], df["text"], strict=True)]
    df.to_csv(data, index=False)
    return [
        f"model.name={tiny_bert}",
        f"data.source={data}",
        f"data.test_source={data}",
        *TINY_SETTINGS,
        "speed.num_threads=1",
        "eval.early_stopping.patience=0",
    ]


@pytest.fixture()
def tiny_fit(monkeypatch):
    monkeypatch.setattr(fit_mod, "CANDIDATES", TINY_CANDIDATES)
    monkeypatch.setattr(fit_mod, "MIN_TRIAL_SECONDS", 1.0)


def test_trials_pick_by_validation_and_the_winner_trains_to_the_deadline(
    settings, tiny_fit, tmp_path, capsys, monkeypatch
):
    from lorafit.training import recipe

    encoded = []
    monkeypatch.setattr(recipe, "encode", lambda tok, texts, *a: encoded.append(len(texts)) or encode(tok, texts, *a))
    out = tmp_path / "fit"
    start = time.perf_counter()
    final = fit_mod.fit(load_config(None, settings), SECONDS / 60, out)
    taken = time.perf_counter() - start
    assert taken <= SECONDS + fit_mod.grace(SECONDS / 60), taken
    assert final == out / "final" and runs.is_complete(final)
    bars = capsys.readouterr().err
    assert "fit:" in bars and "train:" not in bars and "eval" not in bars  # one bar for the whole budget
    assert (final / "report.html").is_file()  # a deadline-planned schedule still gets its report

    state = json.loads((out / "fit.json").read_text())
    trials = [out / name for name in state["trial_seconds"]]
    assert len(trials) == 2 and all(runs.is_complete(t) for t in trials)
    for t in trials:  # selection never sees the test rows, and trials skip the baseline and the blend
        metrics = json.loads((t / "metrics.json").read_text())
        assert "test" not in metrics and "baseline" not in metrics and "blend" not in metrics
    # the best by validation accuracy, a tie broken by the lower validation loss (on a slow machine both tiny
    # recipes can end level on accuracy)
    records = {t.name: read_record(t) for t in trials}
    rank = {name: (r["val_accuracy"], -r["best_val_loss"]) for name, r in records.items()}
    best = max(rank, key=rank.get)
    assert state["final"]["point"] == json.loads((out / best / "point.json").read_text())["point"]
    assert rank[best] > min(rank.values())  # the candidates really differ, so the pick means something

    metrics = json.loads((final / "metrics.json").read_text())
    assert "test" in metrics and "baseline" in metrics
    # the final run tried a blend with a TF-IDF model (kept or not, said in metrics.json)
    assert "blend" in metrics and ("val" in metrics["blend"]) == (final / "blend").is_dir()
    trained = metrics["training"]["train_seconds"]
    assert trained == pytest.approx(state["final"]["max_seconds"], abs=1.0)  # the deadline, not the epochs, ended it
    assert metrics["training"]["epochs"] < fit_mod.LONG_ENOUGH

    # the trials tokenised the training and validation rows once between them; the final (which also reads the
    # test rows, so its data differ) once more
    assert len(encoded) == 2 + 3, encoded

    table = (out / "results.md").read_text()
    assert table.count("| trial |") == 2 and table.count("| final |") == 1
    capsys.readouterr()
    assert cli(["compare", str(out), "-o", str(tmp_path / "cmp")]) == 0  # a normal sweep folder
    assert "final" in capsys.readouterr().out


def test_a_fit_too_short_for_trials_trains_the_base_config_to_the_deadline(settings, tmp_path, monkeypatch):
    """With the real trial floor, seconds of budget buy no trial: one trial would select nothing."""
    monkeypatch.setattr(fit_mod, "CANDIDATES", [{}, *TINY_CANDIDATES])
    monkeypatch.setattr(fit_mod, "UNMEASURED_FIXED_SECONDS", 6.0)
    out = tmp_path / "fit"
    start = time.perf_counter()
    final = fit_mod.fit(load_config(None, settings), SECONDS / 60, out)
    taken = time.perf_counter() - start
    assert taken <= SECONDS + fit_mod.grace(SECONDS / 60), taken
    state = json.loads((out / "fit.json").read_text())
    assert state["trial_seconds"] == {} and state["final"]["point"] == {}
    # what is left after the fixed cost and the final run's evaluations, timed on this machine before it starts
    assert SECONDS - 6.0 - 5.0 < state["final"]["max_seconds"] < SECONDS - 6.0
    metrics = json.loads((final / "metrics.json").read_text())
    assert metrics["training"]["train_seconds"] == pytest.approx(state["final"]["max_seconds"], abs=1.0)
    assert (out / "results.md").read_text().count("| final |") == 1


def test_a_killed_fit_resumes_to_a_finished_run(settings, tmp_path):
    """Killed in its final run, the fit continues from the final run's checkpoint and keeps the finished trials."""
    out = tmp_path / "fit"
    args = ["fit", "--minutes", str(SECONDS / 60), *sum((["--set", s] for s in settings), []), "-o", str(out)]
    script = (
        "import sys\n"
        "from lorafit.experiments import fit\n"
        f"fit.CANDIDATES = {TINY_CANDIDATES!r}; fit.MIN_TRIAL_SECONDS = 1.0\n"
        "from lorafit.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    log = tmp_path / "stderr.txt"
    with open(log, "wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", script, *args], env=env, stdout=stderr, stderr=stderr)
    checkpoints = out / "final" / "checkpoints"
    try:
        wait_for(lambda: checkpoints.is_dir() and any(checkpoints.glob("step-*.pt")), proc, "the final run", 300, log)
        assert proc.poll() is None, f"the fit ended before the kill: {log.read_text(errors='replace')[-1500:]}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert runs.is_incomplete(out / "final")
    state = json.loads((out / "fit.json").read_text())
    trial_points = {name: (out / name / "point.json").read_text() for name in state["trial_seconds"]}

    q = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=300)
    assert q.returncode == 0, q.stderr[-2000:]
    assert "resuming from" in q.stdout and "fit trial" not in q.stdout  # no trial trained again
    assert runs.is_complete(out / "final")
    assert {name: (out / name / "point.json").read_text() for name in trial_points} == trial_points
    assert json.loads((out / "fit.json").read_text())["final"] == state["final"]


def test_bad_fits_are_one_line(settings, tiny_fit, tmp_path, capsys, monkeypatch):
    sets = sum((["--set", s] for s in settings), [])
    cases = [
        (["--minutes", "0"], "expected a positive number of minutes"),
        (["--minutes", "1", "--budget", "10"], "none of fit's 2 candidate recipes"),
    ]
    for extra, message in cases:
        assert cli(["fit", *extra, *sets, "-o", str(tmp_path / "f")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "fit.json").write_text(
        json.dumps({"minutes": 5, "spent_seconds": 0, "trial_seconds": {}, "final": None})
    )
    from lorafit.experiments.sweep_folder import check_base

    check_base(tmp_path / "g", load_config(None, settings))
    assert cli(["fit", "--minutes", "1", *sets, "-o", str(tmp_path / "g")]) == 2
    assert "holds a fit of --minutes 5, not 1" in capsys.readouterr().err


def test_the_upper_layers_layout_comes_first_where_the_model_names_its_layers():
    """On the embedded MiniLM the first candidate (what a fit too short for trials trains) adapts only the top three
    encoder layers, and the budget counts those alone; a DistilBERT, whose layers have other names, leaves it out with
    a note, and the base config comes first."""
    points, notes = fit_mod.candidates(load_config(None, []))
    first = points[0]
    assert first.overrides == fit_mod.UPPER_LAYERS and not notes
    # the six Linear layers of each of the top three of MiniLM's six layers: 3 modules of each kind
    assert {kind: row["modules"] for kind, row in first.budget.per_module.items()} == {
        kind: 3
        for kind in (
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
            "intermediate.dense",
            "output.dense",
        )
    }
    assert first.budget.total == 16 * 3 * (4 * (384 + 384) + 2 * (384 + 1536)) + 1540  # A and B at r 16, the head
    distil = load_config(None, ["model.name=distilbert-base-uncased", "budget.max_trainable=2000000"])
    points, notes = fit_mod.candidates(distil)
    assert points[0].overrides == {} and "target_modules" in notes[0] and "q_lin" in notes[0]
