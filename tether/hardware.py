"""What this machine offers and how tether uses it: CPU features, bf16, threads, malloc.

A run's precision and thread count are decided here once, from the hardware the models
run on, so that every stage, the demo and the rollout engine agree.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
from pathlib import Path

import torch


def cache_dir() -> Path:
    return Path(os.environ.get("TETHER_CACHE", "~/.cache/tether")).expanduser()


def cpu_flags() -> str:
    """The CPU's feature flags as /proc/cpuinfo lists them ("" where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def bf16_available() -> bool:
    """bf16 autocast pays on CUDA and on CPUs with native bf16 dot products (AVX512-BF16/AMX);
    elsewhere it emulates bf16 and is slower than fp32."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", cpu_flags()))


def set_threads(threads: int) -> None:
    """`threads`, or the cores available shared among the processes of this node."""
    available = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    )
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(threads or max(1, available // processes))


# mallopt's parameter numbers (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> bool:
    """Have glibc keep freed memory in the process for reuse, rather than hand it back to the
    kernel; False where the C library is not glibc.

    By default a block above the mmap threshold (128 KiB, rising with use to at most 32 MiB)
    is mapped when allocated and unmapped when freed, and a free top of the heap is trimmed.
    A training step or a decode step allocates and frees the same activations over and over,
    so each time the kernel maps them afresh and faults their pages in, which costs system
    time on every step. Kept, the freed blocks are reused: once the heap has grown to hold a
    step's allocations, their pages are not faulted in again (tests/test_training.py counts
    the faults), and reused memory adds nothing to the peak RSS. benchmarks/RESULTS.md
    ("Freed memory kept for reuse") measures the effect on a PPO iteration.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, 1 << 30) and mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def use_bf16(precision: str) -> bool:
    return precision == "bf16" or (precision == "auto" and bf16_available())


def autocast(enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast over float32 master weights (matmuls in bf16, reductions in fp32)."""
    if not enabled:
        return contextlib.nullcontext()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.autocast(device_type=device, dtype=torch.bfloat16)
