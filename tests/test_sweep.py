"""`lorafit sweep` over grids and plans: run folders per point, skipped over-budget points, resume, tables, seeds."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_SWEEP_SETTINGS
from lorafit import cli
from lorafit.errors import LorafitError
from lorafit.experiments.points import describe, expand, parse_grid_arg, point_name, read_points_file
from lorafit.runs import is_complete

TINY = TINY_SWEEP_SETTINGS


def tiny_args(model_dir, data_csv, *extra):
    sets = [f"model.name={model_dir}", f"data.source={data_csv}", *TINY, *extra]
    return [a for s in sets for a in ("--set", s)]


def sweep(capsys, *args) -> tuple[int, str, str]:
    code = cli.main(["sweep", *args])
    out, err = capsys.readouterr()
    return code, out, err


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_grid_values_are_yaml_items():
    assert parse_grid_arg("lora.r=2,4,8") == ("lora.r", [2, 4, 8])
    assert parse_grid_arg("train.lr=1e-4,2e-4") == ("train.lr", [1e-4, 2e-4])
    assert parse_grid_arg("lora.target_modules=[query,value],[query,key,value]") == (
        "lora.target_modules",
        [["query", "value"], ["query", "key", "value"]],
    )
    with pytest.raises(LorafitError, match="expected KEY=V1,V2"):
        parse_grid_arg("lora.r")
    points = expand([{"lora.use_dora": True}, {"lora.use_dora": False}], {"lora.r": [2, 4]})
    assert len(points) == 4 and points[0] == {"lora.use_dora": True, "lora.r": 2}
    with pytest.raises(LorafitError, match="both by a point and by the grid"):
        expand([{"lora.r": 2}], {"lora.r": [4]})
    # folder names: readable, stable, and different for different values
    assert point_name({"lora.r": 4, "lora.target_modules": ["query", "value"]}).startswith(
        "r=4_target_modules=query+value-"
    )
    assert point_name({"lora.r": 4}) == point_name({"lora.r": 4}) != point_name({"lora.r": 8})


def test_descriptions_use_leaf_names_unless_two_keys_share_one():
    assert describe({"lora.r": 16, "train.lr": 0.002}) == "r=16 lr=0.002"
    # the fit's layout sets two dropouts: read by leaf name alone they would look like one setting given twice
    assert describe({"lora.r": 16, "model.dropout": 0.0, "lora.dropout": 0.0}) == (
        "r=16 model.dropout=0.0 lora.dropout=0.0"
    )
    assert describe({}) == "(base config)"


def test_sweep_files(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("lora.r: [2, 4]\n")
    assert read_points_file(f) == ({"lora.r": [2, 4]}, [])
    f.write_text("grid: {lora.r: [2]}\npoints:\n- {lora.use_dora: true}\n")
    assert read_points_file(f) == ({"lora.r": [2]}, [{"lora.use_dora": True}])
    f.write_text("grid: {lora.r: 2}\n")
    with pytest.raises(LorafitError, match="non-empty list"):
        read_points_file(f)
    f.write_text("grid: {lora.r: [2]}\nextra: 1\n")
    with pytest.raises(LorafitError, match="unknown section"):
        read_points_file(f)


def test_grid_sweep_skips_over_budget_points_first_and_resumes_without_retraining(
    tiny_bert, small_csv, tmp_path, capsys
):
    out = tmp_path / "sweeps" / "g"
    # r=4 on query,key,value,dense (3,972) is over a 3,000 budget; the other three points fit
    args = [
        *tiny_args(tiny_bert, small_csv, "budget.max_trainable=3000"),
        "--grid",
        "lora.r=2,4",
        "--grid",
        "lora.target_modules=[query,value],[query,key,value,dense]",
        "-o",
        str(out),
    ]
    code, stdout, _ = sweep(capsys, *args)
    assert code == 0
    head, _, rest = stdout.partition("===")
    assert "4 point(s) x 1 seed(s); 1 over budget (skipped), 0 run(s) finished earlier, 3 to train" in head
    assert "skipped, over budget: r=4 target_modules=[query, key, value, dense]: 3,972 trainable > 3,000" in head
    runs = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(runs) == 3 and all(is_complete(r) for r in runs)
    assert all(json.loads((r / "point.json").read_text())["wall_seconds"] > 0 for r in runs)

    rows = read_csv(out / "results.csv")
    assert [r["status"] for r in rows] == ["done", "done", "done", "over budget"]
    assert set(rows[0]) >= {
        "lora.r",
        "lora.target_modules",
        "trainable",
        "best_val_loss",
        "val_accuracy",
        "epochs",
        "wall_s",
        "runs",
    }
    losses = [float(r["best_val_loss"]) for r in rows[:3]]
    assert losses == sorted(losses)
    assert rows[3]["trainable"] == "3972" and rows[3]["best_val_loss"] == ""
    for r in rows[:3]:
        metrics = json.loads((out / r["runs"] / "metrics.json").read_text())
        assert int(r["trainable"]) == metrics["training"]["trainable_parameters"]
        assert float(r["val_accuracy"]) == pytest.approx(metrics["val"]["accuracy"])
    md = (out / "results.md").read_text()
    assert "| r | target_modules | status | trainable | best val loss |" in md and md.count("\n| ") == 5

    before = {r.name: (r / "metrics.json").stat().st_mtime_ns for r in runs}
    code, stdout, _ = sweep(capsys, *args)
    assert code == 0
    assert "3 run(s) finished earlier, 0 to train" in stdout and "===" not in stdout
    assert {r.name: (r / "metrics.json").stat().st_mtime_ns for r in runs} == before
    assert read_csv(out / "results.csv") == rows


def test_seeds_repeat_each_point_and_tables_show_mean_and_std(tiny_bert, small_csv, tmp_path, capsys):
    out = tmp_path / "s"
    code, stdout, _ = sweep(
        capsys,
        *tiny_args(tiny_bert, small_csv),
        "--grid",
        "lora.r=2",
        "--seeds",
        "2",
        "--metric",
        "val_accuracy",
        "-o",
        str(out),
    )
    assert code == 0
    assert sorted(p.name[-3:] for p in out.iterdir() if p.is_dir()) == ["s42", "s43"]
    (row,) = read_csv(out / "results.csv")
    assert row["seeds"] == "2" and row["best_val_loss_std"] != "" and row["val_accuracy_std"] != ""
    a, b = (json.loads((out / name / "metrics.json").read_text())["val"]["accuracy"] for name in row["runs"].split())
    assert float(row["val_accuracy"]) == pytest.approx((a + b) / 2)
    assert "±" in (out / "results.md").read_text() and "sorted by val_accuracy (higher is better)" in stdout


def test_a_failed_point_does_not_stop_the_others_and_is_retried(tiny_bert, small_csv, tmp_path, capsys, monkeypatch):
    import lorafit.experiments.sweep_folder
    import lorafit.training.recipe

    real_run = lorafit.experiments.sweep_folder.run

    def flaky(cfg, out, **kwargs):
        if cfg.lora.r == 2:
            raise LorafitError("the training loss became nan at step 1; lower train.lr")
        return real_run(cfg, out, **kwargs)

    out = tmp_path / "f"
    args = [*tiny_args(tiny_bert, small_csv), "--grid", "lora.r=2,4", "-o", str(out)]
    monkeypatch.setattr(lorafit.experiments.sweep_folder, "run", flaky)
    code, _, err = sweep(capsys, *args)
    last = err.rstrip("\n").split("\n")[-1].split("\r")[-1]  # after the progress bars
    assert code == 2 and last.startswith("lorafit: error: 1 of 2 run(s) failed (the training loss became nan")
    assert "Traceback" not in err
    rows = read_csv(out / "results.csv")
    assert [r["status"][:7] for r in rows] == ["done", "failed:"]
    monkeypatch.setattr(lorafit.experiments.sweep_folder, "run", real_run)
    code, stdout, _ = sweep(capsys, *args)
    assert code == 0 and "1 run(s) finished earlier, 1 to train" in stdout
    assert [r["status"] for r in read_csv(out / "results.csv")] == ["done", "done"]


def test_an_interrupted_point_continues_from_its_checkpoint(tiny_bert, small_csv, tmp_path, capsys, monkeypatch):
    import lorafit.experiments.sweep_folder
    import lorafit.training.recipe

    real = lorafit.training.recipe.final_metrics

    def crash(*a, **k):  # after the last step's checkpoint, before the run folder is complete
        raise LorafitError("simulated crash")

    out = tmp_path / "i"
    args = [*tiny_args(tiny_bert, small_csv, "checkpoint.every=1"), "--grid", "lora.r=2", "-o", str(out)]
    monkeypatch.setattr(lorafit.training.recipe, "final_metrics", crash)
    code, _, _ = sweep(capsys, *args)
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    assert code == 2 and (folder / "INCOMPLETE").exists() and not is_complete(folder)
    monkeypatch.setattr(lorafit.training.recipe, "final_metrics", real)
    code, stdout, _ = sweep(capsys, *args)
    assert code == 0 and "0 run(s) finished earlier, 1 to train" in stdout and "resuming from" in stdout
    assert is_complete(folder) and [r["status"] for r in read_csv(out / "results.csv")] == ["done"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--grid", "lora.rank=2,4"], "unknown key(s) 'lora.rank' (did you mean 'lora.r'?)"),
        (["--grid", "lora.dropout=0.1,1.5"], "1 of 2 sweep point(s) are invalid: sweep point dropout=1.5"),
        (["--grid", "lora.target_modules=[q_proj]"], "not found in bert"),
        ([], "nothing to sweep"),
        (["--grid", "lora.r=2", "--search", "optuna"], "does not combine with --grid"),
        (["--grid", "lora.r=2", "--trials", "3"], "--trials only apply with --search optuna"),
        (["--grid", "lora.r=2", "--seeds", "2", "--grid", "train.seed=1,2"], "do not also sweep train.seed"),
        (["--plan", "missing.yaml"], "config file missing.yaml not found"),
    ],
)
def test_user_errors_are_one_line_and_nothing_is_written(tiny_bert, small_csv, tmp_path, capsys, args, message):
    out = tmp_path / "bad"
    code, _, err = sweep(capsys, *tiny_args(tiny_bert, small_csv), *args, "-o", str(out))
    assert code == 2 and err.startswith("lorafit: error: ") and err.count("\n") == 1, err
    assert message in err
    assert not out.exists()


def test_a_sweep_folder_keeps_its_base_config(tiny_bert, small_csv, tmp_path, capsys):
    out = tmp_path / "b"
    # the only point is over budget: nothing trains, but the folder records its base config
    code, stdout, _ = sweep(
        capsys, *tiny_args(tiny_bert, small_csv, "budget.max_trainable=10"), "--grid", "lora.r=2", "-o", str(out)
    )
    assert code == 0 and "1 over budget" in stdout and (out / "sweep.yaml").exists()
    code, _, err = sweep(
        capsys,
        *tiny_args(tiny_bert, small_csv, "budget.max_trainable=10", "lora.dropout=0.3"),
        "--grid",
        "lora.r=2",
        "-o",
        str(out),
    )
    assert code == 2 and "different base config (lora.dropout: 0.1 -> 0.3)" in err and err.count("\n") == 1


def test_dry_run_lists_points_and_trains_nothing(tiny_bert, small_csv, tmp_path, capsys):
    out = tmp_path / "d"
    code, stdout, _ = sweep(
        capsys,
        *tiny_args(tiny_bert, small_csv, "budget.max_trainable=1000"),
        "--grid",
        "lora.r=2,4",
        "--dry-run",
        "-o",
        str(out),
    )
    assert code == 0 and "2 point(s) x 1 seed(s), 1 over budget" in stdout
    assert "644 trainable" in stdout and "over budget, skipped" in stdout
    assert not out.exists()


@pytest.mark.slow
def test_two_by_two_grid_on_the_embedded_minilm_finishes_and_a_rerun_trains_nothing(tmp_path):
    out = tmp_path / "sweeps" / "minilm"
    cmd = [
        sys.executable,
        "-m",
        "lorafit",
        "sweep",
        "--set",
        "data.max_train_samples=200",
        "--set",
        "data.val_fraction=0.02",
        "--set",
        "train.max_steps=5",
        "--grid",
        "lora.r=2,4",
        "--grid",
        "lora.alpha=8,16",
        "-o",
        str(out),
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=540)  # under the per-test 600 s
    assert p.returncode == 0, p.stderr[-3000:]
    assert "4 point(s) x 1 seed(s); 0 over budget (skipped), 0 run(s) finished earlier, 4 to train" in p.stdout
    rows = read_csv(out / "results.csv")
    assert len(rows) == 4 and all(r["status"] == "done" for r in rows)
    assert {(r["lora.r"], r["lora.alpha"]) for r in rows} == {("2", "8"), ("2", "16"), ("4", "8"), ("4", "16")}
    assert all(float(r["val_accuracy"]) > 0 and float(r["wall_s"]) > 0 for r in rows)
    assert (out / "results.md").read_text().count("\n| ") == 5

    q = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert q.returncode == 0, q.stderr[-3000:]
    assert "4 run(s) finished earlier, 0 to train" in q.stdout and "===" not in q.stdout
    assert read_csv(out / "results.csv") == rows
