"""lorafit's one compiled kernel: attention for inference on CPUs with AVX-512 BF16 (csrc/attention.c).

PyTorch's CPU flash attention splits every head into blocks of 32 queries and multiplies them through small GEMM
calls; at the few dozen tokens of a news text those calls' fixed cost is most of the time (docs/performance.md
has the profile). The kernel keeps a whole head in L1 cache and uses the bf16 dot-product instruction
directly, with the same numerics (exact products, fp32 sums and softmax, probabilities rounded to bf16).

It is built on first use with the system C compiler (`$CC`, else `cc`) into `~/.cache/lorafit` (or
`$LORAFIT_CACHE_DIR`) and reused after that. It links libgomp by soname, so in a process that
imported torch it runs on torch's own OpenMP threads (torch.get_num_threads() of them), not on a second pool.
Where it cannot run (no AVX-512 BF16, no compiler, a failed build, `LORAFIT_KERNELS=0`) callers get None and keep
SDPA.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import warnings
from functools import lru_cache
from pathlib import Path

import torch

from .device import cpu_flags

SOURCE = Path(__file__).with_name("csrc") / "attention.c"
FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma", "-fopenmp", "-fPIC", "-shared")
MAX_HEAD_DIM = 128  # MAX_D in attention.c


def cache_dir() -> Path:
    if os.environ.get("LORAFIT_CACHE_DIR"):
        return Path(os.environ["LORAFIT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lorafit"


def cpu_supports() -> bool:
    return {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"} <= cpu_flags()


def _build(compiler: str) -> Path:
    """The compiled library, built once per source, compiler and flags; raises OSError or CalledProcessError."""
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join((compiler, *FLAGS)).encode()).hexdigest()[:16]
    lib = cache_dir() / f"attention-{digest}.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        tmp = lib.with_name(f"{lib.name}.{os.getpid()}.tmp")
        try:
            subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(tmp)], check=True, capture_output=True, text=True)
            os.replace(tmp, lib)  # whole or not at all, also with several processes building at once
        finally:
            tmp.unlink(missing_ok=True)
    return lib


@lru_cache(maxsize=1)
def attention_kernel():
    """The kernel's C function, or None where it cannot run here (then a one-line warning says why, once)."""
    if os.environ.get("LORAFIT_KERNELS", "1") == "0" or not cpu_supports():
        return None
    compiler = os.environ.get("CC") or "cc"
    why = None
    if shutil.which(compiler) is None:
        why = f"no C compiler '{compiler}' on PATH"
    else:
        try:
            fn = ctypes.CDLL(str(_build(compiler))).lorafit_attention
        except subprocess.CalledProcessError as e:
            lines = (e.stderr or "").strip().splitlines()
            why = f"'{compiler}' failed: {lines[-1] if lines else f'exit status {e.returncode}'}"
        except OSError as e:
            why = str(e)
    if why:
        warnings.warn(
            f"lorafit: attention kernel unavailable ({why}); using PyTorch's SDPA, which is slower on this CPU. Set CC to a C compiler with AVX-512 BF16 support to enable it",
            stacklevel=2,
        )
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    strides = ctypes.POINTER(ctypes.c_int64)
    fn.argtypes = [
        p,
        p,
        p,
        p,
        p,
        i64,
        i64,
        i64,
        i64,
        i64,
        strides,
        strides,
        strides,
        strides,
        ctypes.c_float,
        ctypes.c_int,
    ]
    fn.restype = ctypes.c_int
    return fn


def attention_applies(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether `attention` can take this call: CPU bf16 (B, H, L, D) tensors with no gradient wanted, D a multiple
    of 32 up to 128, and a boolean (B or 1, H or 1, Lq or 1, Lk) mask or none."""
    b, h, lq, d = query.shape if query.dim() == 4 else (0, 0, 0, 0)
    if not d or query.device.type != "cpu" or d % 32 or d > MAX_HEAD_DIM:
        return False
    if key.dim() != 4 or key.shape != value.shape or tuple(key.shape[:2]) != (b, h) or key.shape[3] != d:
        return False
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        return False
    for t in (query, key, value):
        if t.dtype != torch.bfloat16 or t.stride(-1) != 1 or any(s % 2 for s in t.stride()[:3]) or t.data_ptr() % 4:
            return False
    if mask is not None:
        if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[3] != key.shape[2]:
            return False
        if mask.shape[0] not in (1, b) or mask.shape[1] not in (1, h) or mask.shape[2] not in (1, lq):
            return False
    return attention_kernel() is not None


def attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scale: float | None = None
) -> torch.Tensor:
    """softmax(query key^T * scale, where mask) value, returned as (B, Lq, H, D) contiguous: what transformers'
    attention functions return. Call only where `attention_applies`."""
    b, h, lq, d = query.shape
    lk = key.shape[2]
    out = torch.empty(b, lq, h, d, dtype=query.dtype)

    def strides(t: torch.Tensor, n: int):
        return (ctypes.c_int64 * n)(
            *(s if size > 1 else 0 for s, size in zip(t.stride()[:n], t.shape[:n], strict=True))
        )

    if mask is not None and mask.stride(3) != 1:
        mask = mask.contiguous()
    rc = attention_kernel()(
        query.data_ptr(),
        key.data_ptr(),
        value.data_ptr(),
        None if mask is None else mask.data_ptr(),
        out.data_ptr(),
        b,
        h,
        lq,
        lk,
        d,
        strides(query, 3),
        strides(key, 3),
        strides(value, 3),
        strides(mask, 4) if mask is not None else (ctypes.c_int64 * 4)(),
        d**-0.5 if scale is None else scale,
        torch.get_num_threads(),
    )
    if rc:
        raise (
            MemoryError("lorafit attention kernel: out of memory")
            if rc == -2
            else RuntimeError(f"lorafit attention kernel: unsupported shape {tuple(query.shape)}")
        )
    return out
