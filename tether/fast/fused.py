"""The rollout engine's fused CPU kernels (`fused_decode.cpp`): built once per machine, loaded
as `torch.ops.tether.*`.

Why C++: a decode step's elementwise work (RMSNorm, RoPE and the cache writes, SiLU·up) is a
few dozen ATen ops per layer on tensors of a few rows; their dispatch and separate passes over
memory cost about as much as the step's matmuls. One kernel per group does the same
arithmetic in one pass, rounding where the ATen ops round (the norm's float32 sum of squares
runs in another order, so its last bit can differ). Decode attention, one query per row
against the cache, is a kernel too: as two bmm it ran a few kilobytes per matrix at a small
fraction of the machine's rate, over every slot of the cache rather than the filled ones.
So is the sampler's softmax: its weights and their block sums in two passes over the logits,
where the ATen ops made six over a float32 copy.

Why not `torch.utils.cpp_extension.load`: it needs ninja and builds a pybind11 module. The
kernels register plain torch ops (`TORCH_LIBRARY`), so one `g++` call
against torch's headers builds them (~15 s) and `torch.ops.load_library` loads them. The
library lands in the cache directory under a name hashed from the source, torch's version, the
flags and the CPU's features (it is built with `-march=native`), written by rename, so
concurrent builders (test workers) and a cache shared between machines stay correct.

Where no compiler works, the engine runs its ATen ops instead, with a warning saying why.
`TETHER_FUSED=0` turns the kernels off (to compare, or to rule them out).
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from tether.hardware import cache_dir, cpu_flags, has_cpu_flags

SOURCE = Path(__file__).with_name("fused_decode.cpp")
SWITCH = "TETHER_FUSED"
# -ffp-contract=off: no fused multiply-adds where the ATen ops they replace round the product.
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-ffp-contract=off", "-fopenmp", "-std=c++20"]


def target_flags() -> list[str]:
    """FLAGS, less AVX-512 where TETHER_HIDE_CPU_FLAGS hides it: under the mask of an
    AVX2-only CPU the build leaves out the kernels' AVX-512 branches (`#ifdef __AVX512F__`),
    as that CPU's build does, so a masked test run checks the code such a CPU runs."""
    hidden = "avx512f" in cpu_flags(masked=False).split() and not has_cpu_flags("avx512f")
    return [*FLAGS, "-mno-avx512f"] if hidden else FLAGS


def library_path() -> Path:
    """Where this machine's build lives (whether or not it exists yet)."""
    key = "\n".join(
        [SOURCE.read_text(), torch.__version__, " ".join(target_flags()), sys.platform, cpu_flags()]
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / "kernels" / f"fused_decode-{digest}.so"


def compile_command(output: Path) -> list[str]:
    from torch.utils.cpp_extension import include_paths

    torch_lib = Path(torch.__file__).parent / "lib"
    compiler = os.environ.get("CXX") or shutil.which("g++") or "c++"
    return [
        compiler,
        *target_flags(),
        "-shared",
        "-fPIC",
        "-w",  # torch's headers warn under C++20; our own code is checked by the tests
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        *[f"-I{p}" for p in include_paths()],
        str(SOURCE),
        "-o",
        str(output),
        f"-L{torch_lib}",
        "-lc10",
        "-ltorch_cpu",
        f"-Wl,-rpath,{torch_lib}",
    ]


def build() -> Path:
    """Compile the kernels unless this machine's build is cached; returns its path. Raises
    RuntimeError with the compiler's message when the build fails."""
    path = library_path()
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        partial = Path(scratch) / path.name
        try:
            proc = subprocess.run(compile_command(partial), capture_output=True, text=True)
        except OSError as err:  # no compiler at all
            raise RuntimeError(f"cannot run the C++ compiler: {err}") from err
        if proc.returncode != 0:
            raise RuntimeError(f"compiling {SOURCE.name} failed:\n{proc.stderr[-2000:]}")
        os.replace(partial, path)
    return path


@functools.cache
def kernels():
    """`torch.ops.tether` with the fused kernels loaded, or None where they are switched off
    or cannot be built (warned once)."""
    if os.environ.get(SWITCH, "1") == "0":
        return None
    try:
        torch.ops.load_library(str(build()))
    except (RuntimeError, OSError) as err:
        print(f"tether: fused decode kernels unavailable, using ATen ops ({err})", file=sys.stderr)
        return None
    return torch.ops.tether


if __name__ == "__main__":  # `python -m tether.fast.fused`: build now (make setup), print where
    try:
        print(build())
    except RuntimeError as err:
        sys.exit(f"tether: fused decode kernels not built: {err}")
