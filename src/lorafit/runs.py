"""The run-folder contract: the files a run holds, when it is complete, its lock while it trains, its config.

Training writes straight into the run folder, so a crash, a kill or a Ctrl-C keeps the checkpoints written so far.
`INCOMPLETE` is created before anything else and removed only after every file is written: while it exists the
folder is not a run you can evaluate, and `lorafit train --resume` can continue it. `.lock` holds the trainer's pid
under an advisory lock (flock), which the kernel releases when the process dies however it dies; a lock file left by
a dead process is therefore detected and taken over. Sweep folders are locked the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path

from .atomic import atomic_write_text, fsync_dir
from .config import RESUME_OVERRIDES, Config, apply_overrides, migrate_saved, parse_override, read_yaml, validate
from .errors import LorafitError

try:
    import fcntl
except ImportError:  # Windows: the lock falls back on checking whether the recorded pid is alive
    fcntl = None

CONFIG = "config.yaml"
LABELS = "labels.json"
METRICS = "metrics.json"
BUDGET = "budget.json"
HISTORY = "history.jsonl"
ADAPTER = "adapter"
TOKENIZER = "tokenizer"
CHECKPOINTS = "checkpoints"
REQUIRED_FILES = (CONFIG, LABELS, METRICS, f"{ADAPTER}/adapter_config.json")  # what every complete run holds
INCOMPLETE = "INCOMPLETE"  # present from the start of training until every file of the run is written
LOCK = ".lock"


def is_complete(folder: Path) -> bool:
    """A finished run: every required file written and no INCOMPLETE marker (runs train in place)."""
    folder = Path(folder)
    return folder.is_dir() and not is_incomplete(folder) and all((folder / f).exists() for f in REQUIRED_FILES)


def check_complete(folder: Path, being_written: bool = False) -> Path:
    """`folder` if it is a complete run, else a one-line error saying what it is instead and what to do.
    `being_written`: the trainer itself, writing the last files (the report) before it removes INCOMPLETE."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LorafitError(f"run folder {folder} not found; expected a folder written by `lorafit train`")
    if is_incomplete(folder) and not being_written:
        holder = lock_holder(folder)
        if holder:
            raise LorafitError(
                f"{folder} is an incomplete run: pid {holder} is training it right now; wait for it to finish"
            )
        raise LorafitError(
            f"{folder} is an incomplete run: its training was interrupted; continue it with `lorafit train --resume {folder}`"
        )
    missing = [f for f in REQUIRED_FILES if not (folder / f).exists()]
    if missing:
        raise LorafitError(
            f"{folder} is not a complete lorafit run (missing {', '.join(missing)}); train it again or pick another folder"
        )
    return folder


def read_run_config(folder: Path) -> Config:
    """The config of a complete run, in the current layout whichever lorafit version wrote it."""
    path = check_complete(folder) / CONFIG
    return validate(migrate_saved(read_yaml(path)), str(path))


def read_labels(folder: Path) -> list[str]:
    return json.loads((Path(folder) / LABELS).read_text())


def default_run_dir(cfg: Config, root: Path = Path("runs")) -> Path:
    model = cfg.model.name.replace("builtin:", "").rstrip("/").split("/")[-1]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = root / f"{stamp}-{model}"
    i = 1
    while out.exists():
        i += 1
        out = root / f"{stamp}-{model}-{i}"
    return out


def check_output(out: Path, overwrite: bool) -> None:
    """Before a fresh run: `out` must be new or empty, or --overwrite given; never a folder another process trains into."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LorafitError(f"output folder {out} is a file; pick another -o")
    if not out.is_dir():
        return
    holder = lock_holder(out)
    if holder:
        raise LorafitError(
            f"output folder {out} is being trained right now by pid {holder}; pick another -o or wait for it to finish"
        )
    if any(p.name != LOCK for p in out.iterdir()) and not overwrite:  # a stale lock alone does not make a run
        if is_incomplete(out):
            raise LorafitError(
                f"output folder {out} holds an interrupted run; continue it with `lorafit train --resume {out}`, or pass --overwrite to start over"
            )
        raise LorafitError(f"output folder {out} already exists and is not empty; pick another -o or pass --overwrite")


# ---------------------------------------------------------------------------------------------------------------------
# Locks and a run folder while it trains


def is_incomplete(folder: Path) -> bool:
    return (Path(folder) / INCOMPLETE).exists()


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except OSError:
        return False
    return True


def lock_holder(folder: Path) -> int | None:
    """The pid of a live process training into `folder`, else None."""
    path = Path(folder) / LOCK
    if not path.exists():
        return None
    pid = _read_pid(path)
    if fcntl is None:
        return pid if pid and pid != os.getpid() and _pid_alive(pid) else None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return pid or -1
    finally:
        os.close(fd)  # also drops the shared lock taken just to test
    return None


def acquire_lock(folder: Path, busy: str | None = None) -> int:
    """Lock `folder` for this process; return the lock's file descriptor (see release_lock). `busy` is the error
    message when another live process holds it ({pid} is filled in)."""
    path = Path(folder) / LOCK
    busy = (
        busy
        or f"{folder} is being trained by another process (pid {{pid}}, lock {path}); wait for it to finish or stop that process"
    )
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise LorafitError(busy.format(pid=_read_pid(path) or "?")) from None
            try:  # the previous holder may have removed the file between our open and flock: lock the new one then
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
        old = _read_pid(path)
        if fcntl is None and old and old != os.getpid() and _pid_alive(old):
            os.close(fd)
            raise LorafitError(busy.format(pid=old))
        if old and old != os.getpid():
            state = "is no longer running" if not _pid_alive(old) else "no longer holds it"
            print(f"note: taking over the stale lock {path} of pid {old}, which {state}", flush=True)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        os.fsync(fd)
        return fd


def release_lock(folder: Path, fd: int) -> None:
    (Path(folder) / LOCK).unlink(missing_ok=True)  # before closing, so nobody locks a file that is about to vanish
    os.close(fd)


@contextlib.contextmanager
def locked(folder: Path, busy: str):
    """Hold `folder`'s lock for the block (a sweep folder: two sweeps would train the same point into one run folder)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = acquire_lock(folder, busy)
    try:
        yield folder
    finally:
        release_lock(folder, fd)


def _clear(folder: Path, keep: tuple[str, ...] = (LOCK,)) -> None:
    for child in folder.iterdir():
        if child.name in keep:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


@contextlib.contextmanager
def training_folder(out: Path, resume: bool = False):
    """The run folder while it trains: locked, marked INCOMPLETE until the block ends without an error.

    A fresh run replaces what `out` held (the CLI asks for --overwrite before that). On any failure (an error,
    Ctrl-C) the folder is kept when it can be resumed, i.e. it holds a checkpoint or was itself being resumed, and
    removed otherwise, so a run that fails before its first checkpoint leaves nothing behind.
    """
    out = Path(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        fd = acquire_lock(out)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    try:
        if resume and not is_incomplete(out):  # another process finished it while we were loading
            raise LorafitError(f"{out} is already complete; nothing to resume")
        if not resume:
            _clear(out)
            atomic_write_text(
                out / INCOMPLETE,
                f"training in progress or interrupted; continue it with `lorafit train --resume {out}`\n",
            )
    except BaseException:
        release_lock(out, fd)
        raise
    try:
        yield out
    except BaseException:
        checkpoints = out / CHECKPOINTS
        keep = resume or (checkpoints.is_dir() and any(p.suffix == ".pt" for p in checkpoints.iterdir()))
        if keep:
            print(
                f"note: the interrupted run stays in {out}; continue it with `lorafit train --resume {out}`", flush=True
            )
        else:
            _clear(out)
        release_lock(out, fd)
        if not keep:
            shutil.rmtree(out, ignore_errors=True)
        raise
    (out / INCOMPLETE).unlink()
    fsync_dir(out)
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)  # the run is complete: the adapter holds the best weights
    release_lock(out, fd)


def resume_config(folder: Path, overrides: list[str] = ()) -> Config:
    """The config of an interrupted run, with the few `--set` overrides a resumed run may change."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LorafitError(f"--resume {folder}: no such run folder; expected a folder written by `lorafit train`")
    if not is_incomplete(folder):
        if is_complete(folder):
            raise LorafitError(
                f"--resume {folder}: the run is already complete; nothing to resume (train a new run with -o, or --overwrite it)"
            )
        raise LorafitError(
            f"--resume {folder}: not an interrupted lorafit run (no {INCOMPLETE} marker); expected a folder written by `lorafit train`"
        )
    holder = lock_holder(folder)
    if holder:
        raise LorafitError(
            f"--resume {folder}: the run is being trained right now by pid {holder}; wait for it to finish or stop that process"
        )
    bad = [".".join(parse_override(item)[0]) for item in overrides]
    bad = [k for k in bad if k not in RESUME_OVERRIDES]
    if bad:
        raise LorafitError(
            f"--resume: {', '.join(bad)} cannot change in a resumed run (it would not continue the same training); "
            f"a resumed run may change only {', '.join(RESUME_OVERRIDES)}; start a new run to change anything else"
        )
    path = folder / CONFIG
    if not path.is_file():
        raise LorafitError(
            f"--resume {folder}: the run was interrupted before it saved config.yaml, so it cannot be resumed; start it again with -o {folder} --overwrite"
        )
    data = read_yaml(path)
    data = apply_overrides(migrate_saved(data) if isinstance(data, dict) else data, list(overrides))
    return validate(data, str(path) + (" with --set overrides" if overrides else ""))
