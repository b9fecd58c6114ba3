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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_write, fsync_dir
from ..config import RESUME_OVERRIDES, config_changes, migrate_saved
from ..errors import LorafitError
from ..runs import CHECKPOINTS

FORMAT = 1
_NAME = re.compile(r"^step-(\d+)\.pt$")


@dataclass
class Progress:
    """Where the loop stands: what a checkpoint holds besides weights, optimizer, schedule, RNG and results."""

    step: int = 0
    epoch: int = 0
    batch: int = 0  # index of the next batch in the epoch's order (a pure function of seed and epoch)
    done: bool = False
    run_loss: float = 0.0  # train loss summed since the last evaluation
    run_n: int = 0
    seen: int = 0
    elapsed: float = 0.0  # training seconds spent before this process took over


@dataclass
class Result:
    history: list[dict] = field(default_factory=list)
    best_step: int = 0
    best_value: float | None = None
    steps: int = 0
    epochs_run: float = 0.0
    stopped_early: bool = False
    train_seconds: float = 0.0
    metrics: dict = field(default_factory=dict)
    adapter_ranks: dict[str, int] | None = None  # AdaLoRA: each adapted module's allocated rank


@dataclass
class TrainingState:
    """Everything the loop carries from step to step; a checkpoint is this, packed (see pack and restore)."""

    optimizer: torch.optim.Optimizer
    schedule: object  # lorafit.schedule.Schedule
    trainable: dict[str, torch.nn.Parameter]
    progress: Progress = field(default_factory=Progress)
    result: Result = field(default_factory=Result)
    best: dict[str, torch.Tensor] | None = None  # the trainable weights of the best evaluation so far
    method: object = None  # lorafit.training.methods.MethodSteps: a method's own state (AdaLoRA's scores)


def pack(state: TrainingState, config: dict, processes: int = 1, rngs: list | None = None) -> dict:
    """A checkpoint's content; several processes add every process's RNG state (LoRA dropout draws differ per process)."""
    extra = {"processes": processes, "rng_ranks": rngs} if processes > 1 else {}
    return extra | {
        "config": config,
        "progress": asdict(state.progress),
        "result": asdict(state.result),
        "trainable": {k: v.detach().cpu().clone() for k, v in state.trainable.items()},
        "best": {k: v.cpu() for k, v in state.best.items()} if state.best is not None else None,
        "optimizer": state.optimizer.state_dict(),
        "schedule": state.schedule.state_dict(),
        "rng": rng_state(),
        "method": state.method.state_dict() if state.method is not None else {},
    }


def restore(state: TrainingState, saved: dict, config: dict, device) -> float | None:
    """Load a checkpoint into the freshly set-up weights, optimizer and schedule (the RNG is restored by the caller,
    last). Returns the lr the checkpoint was trained with when `config` asks for another one, else None."""
    saved_config = migrate_saved(saved["config"])
    changed = list(config_changes(saved_config, config, ignore=RESUME_OVERRIDES))
    if changed:
        raise LorafitError(
            f"{saved['path']} was written with a different config ({', '.join(changed[:5])} differ); resume with the run's own config.yaml or start a new run"
        )
    if set(saved["trainable"]) != set(state.trainable):
        raise LorafitError(
            f"{saved['path']} does not hold this model's trainable parameters; resume with the run's own config.yaml or start a new run"
        )
    with torch.no_grad():
        for name, p in state.trainable.items():
            p.copy_(saved["trainable"][name])
    state.optimizer.load_state_dict(saved["optimizer"])
    state.schedule.load_state_dict(saved["schedule"])
    state.progress, state.result = Progress(**saved["progress"]), Result(**saved["result"])
    if state.method is not None:
        state.method.load_state_dict(saved.get("method") or {})
    state.best = {k: v.to(device) for k, v in saved["best"].items()} if saved["best"] is not None else None
    old_lr = saved_config["train"]["lr"]
    return old_lr if config["train"]["lr"] != old_lr else None


def rng_state() -> dict:
    """Every random generator a training step may draw from (LoRA dropout uses torch's)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
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
        self.folder = Path(run_folder) / CHECKPOINTS
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
                print(
                    f"note: skipping unreadable checkpoint {path} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
                    flush=True,
                )
                continue
            if not isinstance(state, dict) or state.get("format") != FORMAT:
                raise LorafitError(
                    f"{path}: not a lorafit checkpoint of format {FORMAT}; it was written by another lorafit version, start a new run"
                )
            state["path"] = str(path)
            return state
        return None
