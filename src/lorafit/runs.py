"""Run folders: written under a temporary name and renamed when complete, reloaded for evaluation."""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import Config, read_yaml, validate
from .errors import LorafitError

REQUIRED_FILES = ("config.yaml", "labels.json", "metrics.json", "adapter/adapter_config.json")


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
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise LorafitError(f"output folder {out} already exists and is not empty; pick another -o or pass --overwrite")


@contextlib.contextmanager
def partial_folder(out: Path):
    """Yield a sibling work folder; rename it to `out` on success, remove it on any failure."""
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / f".{out.name}.partial"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir()
    try:
        yield work
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    work.rename(out)


@dataclass
class LoadedRun:
    folder: Path
    cfg: Config
    label_names: list[str]
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    dtype: torch.dtype


def read_run_config(folder: Path) -> Config:
    folder = Path(folder)
    if not folder.is_dir():
        raise LorafitError(f"run folder {folder} not found; expected a folder written by `lorafit train`")
    missing = [f for f in REQUIRED_FILES if not (folder / f).exists()]
    if missing:
        raise LorafitError(f"{folder} is not a complete lorafit run (missing {', '.join(missing)}); train it again or pick another folder")
    return validate(read_yaml(folder / "config.yaml"), str(folder / "config.yaml"))


def load_run(folder: Path, precision: str | None = None) -> LoadedRun:
    """The saved adapter and head on top of a freshly loaded base model, ready for inference."""
    from peft import PeftModel

    from .engine import pick_device, resolve_precision, store_frozen_in
    from .models import build_model, load_tokenizer

    folder = Path(folder)
    cfg = read_run_config(folder)
    label_names = json.loads((folder / "labels.json").read_text())
    device = pick_device()
    dtype = resolve_precision(precision or cfg.train.precision, device)
    base = build_model(cfg, len(label_names), label_names)
    model = PeftModel.from_pretrained(base, str(folder / "adapter"))
    model.to(device)
    model.eval()
    store_frozen_in(model, dtype)
    tokenizer = load_tokenizer(str(folder / "tokenizer"))
    return LoadedRun(folder, cfg, label_names, model, tokenizer, device, dtype)
