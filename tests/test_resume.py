"""Checkpoints and resume, run-folder safety (incomplete marker, lock), numerical faults.

The central claim: a run interrupted at any point and resumed with `lorafit train --resume` ends with exactly
the metrics and adapter weights of the same run left alone (fp32 on CPU; bf16 on CPU too, with the tolerance stated
below). Most tests interrupt in-process through the on_eval hook; two SIGKILL a real `python -m lorafit train`
process mid-epoch (fp32 by default, about 20 s; bf16 with --slow).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from conftest import history, untimed, wait_for
from lorafit.cli import main
from lorafit.errors import LorafitError
from lorafit.runs import INCOMPLETE, LOCK, acquire_lock, check_output, lock_holder, read_run_config, release_lock
from lorafit.schedule import Schedule, make_optimizer
from lorafit.training.checkpoint import Checkpoints
from lorafit.training.recipe import run
from test_train import tiny_cfg


@pytest.fixture(autouse=True)
def no_report(monkeypatch):
    """report.html (matplotlib) costs seconds per run and plays no part here."""
    monkeypatch.setattr("lorafit.training.recipe.write_run_report", lambda folder: None)


class Crash(Exception):
    """Stands in for anything that ends a process mid-run."""


def crash_at(step: int):
    def on_eval(row):
        if row["step"] == step:
            raise Crash(f"crash at step {step}")

    return on_eval


def assert_same_run(a: Path, b: Path, atol: float = 0.0) -> float:
    """Same metrics, history and adapter weights; returns the largest weight difference."""
    wa, wb = (
        load_file(a / "adapter" / "adapter_model.safetensors"),
        load_file(b / "adapter" / "adapter_model.safetensors"),
    )
    assert wa.keys() == wb.keys()
    diff = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    ma, mb = json.loads((a / "metrics.json").read_text()), json.loads((b / "metrics.json").read_text())
    if atol == 0.0:
        assert diff == 0.0
        assert untimed(ma) == untimed(mb)
        assert untimed(history(a)) == untimed(history(b))
    else:
        assert diff <= atol
        for split in ("val", "test"):
            if split in ma:
                assert mb[split]["loss"] == pytest.approx(ma[split]["loss"], abs=atol)
                assert mb[split]["accuracy"] == pytest.approx(ma[split]["accuracy"], abs=0.02)
    # the comparison means something only if training moved the adapter away from its no-op start (B = 0)
    assert max(w.abs().max().item() for k, w in wa.items() if "lora_B" in k) > 0
    return diff


def one_line_error(capsys, argv: list[str], code: int = 2) -> str:
    """Run the CLI in-process: exit code, and one error line on stderr besides the progress bar's frames."""
    assert main(argv) == code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and not re.search(r"\d+/\d+ \[", line)]
    assert len(err) == 1 and err[0].startswith("lorafit: error: "), err
    return err[0]


# ---------------------------------------------------------------------------------------------------------------------
# Resume, in-process


RESUMABLE = [
    "train.max_steps=14",
    "eval.every=3",
    "checkpoint.every=4",
    "lora.dropout=0.3",
    "eval.early_stopping.patience=0",
]


@pytest.fixture(scope="module")
def reference(tiny_bert, tmp_path_factory, ag_sample) -> tuple[object, Path]:
    """The config the in-process resume tests interrupt, and its uninterrupted run."""
    folder = tmp_path_factory.mktemp("reference")
    data = folder / "small.csv"
    # as small_csv
    ag_sample.groupby("label", group_keys=False).head(60).reset_index(drop=True).to_csv(data, index=False)
    cfg = tiny_cfg(tiny_bert, data, *RESUMABLE)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("lorafit.training.recipe.write_run_report", lambda folder: None)
        run(cfg, folder / "run")
    return cfg, folder / "run"


def test_interrupted_run_resumes_exactly(reference, small_csv, tmp_path, capsys, monkeypatch):
    # 12 steps per epoch: checkpoints at 4, 8, 12 (also the epoch's end); evaluations at 3, 6, 9, 12, 14
    cfg, ref = reference
    out, control = tmp_path / "run", tmp_path / "control"
    with pytest.raises(Crash):
        run(cfg, out, on_eval=crash_at(9))  # after the step-8 checkpoint: the step-9 evaluation is lost
    assert (out / INCOMPLETE).exists() and not (out / LOCK).exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000004.pt", "step-0000008.pt"]
    assert [h["step"] for h in history(out)] == [3, 6, 9]
    shutil.copytree(out, control)

    # an incomplete run is not a run to evaluate, and a fresh `train -o` into it points at --resume
    with pytest.raises(
        LorafitError, match="incomplete run: its training was interrupted; continue it with `lorafit train --resume"
    ):
        read_run_config(out)
    with pytest.raises(LorafitError, match="holds an interrupted run; continue it with `lorafit train --resume"):
        check_output(out, overwrite=False)
    capsys.readouterr()
    assert "incomplete run" in one_line_error(capsys, ["eval", str(out), "--data", str(small_csv)])

    run(cfg, out, resume=True)
    assert "resuming from" in capsys.readouterr().out
    assert_same_run(ref, out)
    assert not (out / INCOMPLETE).exists() and not (out / LOCK).exists() and not (out / "checkpoints").exists()
    read_run_config(out)  # complete now

    # the comparison can fail: resumed without the saved RNG state (LoRA dropout), the same checkpoint ends elsewhere
    import lorafit.training.recipe as train_mod

    monkeypatch.setattr(train_mod, "set_rng_state", lambda state: torch.manual_seed(1234))
    run(cfg, control, resume=True)
    with pytest.raises(AssertionError):
        assert_same_run(ref, control)


def test_ctrl_c_keeps_the_checkpoints(reference, tmp_path, capsys):
    cfg, _ = reference
    out = tmp_path / "run"

    def interrupt(row):
        if row["step"] == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(cfg, out, on_eval=interrupt)
    assert (
        f"note: the interrupted run stays in {out}; continue it with `lorafit train --resume {out}`"
        in capsys.readouterr().out
    )
    assert (out / INCOMPLETE).exists() and [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000004.pt"]
    assert not (out / LOCK).exists()


def test_failure_before_the_first_checkpoint_leaves_nothing(tiny_bert, small_csv, tmp_path):
    out = tmp_path / "runs" / "r"
    with pytest.raises(Crash):
        run(tiny_cfg(tiny_bert, small_csv, "eval.every=1"), out, on_eval=crash_at(1))
    assert not out.exists()


def test_resume_cli_errors(tiny_bert, small_csv, tmp_path, capsys):
    done = tmp_path / "done"
    run(tiny_cfg(tiny_bert, small_csv, "train.max_steps=2"), done)
    capsys.readouterr()
    assert "already complete; nothing to resume" in one_line_error(capsys, ["train", "--resume", str(done)])
    assert "no such run folder" in one_line_error(capsys, ["train", "--resume", str(tmp_path / "nope")])
    assert "drop -c, --overwrite" in one_line_error(
        capsys, ["train", "--resume", str(done), "-c", "x.yaml", "--overwrite"]
    )

    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    (interrupted / INCOMPLETE).write_text("")
    msg = one_line_error(
        capsys, ["train", "--resume", str(interrupted), "--set", "train.batch_size=8", "--set", "lora.r=2"]
    )
    assert "train.batch_size, lora.r cannot change in a resumed run" in msg and "train.precision" in msg
    assert "before it saved config.yaml" in one_line_error(capsys, ["train", "--resume", str(interrupted)])


def test_resume_without_a_checkpoint_starts_over(reference, tmp_path, capsys):
    """A process killed before its first checkpoint leaves INCOMPLETE and config.yaml: --resume trains from the start."""
    cfg, ref = reference
    out = tmp_path / "run"
    out.mkdir()
    (out / INCOMPLETE).write_text("")
    (out / LOCK).write_text("999999999\n")  # stale: no such process, nobody holds the lock
    shutil.copy(ref / "config.yaml", out / "config.yaml")
    (out / "history.jsonl").write_text('{"step": 2, "torn')
    capsys.readouterr()
    assert main(["train", "--resume", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (
        "taking over the stale lock" in printed and "999999999" in printed and "training it from the start" in printed
    )
    assert_same_run(ref, out)


# ---------------------------------------------------------------------------------------------------------------------
# The lock


def test_a_folder_being_trained_is_locked(tiny_bert, small_csv, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    fd = acquire_lock(out)  # stands in for a live trainer (flock: another open file conflicts even in this process)
    try:
        assert lock_holder(out) == os.getpid()
        (out / INCOMPLETE).write_text("")
        assert "being trained right now by pid" in one_line_error(
            capsys, ["train", "-o", str(out), "--overwrite", "--set", f"model.name={tiny_bert}"]
        )
        assert f"pid {os.getpid()} is training it right now" in one_line_error(
            capsys, ["eval", str(out), "--data", str(small_csv)]
        )
        assert "being trained right now by pid" in one_line_error(capsys, ["train", "--resume", str(out)])
        with pytest.raises(LorafitError, match=r"is being trained by another process \(pid \d+"):
            run(tiny_cfg(tiny_bert, small_csv), out)  # past the CLI's checks: the lock itself refuses
    finally:
        release_lock(out, fd)
    assert lock_holder(out) is None and not (out / LOCK).exists()


def test_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=60)
    (tmp_path / LOCK).write_text(f"{dead.pid}\n")
    assert lock_holder(tmp_path) is None
    fd = acquire_lock(tmp_path)
    assert f"taking over the stale lock {tmp_path / LOCK} of pid {dead.pid}" in capsys.readouterr().out
    assert (tmp_path / LOCK).read_text() == f"{os.getpid()}\n"
    release_lock(tmp_path, fd)


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoint files and the schedule


def test_checkpoints_keep_the_newest_and_the_best(tmp_path):
    ck = Checkpoints(tmp_path, every=1, keep=2)
    for step in range(1, 7):
        ck.save({"step": step, "x": torch.tensor([step])}, step, best_step=2)
    assert [p.name for p in ck.paths()] == ["step-0000002.pt", "step-0000005.pt", "step-0000006.pt"]
    # a write killed half-way leaves a temporary file, never a checkpoint name; a damaged checkpoint is skipped
    (ck.folder / ".step-0000007.pt.tmp-123").write_bytes(b"half")
    (ck.folder / "step-0000006.pt").write_bytes(b"garbage")
    state = ck.load_latest()
    assert state["step"] == 5 and state["path"].endswith("step-0000005.pt")
    ck.save({"step": 8}, 8, best_step=8)
    assert [p.name for p in ck.folder.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant", "reduce_on_plateau"])
def test_schedule_state_round_trips(kind):
    def fresh():
        model = torch.nn.Linear(2, 2)
        opt = make_optimizer(model, 1e-2, 0.0)
        return opt, Schedule(opt, kind, total_steps=20, warmup_steps=3)

    opt, sched = fresh()
    losses = [1.0, 0.9, 0.95, 0.97, 0.99, 1.0]
    for i in range(6):
        sched.step()
        sched.on_eval(losses[i])
    opt2, sched2 = fresh()
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    for i in range(8):
        for s in (sched, sched2):
            s.step()
            s.on_eval(1.0 + i)
        assert sched2.lr == sched.lr


# ---------------------------------------------------------------------------------------------------------------------
# Numerical faults


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tiny_bert, small_csv, tmp_path, capsys):
    out = tmp_path / "run"
    args = sum(
        (
            ["--set", item]
            for item in [
                f"model.name={tiny_bert}",
                f"data.source={small_csv}",
                "model.max_length=32",
                "lora.r=4",
                "lora.target_modules=[query,value]",
                "train.batch_size=16",
                "train.max_steps=6",
                "train.precision=fp32",
                "data.val_fraction=0.2",
                "checkpoint.every=1",
                "speed.num_threads=1",
                # warm-up: step 1 runs at lr 0, step 2 at 1e30/3, which throws the weights to ~1e29: step 3's loss is nan
                "train.warmup_ratio=0.5",
                "train.lr=1e30",
            ]
        ),
        [],
    )
    msg = one_line_error(capsys, ["train", *args, "-o", str(out)])
    assert "the training loss became nan at step 3 (epoch 1)" in msg and "lower train.lr (now 1e+30)" in msg
    # the step-2 checkpoint holds the weights that gave nan: dropped; step 1's is the last good one
    assert (
        f"the last good checkpoint (step 1) is kept: continue from it with `lorafit train --resume {out} --set train.lr=...`"
        in msg
    )
    assert (out / INCOMPLETE).exists() and [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000001.pt"]

    # the suggested fix works: resume from the good checkpoint with a sane lr (the schedule is scaled down)
    assert main(["train", "--resume", str(out), "--set", "train.lr=1e-3"]) == 0
    assert "train.lr changes from 1e+30 to 0.001" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["training"]["steps"] == 6 and metrics["val"]["loss"] < 10


def test_nan_before_any_checkpoint_suggests_fp32_and_leaves_nothing(tiny_bert, small_csv, tmp_path, monkeypatch):
    import lorafit.training.recipe as train_mod

    real = train_mod.F.cross_entropy  # only the training loss: evaluation computes its own
    monkeypatch.setattr(train_mod, "F", SimpleNamespace(cross_entropy=lambda *a, **k: real(*a, **k) * float("inf")))
    cfg = tiny_cfg(tiny_bert, small_csv, "train.precision=bf16", "checkpoint.every=2")
    out = tmp_path / "run"
    with pytest.raises(LorafitError) as e:
        run(cfg, out)
    assert str(e.value) == (
        "the training loss became inf at step 1 (epoch 1); lower train.lr (now 0.005) or use train.precision=fp32 "
        "(now bfloat16); no good checkpoint had been written yet"
    )
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------------
# A real process, killed


def _kill_mid_epoch_and_resume(tiny_bert, ag_sample, tmp_path, capsys, precision: str) -> tuple[Path, Path]:
    data = tmp_path / "data.csv"
    ag_sample.groupby("label", group_keys=False).head(100).to_csv(data, index=False)  # 400 rows: 40 steps per epoch
    items = [
        f"model.name={tiny_bert}",
        f"data.source={data}",
        "model.max_length=64",
        "lora.r=4",
        "lora.target_modules=[query,value]",
        "lora.dropout=0.2",
        "train.batch_size=8",
        "train.max_steps=150",
        "eval.every=10",
        f"train.precision={precision}",
        "speed.num_threads=1",
        "checkpoint.every=5",
        "eval.early_stopping.patience=0",
        "data.val_fraction=0.2",
        "train.lr=5e-3",
    ]
    ref, out = tmp_path / "ref", tmp_path / "killed"
    from lorafit.config import load_config

    run(load_config(None, items), ref)  # uninterrupted, in this process

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    args = [sys.executable, "-m", "lorafit", "train", *sum((["--set", i] for i in items), []), "-o", str(out)]
    log = tmp_path / "stderr.txt"  # a file, not a pipe: the progress bar would fill a pipe nobody drains
    with open(log, "wb") as stderr:
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    checkpoints = out / "checkpoints"
    try:
        wait_for(
            lambda: checkpoints.is_dir() and any(checkpoints.glob("step-*.pt")),
            proc,
            "the first checkpoint",
            600,
            log,
            every=0.002,
        )
        proc.send_signal(signal.SIGSTOP)  # frozen mid-epoch, still holding its lock
        assert proc.poll() is None, f"training ended before the kill: {log.read_text(errors='replace')[-1000:]}"
        # a second process may not train into the folder, resume it or evaluate it meanwhile
        for argv in (
            ["train", "--resume", str(out)],
            ["train", *sum((["--set", i] for i in items), []), "-o", str(out), "--overwrite"],
            ["eval", str(out), "--data", str(data)],
        ):
            assert main(argv) == 2
            assert f"pid {proc.pid}" in capsys.readouterr().err
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert (out / INCOMPLETE).exists() and (out / LOCK).exists()  # a lock file of a dead process: stale

    q = subprocess.run(
        [sys.executable, "-m", "lorafit", "train", "--resume", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert q.returncode == 0, q.stderr[-2000:]
    resumed = [line for line in q.stdout.splitlines() if line.startswith("resuming from")]
    assert resumed and " of 150 (epoch " in resumed[0] and ", batch 0 of" not in resumed[0], resumed  # mid-epoch
    return ref, out


def test_sigkilled_training_resumes_exactly_fp32(tiny_bert, ag_sample, tmp_path, capsys):
    ref, out = _kill_mid_epoch_and_resume(tiny_bert, ag_sample, tmp_path, capsys, "fp32")
    assert_same_run(ref, out)


@pytest.mark.slow
def test_sigkilled_training_resumes_bf16(tiny_bert, ag_sample, tmp_path, capsys):
    # bf16 on CPU is deterministic too and comes out bit-identical here; the stated tolerance allows for bf16
    # kernels that pick their reduction order at run time (other CPUs, GPUs)
    ref, out = _kill_mid_epoch_and_resume(tiny_bert, ag_sample, tmp_path, capsys, "bf16")
    assert assert_same_run(ref, out, atol=1e-3) <= 1e-3


def test_runs_saved_before_pad_to_multiple_of_resume_with_their_own_padding(tmp_path):
    """A run whose config.yaml predates speed.pad_to_multiple_of padded to the longest text only; resuming it with
    the new default (8) would continue a different training."""
    from lorafit.config import load_config, save_config
    from lorafit.runs import resume_config

    run = tmp_path / "r"
    run.mkdir()
    (run / INCOMPLETE).write_text("")
    save_config(load_config(None, []), run / "config.yaml")
    assert resume_config(run).speed.pad_to_multiple_of == 8
    text = (run / "config.yaml").read_text()
    assert "  pad_to_multiple_of: 8\n" in text
    (run / "config.yaml").write_text(text.replace("  pad_to_multiple_of: 8\n", ""))
    assert resume_config(run).speed.pad_to_multiple_of == 1
