"""Where and in what precision lorafit computes: device, dtype, threads, CPU features, heap trimming.

bf16 where the hardware has it: the frozen base is stored in bf16, adapters and head stay fp32 for AdamW.
"""

from __future__ import annotations

import contextlib
import os
from functools import lru_cache

import torch
from torch import nn

from ..errors import LorafitError


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them (empty where /proc/cpuinfo cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(f.read().split())
    except OSError:
        return frozenset()


def cpu_has_bf16() -> bool:
    return not cpu_flags().isdisjoint({"avx512_bf16", "amx_bf16"})


def pick_device() -> torch.device:
    if os.environ.get("LORAFIT_DEVICE"):
        return torch.device(os.environ["LORAFIT_DEVICE"])
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    if precision == "fp32":
        return torch.float32
    if precision == "fp16":
        if device.type != "cuda":
            raise LorafitError(
                "train.precision=fp16 needs a CUDA GPU and none is in use; use precision auto, bf16 or fp32"
            )
        return torch.float16
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
    else:
        supported = cpu_has_bf16()
    if precision == "bf16":
        return torch.bfloat16  # asked for explicitly: honour it (emulated and slow where unsupported)
    return torch.bfloat16 if supported else torch.float32


def set_threads(n: int | None) -> None:
    torch.set_num_threads(
        n or max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    )


def concurrent_passes(device: torch.device) -> int:
    """How many inference forward passes to run at once on `device`, each on its share of torch's threads.

    A GPU runs one at a time. On a CPU, two passes on one thread each beat one pass split over two: a split pass
    waits at every operation for the slower of its threads (`scripts/eval-passes` measures it, docs/performance.md)."""
    return 1 if device.type != "cpu" else min(2, torch.get_num_threads())


@lru_cache(maxsize=1)
def _libc():
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (macOS, musl): nothing to do
        return None


def release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc). Batches of varying length leave the heap fragmented with
    free blocks of every size, and peak RSS creeps up over the first minutes of training; trimming every few
    steps keeps it flat for a fraction of a percent of the step time."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


ADAPTER_NAME = "default"  # peft names every adapter parameter, and the trained copy of the head, after the adapter


def is_adapter_parameter(name: str) -> bool:
    """An adapter's own parameter or the head's trained copy, whatever the method: 'lora_A.default.weight',
    'ia3_l.default', 'classifier.modules_to_save.default.bias'; not a wrapped base layer's 'base_layer.weight'."""
    return ADAPTER_NAME in name.split(".")


def store_frozen_in(model: nn.Module, dtype: torch.dtype) -> None:
    """Keep frozen weights in the compute dtype (halves memory and casts); trainable ones stay fp32.

    PEFT casts each adapter's input to the adapter's dtype (fp32) before the LoRA matmuls; under autocast
    those matmuls run in bf16 anyway, so that round trip is pure copying and is switched off.
    """
    if dtype == torch.float32:
        return
    for name, p in model.named_parameters():
        # adapter and head weights stay fp32 even when frozen (a reloaded run), so it computes like in training
        if not p.requires_grad and p.is_floating_point() and not is_adapter_parameter(name):
            p.data = p.data.to(dtype)
    for module in model.modules():
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = False


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
