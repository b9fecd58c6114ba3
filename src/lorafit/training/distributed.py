"""Several processes training one run: `torchrun --nproc_per_node N -m lorafit train` or `accelerate launch`.

Data-parallel, over a gloo (CPU) or NCCL (CUDA) process group. Every process builds the same model and data
and walks the same global batch order: step k's global batch is what one process with the effective batch size
(batch_size x processes) would see, and process r trains on its slice of it. Gradients are summed across
processes once per optimizer step (one flat all-reduce of the adapter and head gradients, which are small);
each process weights its loss by its share of the global rows, so the sum is the mean over the global batch and
every process takes the same optimizer step. Evaluation rows are sharded and the logits gathered, so every
process computes the same metrics and takes the same early-stopping decisions. Only rank 0 writes the run folder.

A single process (no launcher) never touches torch.distributed: `Dist()` with world 1 turns every helper into a
no-op, so one-process training stays exactly as it was.

A launcher that loses a process (killed, crashed) sends SIGTERM to the others, and a collective with a dead peer
fails; both end training with one line naming the process that exited and the resume command. Collectives time
out after LORAFIT_DIST_TIMEOUT seconds (default 180), so a peer that hangs never blocks the others forever.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LorafitError

TIMEOUT_ENV = "LORAFIT_DIST_TIMEOUT"
DEFAULT_TIMEOUT = 180.0
STOPPED_EXIT = 143  # 128 + SIGTERM, the usual code of a process told to stop

# torchrun and `accelerate launch --multi_gpu` set the torch names; MPI launchers (`accelerate launch --cpu
# --mpirun_hostfile`, mpirun) set their own.
_RANK = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
_WORLD = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_LOCAL_RANK = ("LOCAL_RANK", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK")
_LOCAL_WORLD = ("LOCAL_WORLD_SIZE", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "MV2_COMM_WORLD_LOCAL_SIZE")


def _env_int(names: tuple[str, ...], default: int) -> int:
    for name in names:
        value = os.environ.get(name, "").strip()
        if value:
            try:
                return int(value)
            except ValueError:
                raise LorafitError(
                    f"{name}={value!r} in the environment is not an integer; it should be set by torchrun or accelerate launch"
                ) from None
    return default


class Stopped(BaseException):
    """Raised by the SIGTERM handler: the launcher stops this process (usually because another one exited).

    A BaseException, like KeyboardInterrupt, so no `except Exception` on the way swallows it."""


class PeerFailure(LorafitError):
    """Training stopped because another process of the run exited or stopped answering; printed by every survivor."""

    exit_code = STOPPED_EXIT
    every_rank = True


class Mirrored(LorafitError):
    """One process's error, raised in every process so all exit with its code; rank 0 alone prints it."""

    def __init__(self, message: str, exit_code: int, quiet: bool = True):
        super().__init__(message)
        self.exit_code, self.quiet = exit_code, quiet


def is_comm_error(e: BaseException) -> bool:
    """A failed collective: a peer closed its connection, timed out, or the store went away."""
    try:
        import torch.distributed as dist

        if isinstance(e, dist.DistError):
            return True
    except ImportError:  # pragma: no cover
        pass
    text = str(e)
    return isinstance(e, RuntimeError) and any(
        k in text for k in ("gloo", "NCCL", "ProcessGroup", "Connection reset", "Connection closed", "Timed out")
    )


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")  # a killed child is a zombie until reaped
    except FileNotFoundError:
        return False
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except OSError:
            return True
        return True


@dataclass
class Dist:
    """This process's place in the run; `Dist()` is a single process and every method is then a no-op."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    timeout: float = DEFAULT_TIMEOUT
    device: object = None  # set by start()
    peers: list = field(default_factory=list)  # (host, pid) of every rank, set by start()
    out: Path | None = None  # rank 0's run folder, set by start()
    started: bool = False
    agreed: bool = False  # every process has passed (or failed) its checks: see agree()

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    # -----------------------------------------------------------------------------------------------------------------
    # Setting up

    def start(self, device, out: Path) -> Dist:
        """Join the process group (gloo on CPU, NCCL on CUDA) after every process has checked its config and data."""
        if not self.active or self.started:
            return self
        import datetime

        import torch
        import torch.distributed as dist

        self.device = device
        backend = "nccl" if device.type == "cuda" else "gloo"
        try:
            if not dist.is_initialized():
                dist.init_process_group(
                    backend,
                    rank=self.rank,
                    world_size=self.world,
                    timeout=datetime.timedelta(seconds=self.timeout),
                    **({"device_id": torch.device("cuda", torch.cuda.current_device())} if backend == "nccl" else {}),
                )
            self.started = True
            me = (socket.gethostname(), os.getpid(), None if out is None else str(out))
            self.peers = self.all_gather_object(me)
        except Exception as e:
            if is_comm_error(e):
                raise PeerFailure(
                    f"training could not start: the {self.world} processes of this run did not all join within {self.timeout:g} s "
                    f"(another one exited or hangs; {TIMEOUT_ENV} sets the timeout)"
                ) from None
            raise
        self.out = Path(self.peers[0][2]) if self.peers[0][2] is not None else None
        return self

    def agree(self, error: LorafitError | None) -> None:
        """Every process reports how its checks went (config, budget, data, output folder); if any failed, all stop.

        Called once by every process before training: an error is thus printed once (by rank 0, naming the process
        it came from when that is not rank 0) and every process exits with its code, whichever process found it
        and whichever finished first.
        """
        if not self.active:
            if error is not None:
                raise error
            return
        statuses = self.all_gather_object(None if error is None else (str(error), error.exit_code))
        self.agreed = True
        failed = [(r, status) for r, status in enumerate(statuses) if status is not None]
        if not failed:
            return
        r, (message, code) = failed[0]
        if self.main and r == 0:
            raise error
        raise Mirrored(message if r == 0 else f"(process {r}) {message}", code, quiet=not self.main)

    def fail_together(self, error: LorafitError, device=None) -> None:
        """A check failed in this process before the group started: start it anyway, so the others learn of it (agree)."""
        if not self.active or self.agreed or isinstance(error, PeerFailure):
            raise error
        if not self.started:
            if device is None:
                from ..fast.device import pick_device  # imports torch: only in a multi-process run

                device = pick_device()
            try:
                self.start(device, None)
            except PeerFailure:
                raise error from None  # the others are gone: this process's own error is what there is to say
        self.agree(error)

    def exiting(self) -> None:
        """This process is about to exit with an error already decided: ignore the launcher's SIGTERM from now on, and
        leave the process group (a group torn down at interpreter exit can abort the process)."""
        if self.active:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            self.stop()

    def stop(self) -> None:
        if self.started:
            import torch.distributed as dist

            with contextlib.suppress(Exception):
                dist.destroy_process_group()
            self.started = False

    # -----------------------------------------------------------------------------------------------------------------
    # Training

    def cpu_threads(self) -> int:
        """The default thread count of one process: this machine's cores shared by the processes on it."""
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return max(1, cores // self.local_world)

    def shard(self, index):
        """This process's rows of a global batch (strided: the batch is length-sorted, so every process gets similar lengths)."""
        return index[self.rank :: self.world] if self.active else index

    def global_mean(self, local_mean: float, local_n: int, total_n: int) -> float:
        """The mean over the global batch, from each process's mean over its rows (one scalar all-reduce)."""
        if not self.active:
            return local_mean
        import torch
        import torch.distributed as dist

        t = torch.tensor([local_mean * local_n], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item() / total_n

    def sum_grads(self, params: list) -> None:
        """Sum the gradients of `params` over all processes (one flat all-reduce); a parameter without a gradient counts as zeros."""
        if not self.active:
            return
        import torch
        import torch.distributed as dist

        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params])
        dist.all_reduce(flat)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).to(p.dtype)
            offset += n

    def broadcast_params(self, params: list) -> None:
        """Start from rank 0's trainable weights (they are built from the same seed; this makes sure)."""
        if not self.active:
            return
        import torch.distributed as dist

        for p in params:
            dist.broadcast(p.data, src=0)

    def any(self, flag: bool) -> bool:
        """True on every process when it is true on one (decisions that depend on a process's own clock)."""
        if not self.active:
            return flag
        import torch
        import torch.distributed as dist

        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def from_main(self, value: float) -> float:
        """Rank 0's value on every process (its clock, for a time-limited schedule that must stay the same everywhere)."""
        if not self.active:
            return value
        import torch
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.broadcast(t, src=0)
        return t.item()

    def gather_rows(self, enc, predict):
        """Logits of every row of `enc`: each process predicts a length-balanced share, and all gather the shares."""
        import numpy as np

        from ..batching import Encoded  # imports torch: only in a multi-process run

        order = np.argsort(-enc.lengths, kind="stable")[self.rank :: self.world]
        part = predict(Encoded([enc.ids[i] for i in order], enc.labels[order]))
        parts = self.all_gather_object((order, part))
        out = np.zeros((len(enc), part.shape[1]), dtype=part.dtype)
        for idx, logits in parts:
            out[idx] = logits
        return out

    # -----------------------------------------------------------------------------------------------------------------
    # Objects

    def all_gather_object(self, obj) -> list:
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        """Rank 0's `obj` on every process."""
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, fn):
        """Run fn on rank 0 only (run-folder work) and give its result to every process; an error there ends all of them."""
        if not self.active:
            return fn()
        if not self.main:
            status = self.broadcast_object(None)
            if status[0] == "error":
                raise Mirrored(status[1], status[2])
            return status[1]
        try:
            result = fn()
        except LorafitError as e:
            with contextlib.suppress(Exception):
                self.broadcast_object(("error", str(e), e.exit_code))
            raise
        except Exception as e:
            with contextlib.suppress(Exception):
                self.broadcast_object(("error", f"rank 0 failed ({type(e).__name__}: {e}); see its traceback", 1))
            raise
        self.broadcast_object(("ok", result))
        return result

    # -----------------------------------------------------------------------------------------------------------------
    # When another process goes away

    def exited_ranks(self) -> list[int]:
        """Ranks on this machine whose process is gone (other machines' processes cannot be looked at from here)."""
        host = socket.gethostname()
        return [r for r, (h, pid, _) in enumerate(self.peers) if r != self.rank and h == host and not _alive(pid)]

    def resume_command(self, out, processes: int | None = None) -> str:
        """How to continue this run: the launcher it was started with, for `processes` (default: this run's) processes."""
        n = processes or self.world
        if "ACCELERATE_MIXED_PRECISION" in os.environ or "ACCELERATE_DYNAMO_BACKEND" in os.environ:
            launch = f"accelerate launch --multi_gpu --num_processes {n}"
        elif self.world == self.local_world or processes:
            launch = f"torchrun --nproc_per_node {n}"
        else:
            launch = "torchrun <the same --nnodes/--nproc_per_node/--rdzv options>"
        return f"{launch} -m lorafit train --resume {out}"

    def stopped_message(self, out=None, resume: bool = False) -> str:
        """One line for a stop caused by another process; it says how to continue when the run folder has a checkpoint."""
        exited = self.exited_ranks() if self.peers else []
        who = (
            f"another process of this run exited (rank {', '.join(map(str, exited))})"
            if exited
            else "another process of this run exited or the launcher stopped this one"
        )
        from .checkpoint import Checkpoints  # imports torch, which this module loads only once a group starts

        out = self.out or (Path(out) if out is not None else None)  # rank 0's folder: every process names the same one
        if resume or (out is not None and Checkpoints(out, None, 0).latest_step() is not None):
            return f"training stopped: {who}; the run is kept: continue it with `{self.resume_command(out)}`"
        return f"training stopped: {who}; no checkpoint had been written, so start the run again"

    @contextlib.contextmanager
    def guard(self, out, resume: bool):
        """Turn a SIGTERM or a failed collective into one line (PeerFailure) with the way to continue."""
        if not self.active:
            yield
            return
        try:
            yield
        except PeerFailure:
            raise
        except (Stopped, Exception) as e:
            if not isinstance(e, Stopped) and not is_comm_error(e):
                raise
            # The launcher's SIGTERM often follows a failed collective within milliseconds: while this process says
            # why it stops, a second Stopped must not replace that line.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            raise PeerFailure(self.stopped_message(out, resume)) from None


_current = Dist()


def current() -> Dist:
    return _current


def launched() -> Dist:
    """This process's place as the launcher set it in the environment; prepares a multi-process run.

    Every process of the run calls this first (from the CLI). For more than one process: SIGTERM raises Stopped,
    ranks other than 0 stay quiet (no progress bars, no library warnings), and a CUDA process takes the GPU of its
    local rank. The process group itself starts later (Dist.start), after the config, budget and data checks,
    so those errors end every process without any network work.
    """
    global _current
    world = _env_int(_WORLD, 1)
    if world <= 1:
        _current = Dist()
        if os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true" and os.environ.get("MASTER_ADDR"):
            print(
                "note: `accelerate launch --cpu` started one process: on CPU it starts several only through MPI (--mpirun_hostfile); "
                "for N CPU processes use `accelerate launch --multi_gpu --num_processes N` or `torchrun --nproc_per_node N`",
                flush=True,
            )
        return _current
    rank = _env_int(_RANK, 0)
    try:
        timeout = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT))
        if not timeout > 0:
            raise ValueError
    except ValueError:
        raise LorafitError(
            f"{TIMEOUT_ENV}={os.environ[TIMEOUT_ENV]!r}: expected a positive number of seconds (default {DEFAULT_TIMEOUT:g})"
        ) from None
    _current = Dist(
        rank=rank,
        world=world,
        local_rank=_env_int(_LOCAL_RANK, 0),
        local_world=_env_int(_LOCAL_WORLD, world),
        timeout=timeout,
    )
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")  # MPI launchers may leave the rendezvous to us on one machine
    os.environ.setdefault("MASTER_PORT", "29500")

    def on_sigterm(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once is enough: let the cleanup run
        raise Stopped()

    signal.signal(signal.SIGTERM, on_sigterm)
    if rank != 0:
        import warnings

        warnings.filterwarnings("ignore")
        os.environ["TQDM_DISABLE"] = "1"
        os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    if os.environ.get("LORAFIT_DEVICE", "cuda").startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            torch.cuda.set_device(_current.local_rank % torch.cuda.device_count())
    return _current


def reports(e: BaseException) -> bool:
    """Whether this process prints error `e`: rank 0 prints the run's errors once; any survivor prints a peer failure."""
    if getattr(e, "quiet", False):
        return False
    return _current.main or getattr(e, "every_rank", False)
