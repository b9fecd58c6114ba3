"""`lorafit sweep --search optuna`: TPE with pruning, a resumable local study, and one study shared by two
worker processes through a real PostgreSQL server (a private cluster started here on a loopback port)."""

from __future__ import annotations

import csv
import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import TINY_SWEEP_SETTINGS
from lorafit.config import load_config
from lorafit.errors import LorafitError
from lorafit.experiments.search import read_space, run_search

optuna = pytest.importorskip("optuna")
from optuna.trial import TrialState  # noqa: E402

TINY = TINY_SWEEP_SETTINGS
SPACE = """\
lora.r: [2, 4]
train.lr: {low: 1.0e-3, high: 1.0e-2, log: true}
lora.target_modules: [[query, value], [query, key, value]]
"""


@pytest.fixture()
def base_yaml(tiny_bert, small_csv, tmp_path) -> Path:
    import yaml

    cfg = load_config(None, [f"model.name={tiny_bert}", f"data.source={small_csv}", *TINY])
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


@pytest.fixture()
def space(tmp_path) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(SPACE)
    return path


def test_space_files_are_checked_before_any_trial(base_yaml, tmp_path):
    base = load_config(base_yaml)
    f = tmp_path / "s.yaml"
    f.write_text(SPACE)
    dims = read_space(f, base)
    assert [(d.key, d.kind) for d in dims] == [
        ("lora.r", "categorical"),
        ("train.lr", "float"),
        ("lora.target_modules", "categorical"),
    ]
    f.write_text("lora.rank: [2, 4]\n")
    with pytest.raises(LorafitError, match=r"unknown key\(s\) 'lora.rank' \(did you mean 'lora.r'\?\)"):
        read_space(f, base)
    f.write_text(
        "train.lr: {low: 0, high: 1.0e-2, log: true}\nlora.dropout: [0.1, 2.0]\nlora.r: {low: 8, high: 2}\nlora.alpha: 3\n"
    )
    with pytest.raises(LorafitError) as err:
        read_space(f, base)
    msg = str(err.value)
    assert (
        "4 problem(s)" in msg
        and "log: true needs low > 0" in msg
        and "lora.dropout=2.0" in msg
        and "low < high" in msg
        and "lora.alpha: got 3" in msg
    )


def test_local_search_runs_n_trials_and_a_rerun_trains_nothing(base_yaml, space, tmp_path, capsys):
    from lorafit import cli

    out = tmp_path / "search"
    args = ["sweep", "-c", str(base_yaml), "--search", "optuna", "--trials", "3", "--space", str(space), "-o", str(out)]
    assert cli.main(args) == 0
    stdout = capsys.readouterr().out
    assert "0 of 3 trial(s) claimed" in stdout and "this worker trained 3 trial(s) [0, 1, 2]" in stdout
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{out / 'study.db'}")
    assert sorted(t.number for t in study.trials) == [0, 1, 2]
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(int(r["trial"]) for r in rows) == [0, 1, 2]
    assert set(rows[0]) >= {
        "trial",
        "lora.r",
        "train.lr",
        "lora.target_modules",
        "status",
        "trainable",
        "best_val_loss",
        "val_accuracy",
    }
    for t in study.trials:
        if t.state == TrialState.COMPLETE:
            folder = out / f"trial-{t.number:04d}-s42"
            assert (folder / "metrics.json").exists() and t.user_attrs["lorafit"]["runs"] == [folder.name]

    assert cli.main(args) == 0
    stdout = capsys.readouterr().out
    assert "3 of 3 trial(s) claimed" in stdout and "trained 0 trial(s)" in stdout
    assert len(optuna.load_study(study_name="search", storage=f"sqlite:///{out / 'study.db'}").trials) == 3


def test_pruned_trials_stop_early_and_leave_no_run_folder(base_yaml, space, tmp_path):
    out = tmp_path / "pruned"
    # a pruner that prunes every trial at its first evaluation (val loss > 0)
    run_search(load_config(base_yaml), out, space, trials=2, pruner=optuna.pruners.ThresholdPruner(upper=0.0))
    study = optuna.load_study(study_name="pruned", storage=f"sqlite:///{out / 'study.db'}")
    assert [t.state for t in study.trials] == [TrialState.PRUNED, TrialState.PRUNED]
    assert all(list(t.intermediate_values) == [1] for t in study.trials)  # pruned after the step-1 evaluation of 2
    assert not list(out.glob("trial-*")) and not list(out.glob(".trial-*"))
    md = (out / "results.md").read_text()
    assert md.count("pruned at step 1") == 2


def test_a_trial_asked_after_all_n_are_claimed_is_closed_unrun(base_yaml, space, tmp_path, monkeypatch):
    """Two workers can both see N-1 claimed trials and ask; trial numbers are unique, so the later one steps back."""
    import lorafit.experiments.search as sweep_mod

    url = f"sqlite:///{tmp_path / 'shared.db'}"
    other = optuna.create_study(storage=url, study_name="race")
    other.ask()  # another worker's trial, still running: with --trials 1 nothing is left for us
    real, calls = sweep_mod._claims, []

    def claims(study, before=None):
        calls.append(before)
        if len(calls) == 1:  # our start-up check ran just before the other worker asked for its trial
            return 0
        return real(study, before)

    monkeypatch.setattr(sweep_mod, "_claims", claims)
    ran = run_search(load_config(base_yaml), tmp_path / "w", space, trials=1, storage=url, study_name="race")
    assert ran == 0
    trials = optuna.load_study(study_name="race", storage=url).trials
    assert [t.state for t in trials] == [TrialState.RUNNING, TrialState.FAIL]
    assert trials[1].user_attrs["lorafit"] == {"status": "surplus"} and not trials[1].params
    assert not list((tmp_path / "w").glob("trial-*"))
    # a worker with another space cannot join this study
    other_space = tmp_path / "other.yaml"
    other_space.write_text("lora.r: [8]\n")
    with pytest.raises(LorafitError, match="study 'race' was started with a different space"):
        run_search(load_config(base_yaml), tmp_path / "w2", other_space, trials=1, storage=url, study_name="race")


# ---------------------------------------------------------------------------------------------------------------------
# PostgreSQL


def _pg_binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(
        glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
        key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0,
    )
    return candidates[-1] if candidates else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    """A private PostgreSQL cluster in a temp dir, on a loopback port, trust auth; stopped and removed afterwards."""
    initdb, pg_ctl = _pg_binary("initdb"), _pg_binary("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip(
            "PostgreSQL server binaries (initdb, pg_ctl) not found; install the Debian package postgresql (.ci/run does)"
        )
    root = Path(tempfile.mkdtemp(prefix="lorafit-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        shutil.chown(root, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", _free_port()

    def pg(*args, check=True):
        return subprocess.run(as_user + list(args), capture_output=True, text=True, check=check, timeout=120)

    started = False
    try:
        pg(initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "--no-locale", "-E", "UTF8", "--no-sync")
        pg(
            pg_ctl,
            "-D",
            str(data),
            "-l",
            str(root / "server.log"),
            "-w",
            "-t",
            "60",
            "-o",
            f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50",
            "start",
        )
        started = True
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    except subprocess.CalledProcessError as e:
        log = (root / "server.log").read_text() if (root / "server.log").exists() else ""
        raise RuntimeError(f"could not start PostgreSQL: {e.stderr}\n{log}") from e
    finally:
        if started:
            pg(pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(root, ignore_errors=True)


def test_two_workers_on_one_postgres_study_run_n_trials_each_exactly_once(
    postgres_url, base_yaml, space, tmp_path, children
):
    n = 5
    workers = [tmp_path / "worker1", tmp_path / "worker2"]  # as if on two machines: separate sweep folders

    def cmd(out):
        return [
            sys.executable,
            "-m",
            "lorafit",
            "sweep",
            "-c",
            str(base_yaml),
            "--search",
            "optuna",
            "--trials",
            str(n),
            "--space",
            str(space),
            "--storage",
            postgres_url,
            "--study",
            "shared",
            "-o",
            str(out),
        ]

    # both at once, 600 s for the two (the per-test limit); their output goes to files, so neither blocks on a full pipe
    procs = children.run_all([cmd(w) for w in workers], "two sweep workers sharing a PostgreSQL study", 600)
    outputs = [(p.stdout, p.stderr) for p in procs]
    for p, (_out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]

    study = optuna.load_study(study_name="shared", storage=postgres_url)
    counted = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert sorted(t.number for t in counted) == list(range(n))  # n trials in total, none lost, none twice
    for t in study.trials:
        if t not in counted:  # only a worker that lost the race for the last trial leaves one, unrun
            assert t.state == TrialState.FAIL and t.user_attrs["lorafit"] == {"status": "surplus"}

    trained = {}
    for w in workers:
        for folder in w.glob("trial-*"):
            assert folder.name not in trained, f"{folder.name} trained by both workers"
            trained[folder.name] = w
    complete = {f"trial-{t.number:04d}-s42" for t in counted if t.state == TrialState.COMPLETE}
    assert set(trained) == complete  # every finished trial has its one run folder; pruned ones have none

    ran = [int(out.split("this worker trained ")[1].split(" ")[0]) for out, _ in outputs]
    assert sum(ran) == n and all(r >= 1 for r in ran), ran  # both workers took part
    for w in workers:  # either worker's table shows the whole study
        with open(w / "results.csv", newline="") as f:
            assert sorted(int(r["trial"]) for r in csv.DictReader(f)) == list(range(n))


def test_storage_errors_are_one_line(base_yaml, space, tmp_path):
    port = _free_port()  # nothing listens there
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "lorafit",
            "sweep",
            "-c",
            str(base_yaml),
            "--search",
            "optuna",
            "--trials",
            "1",
            "--space",
            str(space),
            "--storage",
            f"postgresql+psycopg2://u:secret@127.0.0.1:{port}/x",
            "--study",
            "s",
            "-o",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 2 and p.stderr.startswith("lorafit: error: --storage postgresql+psycopg2://u:***@127.0.0.1")
    assert p.stderr.count("\n") == 1 and "secret" not in p.stderr
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "lorafit",
            "sweep",
            "-c",
            str(base_yaml),
            "--search",
            "optuna",
            "--trials",
            "1",
            "--space",
            str(space),
            "--storage",
            "sqlite:///x.db",
            "-o",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 2 and "--storage needs --study NAME" in p.stderr and p.stderr.count("\n") == 1
