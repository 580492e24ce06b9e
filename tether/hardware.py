"""What this machine offers and how tether uses it: the device, CPU features, bf16, threads,
malloc, GPU memory.

A run's device, precision and thread count are decided here once, from the hardware the
models run on, so that every stage, the demo and the rollout engine agree. Precision follows
the device the models sit on, never the mere presence of a GPU in the machine.
"""

from __future__ import annotations

import contextlib
import ctypes
import fnmatch
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from tether.errors import TetherError


def cache_dir() -> Path:
    return Path(os.environ.get("TETHER_CACHE", "~/.cache/tether")).expanduser()


# Glob patterns of CPU flags to hide from tether, to run as on a lesser CPU: with
# TETHER_HIDE_CPU_FLAGS='avx512* amx* avx_ne_convert avx_vnni*' an AVX-512 machine takes the
# paths of an AVX2-only one (float32 by default, no bf16 weight packing), so CI on either
# kind of machine exercises both.
HIDE_CPU_FLAGS = "TETHER_HIDE_CPU_FLAGS"


def cpu_flags(masked: bool = True) -> str:
    """The CPU's feature flags as /proc/cpuinfo lists them ("" where it cannot be read),
    less those TETHER_HIDE_CPU_FLAGS hides unless `masked` is False."""
    line = ""
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        line = next((x for x in lines if x.startswith("flags")), "")
    hidden = os.environ.get(HIDE_CPU_FLAGS, "").split() if masked else []
    if not hidden or not line:
        return line
    head, _, flags = line.partition(":")
    kept = [f for f in flags.split() if not any(fnmatch.fnmatchcase(f, p) for p in hidden)]
    return f"{head}: {' '.join(kept)}"


def has_cpu_flags(*names: str) -> bool:
    flags = set(cpu_flags().partition(":")[2].split())
    return all(name in flags for name in names)


def bf16_weight_packing() -> bool:
    """Whether oneDNN can pack bf16 weights on this CPU: PyTorch refuses the reorder without
    AVX-NE-CONVERT or AVX-512 BW+VL+DQ (an AVX2-only CPU such as Zen 2 has neither)."""
    return has_cpu_flags("avx_ne_convert") or has_cpu_flags("avx512bw", "avx512vl", "avx512dq")


def resolve_device(spec: str = "auto") -> torch.device:
    """The device a run's models sit on, from `train.device`.

    auto: this process's GPU where CUDA is available (`cuda:LOCAL_RANK` under torchrun, one
    GPU per rank), else the CPU. `cuda` alone also means the local rank's GPU. A CUDA device
    that this machine does not have is an error here, before any model loads.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError as e:
        raise TetherError(f"train.device: {spec!r} is not a device ({e})") from e
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise TetherError(f"train.device: {spec!r}; tether runs on cpu or cuda")
    if not torch.cuda.is_available():
        raise TetherError(
            f"train.device: {spec} but this machine has no usable CUDA device "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda}); "
            "use train.device: cpu (or auto)"
        )
    index = local_rank if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise TetherError(
            f"train.device: {spec} asks for GPU {index}; this machine has "
            f"{torch.cuda.device_count()}"
        )
    return torch.device("cuda", index)


def bf16_available(device: torch.device | str = "cpu") -> bool:
    """Whether bf16 autocast pays on `device`: a GPU of compute capability 8.0 or newer
    (Ampere on), or a CPU with native bf16 dot products (AVX512-BF16/AMX). Elsewhere bf16 is
    emulated and slower than fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", cpu_flags()))


def describe(device: torch.device, bf16: bool) -> str:
    """Where a run computes and in which precision, for its first line."""
    where = str(device)
    if device.type == "cuda":
        where += f" ({torch.cuda.get_device_name(device)})"
    return f"{where}, {'bf16 autocast over fp32 weights' if bf16 else 'fp32'}"


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


def use_bf16(precision: str, device: torch.device | str = "cpu") -> bool:
    """`train.precision` on `device`: auto is bf16 where the device computes it natively."""
    return precision == "bf16" or (precision == "auto" and bf16_available(device))


@contextlib.contextmanager
def autocast(enabled: bool) -> Iterator[None]:
    """bf16 autocast over float32 master weights (matmuls in bf16, reductions in fp32).

    Autocast is per device type, so this enters it for the CPU and, once this process has
    put anything on a GPU, for CUDA too: each op runs under its own device's autocast, and
    callers need not say where their models are.
    """
    if not enabled:
        yield
        return
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.autocast(device_type="cpu", dtype=torch.bfloat16))
        if torch.cuda.is_initialized():
            stack.enter_context(torch.autocast(device_type="cuda", dtype=torch.bfloat16))
        yield


def use_deterministic(enabled: bool) -> None:
    """`train.deterministic`: PyTorch's deterministic algorithms, so a rerun (and a resumed
    run) computes bit for bit what the first one did. On a GPU it costs speed: cuBLAS gets a
    fixed workspace, cuDNN's autotuner is off, and ops without a deterministic kernel raise
    instead of running."""
    if not enabled:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def cuda_memory(device: torch.device) -> dict[str, float]:
    """GPU memory since the last call (`memory/cuda_peak_gib`) and held by PyTorch's caching
    allocator (`memory/cuda_reserved_gib`); empty off the GPU. Resets the peak."""
    if device.type != "cuda":
        return {}
    gib = 2**30
    stats = {
        "memory/cuda_peak_gib": torch.cuda.max_memory_allocated(device) / gib,
        "memory/cuda_reserved_gib": torch.cuda.memory_reserved(device) / gib,
    }
    torch.cuda.reset_peak_memory_stats(device)
    return stats


def is_out_of_memory(error: BaseException) -> bool:
    """A GPU OOM, or a CPU allocation failure (which PyTorch raises as a RuntimeError)."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "can't allocate memory" in str(error)
