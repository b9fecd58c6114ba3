"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint is one file, `checkpoints/step-NNNNNNN.pt` in the run folder, holding the trainable weights
(adapter + head), the optimizer, the schedule, the RNG states (torch, numpy, python), the data-order position
(epoch and batch index; the batch order itself is a pure function of the seed and the epoch), the running train
loss, the history so far, the early-stopping state and the best weights seen. It is written to a temporary name,
fsynced and renamed, so a kill at any moment leaves either the previous set of checkpoints or the new one,
never a half-written file under a checkpoint name.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_write, fsync_dir
from .errors import LorafitError

FOLDER = "checkpoints"
FORMAT = 1
_NAME = re.compile(r"^step-(\d+)\.pt$")

# Keys a resumed run may change: they do not alter what the remaining steps compute (threads, evaluation batch
# size, checkpointing), or they are the usual fixes after a numerical fault (a lower lr, fp32).
RESUME_OVERRIDES = ("train.lr", "train.precision", "train.num_threads", "train.eval_batch_size", "train.checkpoint_every", "train.keep_checkpoints")


def rng_state() -> dict:
    """Every random generator a training step may draw from (LoRA dropout uses torch's)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    random.setstate(state["python"])


def step_of(path: Path) -> int:
    return int(_NAME.match(path.name).group(1))


class Checkpoints:
    """The checkpoint files of one run folder: write (atomically), prune to the newest `keep` plus the best, find the newest."""

    def __init__(self, run_folder: Path, every: int | None, keep: int):
        self.folder = Path(run_folder) / FOLDER
        self.every, self.keep = every, keep

    def paths(self) -> list[Path]:
        """Complete checkpoints, oldest first (temporary files of an interrupted write are not checkpoints)."""
        if not self.folder.is_dir():
            return []
        return sorted((p for p in self.folder.iterdir() if _NAME.match(p.name)), key=step_of)

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def save(self, state: dict, step: int, best_step: int | None) -> Path:
        """Write the checkpoint of `step`, then drop all but the newest `keep` and the one of `best_step`."""
        self.folder.mkdir(exist_ok=True)
        for stale in self.folder.glob(".step-*.tmp-*"):  # left by a write that was killed
            stale.unlink(missing_ok=True)
        path = self.folder / f"step-{step:07d}.pt"
        atomic_write(path, lambda f: torch.save({"format": FORMAT, **state}, f))
        self.prune(best_step)
        return path

    def prune(self, best_step: int | None) -> None:
        paths = self.paths()
        keep = set(paths[-self.keep :]) | {p for p in paths if step_of(p) == best_step}
        for p in paths:
            if p not in keep:
                p.unlink(missing_ok=True)
        fsync_dir(self.folder)

    def discard(self, step: int) -> None:
        (self.folder / f"step-{step:07d}.pt").unlink(missing_ok=True)

    def latest_step(self) -> int | None:
        paths = self.paths()
        return step_of(paths[-1]) if paths else None

    def load_latest(self) -> dict | None:
        """The newest checkpoint that loads; an unreadable one (a disk error, a copy cut short) is skipped with a note."""
        for path in reversed(self.paths()):
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - any unreadable file: fall back to the previous checkpoint
                print(f"note: skipping unreadable checkpoint {path} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})", flush=True)
                continue
            if not isinstance(state, dict) or state.get("format") != FORMAT:
                raise LorafitError(f"{path}: not a lorafit checkpoint of format {FORMAT}; it was written by another lorafit version, start a new run")
            state["path"] = str(path)
            return state
        return None

