import os
import subprocess
import sys

import pytest

from tether.fast import allocator


def make_library(directory, name):
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_bytes(b"")
    return path


def relaunched(env, dirs):
    """(executable, argv, env) of the re-execution `allocator.relaunch` asks for, or None."""
    calls = []
    allocator.relaunch(["ppo", "--resume"], env, dirs, lambda *call: calls.append(call))
    return calls[0] if calls else None


def test_relaunch_prefers_tcmalloc_and_keeps_the_users_preloads(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    make_library(first, "libjemalloc.so.2")
    tcmalloc = make_library(second, "libtcmalloc_minimal.so.4")
    make_library(second, "libtcmalloc_minimal_debug.so.4")

    executable, argv, env = relaunched({"LD_PRELOAD": "/opt/libhook.so"}, [first, second])

    assert executable == sys.executable
    assert argv == [sys.executable, "-m", "tether", "ppo", "--resume"]
    assert env["LD_PRELOAD"] == f"{tcmalloc} /opt/libhook.so"
    assert int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 1 << 40


def test_relaunch_falls_back_to_jemalloc_then_to_running_as_it_is(tmp_path):
    jemalloc = make_library(tmp_path / "lib", "libjemalloc.so.2")
    assert relaunched({}, [tmp_path / "lib"])[2]["LD_PRELOAD"] == str(jemalloc)
    assert relaunched({}, [tmp_path / "empty", tmp_path / "missing"]) is None


def test_no_relaunch_when_chosen_off_or_already_preloaded(tmp_path):
    library = make_library(tmp_path, "libtcmalloc_minimal.so.4")
    assert relaunched({"TETHER_MALLOC": "system"}, [tmp_path]) is None
    # the re-executed process itself, and a user who preloads an allocator of their own
    assert relaunched({"LD_PRELOAD": str(library)}, [tmp_path]) is None
    assert relaunched({"LD_PRELOAD": "/x/libmimalloc.so.2"}, [tmp_path]) is None


def test_a_chosen_library_is_preloaded_once_and_a_missing_one_is_an_error(tmp_path, capsys):
    mine = make_library(tmp_path, "my_malloc.so")
    env = relaunched({"TETHER_MALLOC": str(mine)}, [])[2]
    assert env["LD_PRELOAD"] == str(mine)
    assert relaunched(env, []) is None  # its name is no known allocator's: no loop
    with pytest.raises(SystemExit) as stopped:
        relaunched({"TETHER_MALLOC": str(tmp_path / "nope.so")}, [])
    assert stopped.value.code == 2
    assert f"TETHER_MALLOC={tmp_path / 'nope.so'}: no such library" in capsys.readouterr().err


installed = allocator.find_library(allocator.library_dirs())


@pytest.mark.skipif(installed is None, reason="neither tcmalloc nor jemalloc is installed")
@pytest.mark.parametrize("choice", ["auto", "system"])
def test_the_cli_runs_on_the_installed_allocator_unless_told_not_to(choice):
    env = {"TETHER_MALLOC": choice, "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-m", "tether", "--version"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    expected = "glibc" if choice == "system" else installed.name.split(".")[0][3:].split("_")[0]
    assert f"malloc: {expected}" in out


RELEASE_SCRIPT = """
import torch
from tether.fast.allocator import release_freed_memory
from tether.hardware import keep_freed_memory

def rss_mb():
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(status["VmRSS"].split()[0]) / 1024

keep_freed_memory()  # as the demo runs: freed memory stays in the process
blocks = [torch.ones(64, 1024, 1024 // 4) for _ in range(8)]  # 8 x 64 MiB, touched
del blocks
kept = rss_mb()
release_freed_memory()
print(kept, rss_mb())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("choice", ["system", "auto"])
def test_freed_memory_goes_back_to_the_kernel_between_stages(choice):
    """Freed blocks that the allocator keeps (glibc told to keep them, or tcmalloc's spans)
    leave the process's resident set once released."""
    env = {**os.environ, "TETHER_MALLOC": choice}
    library = allocator.preload_for(env, allocator.library_dirs())
    if choice == "auto" and library is None:
        pytest.skip("no tcmalloc or jemalloc installed")
    if library is not None:
        env = allocator.preloading(library, env)
    proc = subprocess.run(
        [sys.executable, "-c", RELEASE_SCRIPT], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    kept, released = map(float, proc.stdout.split())
    assert kept - released > 300  # of the 512 MiB freed
