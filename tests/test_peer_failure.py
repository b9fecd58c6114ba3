"""How a process of a multi-process run words its stop when another process goes away (no processes started here).

The two-process tests (test_distributed.py) kill a real rank; the launcher's SIGTERM and the failed collective
then reach the survivor within milliseconds of each other, in either order. These tests pin both orders down.
"""

from __future__ import annotations

import os
import signal
import socket

import pytest

from lorafit.training import distributed
from lorafit.training.distributed import Dist, PeerFailure, Stopped


@pytest.fixture
def rank0(tmp_path):
    """Rank 0 of a 2-process run whose folder has one checkpoint; rank 1's pid is one that has exited."""
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "step-0000002.pt").write_bytes(b"")
    gone = os.fork()
    if gone == 0:
        os._exit(0)
    os.waitpid(gone, 0)
    host = socket.gethostname()
    return Dist(rank=0, world=2, local_world=2, peers=[(host, os.getpid(), str(out)), (host, gone, str(out))], out=out)


@pytest.fixture
def sigterm_raises_stopped():
    """The handler `distributed.launched()` installs, restored afterwards."""

    def on_sigterm(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Stopped()

    before = signal.signal(signal.SIGTERM, on_sigterm)
    yield
    signal.signal(signal.SIGTERM, before)


def test_a_stop_outside_training_still_names_the_resume_command_when_a_checkpoint_exists(rank0):
    # the CLI's path for a SIGTERM that lands outside the training guard passes no folder: rank 0's is used
    line = rank0.stopped_message()
    assert line.startswith("training stopped: another process of this run exited (rank 1)")
    assert f"continue it with `torchrun --nproc_per_node 2 -m lorafit train --resume {rank0.out}`" in line


def test_without_a_checkpoint_the_line_says_to_start_again(rank0):
    for p in (rank0.out / "checkpoints").iterdir():
        p.unlink()
    assert rank0.stopped_message().endswith("no checkpoint had been written, so start the run again")


def test_the_launchers_sigterm_during_the_failed_collectives_handling_does_not_replace_its_line(
    rank0, sigterm_raises_stopped, monkeypatch
):
    exited = rank0.exited_ranks

    def sigterm_arrives_now():  # the moment the guard is composing its line
        os.kill(os.getpid(), signal.SIGTERM)
        return exited()

    monkeypatch.setattr(rank0, "exited_ranks", sigterm_arrives_now)
    with pytest.raises(PeerFailure) as failure:
        with rank0.guard(rank0.out, resume=False):
            raise RuntimeError("[gloo] Connection reset by peer")
    assert "continue it with `torchrun --nproc_per_node 2 -m lorafit train --resume" in str(failure.value)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN  # the exit code is decided; later SIGTERMs are ignored


def test_an_error_that_is_not_a_peers_passes_through_the_guard(rank0):
    with pytest.raises(ValueError):
        with rank0.guard(rank0.out, resume=False):
            raise ValueError("a bug, not a peer's failure")
    assert distributed.is_comm_error(RuntimeError("[gloo] Connection closed by peer"))
