"""Run the CLI on tcmalloc (or jemalloc) where one is installed: glibc's malloc fragments.

A policy pass with its graph allocates saved activations between short-lived temporaries of
similar sizes. glibc's malloc serves them from one heap and cannot give back the holes the
temporaries leave, so the heap grows far past what is live. On a LoRA PPO iteration of SmolLM2
(16 rows of 95 tokens, float32) the live bytes peaked at 1.88 GiB while glibc's heap reached
3.1 GiB. tcmalloc and jemalloc keep memory in size classes and reuse it: that process peaked
at 2.8 GB RSS under either, 4.1 GB under glibc, in the same time (benchmarks/RESULTS.md).
PyTorch's own CPU launcher (`torch.backends.xeon.run_cpu`) preloads tcmalloc by default for
the same reason.

The allocator of a process is fixed when it starts, so the `tether` command re-executes itself
once with the library in LD_PRELOAD. `TETHER_MALLOC` chooses: `auto` (the default: tcmalloc,
else jemalloc, else glibc's), `system` (glibc's, no re-execution), or a library's path.
Code that calls `tether.cli.main` from Python keeps its process's allocator.
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys
import sysconfig
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

CHOICE = "TETHER_MALLOC"
# In order of preference: tcmalloc's minimal build (no heap profiler) is as fast as glibc
# with `hardware.keep_freed_memory` and spends the least system time; jemalloc is ~15% slower
# (benchmarks/RESULTS.md).
LIBRARIES = ("libtcmalloc_minimal.so", "libtcmalloc.so", "libjemalloc.so")
KNOWN = ("tcmalloc", "jemalloc", "mimalloc")
# tcmalloc reports every allocation above 1 GiB on stderr (a fp32 logits tensor can be one).
QUIET = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}


def library_dirs() -> list[Path]:
    """Where distributions install shared libraries, this Python's own prefix first (conda)."""
    dirs = [Path(sys.prefix) / "lib", Path(sysconfig.get_config_var("LIBDIR") or "/usr/lib")]
    multiarch = sysconfig.get_config_var("MULTIARCH")
    for root in ("/usr/lib", "/usr/local/lib", "/lib"):
        if multiarch:
            dirs.append(Path(root) / multiarch)
        dirs.append(Path(root))
    dirs += [Path("/usr/lib64"), Path("/lib64")]
    return list(dict.fromkeys(dirs))


def find_library(dirs: Sequence[Path]) -> Path | None:
    """The first of LIBRARIES (any soname version) in `dirs`, in LIBRARIES' order."""
    for name in LIBRARIES:
        for directory in dirs:
            matches = sorted(directory.glob(f"{name}*")) if directory.is_dir() else []
            if matches:
                return matches[0]
    return None


def preload_for(env: Mapping[str, str], dirs: Sequence[Path]) -> Path | None:
    """The library the CLI should re-execute itself with, or None to run as it is.

    None when the user chose `system`, or a known allocator is already preloaded (which is
    also how the re-executed process knows not to go round again).
    """
    choice, preloaded = env.get(CHOICE, "auto"), env.get("LD_PRELOAD", "")
    if choice == "system" or any(name in preloaded for name in KNOWN):
        return None
    if choice != "auto":
        library: Path | None = Path(choice)
    else:
        library = find_library(dirs) if sys.platform.startswith("linux") else None
    return None if library is None or str(library) in preloaded else library


def relaunch(
    argv: Sequence[str],
    env: Mapping[str, str] = os.environ,
    dirs: Sequence[Path] | None = None,
    execve: Callable[[str, list[str], dict[str, str]], None] = os.execve,
) -> None:
    """Re-execute `python -m tether ARGV` with the allocator preloaded, or return."""
    library = preload_for(env, library_dirs() if dirs is None else dirs)
    if library is None:
        return
    if not library.is_file():
        print(f"tether: error: {CHOICE}={library}: no such library", file=sys.stderr)
        raise SystemExit(2)
    execve(sys.executable, [sys.executable, "-m", "tether", *argv], preloading(library, env))


def preloading(library: Path, env: Mapping[str, str]) -> dict[str, str]:
    """`env` with `library` first in LD_PRELOAD (the user's own preloads kept after it)."""
    preload = " ".join(p for p in (str(library), env.get("LD_PRELOAD", "")) if p)
    return {**QUIET, **env, "LD_PRELOAD": preload}


def active() -> str:
    """The allocator this process runs on: the preloaded one found in its memory map, else
    "glibc" (or "system" where there is no /proc)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    return next((name for name in KNOWN if f"lib{name}" in maps), "glibc")


def release_freed_memory() -> None:
    """Hand memory freed so far back to the kernel: between the stages of one process (the
    demo's), so that the next stage's peak does not sit on the last one's freed pages.
    tcmalloc keeps freed spans for reuse and glibc keeps its heap (`keep_freed_memory`); a
    stage whose allocations have other sizes and layouts reuses little of either.
    """
    gc.collect()
    try:
        process = ctypes.CDLL(None)
    except OSError:
        return
    release = getattr(process, "MallocExtension_ReleaseFreeMemory", None)  # tcmalloc
    mallctl = getattr(process, "mallctl", None)  # jemalloc
    trim = getattr(process, "malloc_trim", None)  # glibc (present under the others too)
    if release is not None:
        release()
    elif mallctl is not None:
        mallctl(b"arena.4096.purge", None, None, None, 0)  # 4096: MALLCTL_ARENAS_ALL
    elif trim is not None:
        trim(0)


if __name__ == "__main__":  # `make setup`: which library the CLI preloads; status 1 if none
    found = find_library(library_dirs())
    print(found or "no tcmalloc or jemalloc found")
    sys.exit(found is None)
