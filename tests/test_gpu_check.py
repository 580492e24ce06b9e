"""benchmarks/gpu_check.py at tiny scale on the CPU: the script a GPU session runs stays
runnable, and every one of its checks passes where it can run without a GPU."""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_check_passes_on_the_cpu_at_tiny_scale(smol_tokenizer_dir, tmp_path):
    out = tmp_path / "check"
    command = [
        sys.executable,
        str(ROOT / "benchmarks/gpu_check.py"),
        "--device", "cpu", "--scale", "tiny",
        "--tokenizer", str(smol_tokenizer_dir), "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    names = [c["name"] for c in report["checks"]]
    for kind in ("sft", "rm", "dpo", "ppo", "grpo", "ppo-lora"):
        assert f"stage {kind}" in names
    assert any(n.startswith("parity") for n in names)
    assert {"resume sft after SIGKILL at step 2", "resume ppo after SIGKILL at step 2"} <= set(
        names
    )
    assert any(n.startswith("torchrun") for n in names)
    assert all(c["ok"] for c in report["checks"])
    assert "11 passed, 0 failed" in proc.stdout


def test_the_rollout_benchmarks_run_on_the_cpu_at_tiny_scale(smol_tokenizer_dir, tmp_path):
    """benchmarks/gpu_rollout.py: generation against HF `generate`, a GRPO iteration, SFT
    and DPO steps; each table has its rows and every rate is a positive number. MFU is not
    bounded here: a 2-layer model on a shared CPU times a 256-wide matmul against steps run
    while the other test worker computes, so its ratio is noise (the GPU run reads it)."""
    out = tmp_path / "rollout"
    command = [
        sys.executable,
        str(ROOT / "benchmarks/gpu_rollout.py"),
        "--device", "cpu", "--scale", "tiny",
        "--tokenizer", str(smol_tokenizer_dir), "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_rollout.json").read_text())
    assert [r["batch"] for r in report["generation"]] == [4, 8]
    for row in report["generation"]:
        assert row["tether_tok_s"] > 0 and row["hf_tok_s"] > 0 and row["roofline_share"] > 0
    assert report["grpo"]["tether_samples_s"] > 0
    assert [r["stage"] for r in report["training"]] == ["sft", "dpo"]
    assert all(math.isfinite(r["mfu"]) and r["mfu"] > 0 for r in report["training"])
    assert report["train_matmul_tflops"] > 0
