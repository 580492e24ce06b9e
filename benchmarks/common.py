"""What the tether-vs-TRL benchmarks share: the seeded HH split, a timed subprocess with its
own peak RSS, and TRL's separate venv."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT.parent / "shared/data/hh-rlhf/harmless-base-1800.jsonl.gz"
TRL_VENV = ROOT / "benchmarks/.venv-trl"
TRL_REQUIREMENTS = ["torch==2.13.0", "trl==1.16.0", "peft", "gguf"]


def split_hh(work: Path, n_train: int, n_val: int, seed: int = 0) -> tuple[Path, Path]:
    """Seeded split of the parsed HH pairs into tether-format JSONL files."""
    from tether.data import load_preference_data

    pairs, _ = load_preference_data(HH)
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    files = []
    for name, idx in (("train", order[:n_train]), ("val", order[n_train : n_train + n_val])):
        path = work / f"{name}.jsonl"
        path.write_text(
            "".join(
                json.dumps(
                    {
                        "prompt": pairs[i].prompt,
                        "chosen": pairs[i].chosen,
                        "rejected": pairs[i].rejected,
                    }
                )
                + "\n"
                for i in idx
            )
        )
        files.append(path)
    return files[0], files[1]


_PEAK_RSS = (
    "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)"
)


def same_allocator() -> dict[str, str]:
    """The environment for either side of a comparison: preloading the allocator that the
    `tether` command would (`tether.fast.allocator`), so that the two differ in their code, not in
    their malloc. `TETHER_MALLOC=system` runs both on glibc's."""
    from tether.fast import allocator

    library = allocator.preload_for(os.environ, allocator.library_dirs())
    return dict(os.environ) if library is None else allocator.preloading(library, os.environ)


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS GiB) of a command, measured in a fresh wrapper process so each
    side's peak is its own; on `same_allocator`."""
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS, *cmd],
        stderr=subprocess.PIPE,
        text=True,
        env=same_allocator(),
    )
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    wall = time.perf_counter() - started
    return wall, int(proc.stderr.strip().splitlines()[-1]) / 2**20


def trl_precision() -> list[str]:
    """TRL's precision flag for the TRL scripts: tether's `precision: auto` (bf16 autocast
    where the CPU has native bf16, else float32), so both sides of a run compute alike.
    Emulated bf16 is many times slower than float32."""
    from tether.hardware import bf16_available

    return [] if bf16_available() else ["--no-bf16"]


def ensure_trl_venv() -> Path:
    python = TRL_VENV / "bin/python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True)
        for req in TRL_REQUIREMENTS:  # torch first: a bare torch pulls a CUDA build
            subprocess.run([str(python), "-m", "pip", "install", "-q", req], check=True)
    return python


def keep_pairs_that_fit(
    train: Path, model_dir: str, max_length: int, batch_size: int
) -> tuple[int, Path]:
    """(steps, path) of the training pairs whose two sequences fit in `max_length` tokens,
    cut to whole batches, so each side trains on exactly these pairs once."""
    from transformers import AutoTokenizer

    from tether.data import as_messages
    from tether.models.reward_model import encode_response

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    records = [json.loads(line) for line in train.open()]
    fits = [
        r
        for r in records
        if all(
            len(encode_response(tokenizer, as_messages(r["prompt"]), r[k], 10**9)) <= max_length
            for k in ("chosen", "rejected")
        )
    ]
    steps = len(fits) // batch_size
    kept = train.with_name(f"{train.stem}-fit{max_length}.jsonl")
    kept.write_text("".join(json.dumps(r) + "\n" for r in fits[: steps * batch_size]))
    print(f"{len(fits)}/{len(records)} training pairs fit in {max_length} tokens; {steps} steps")
    return steps, kept
