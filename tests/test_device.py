"""Where a run computes: `train.device`, precision from the device the models sit on, GPU
memory metrics, out-of-memory stops that keep the last checkpoint. The plumbing is exercised
on the CPU here; the tests marked `cuda` run it on a GPU where there is one."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_sft import run_cli, sft_config

from tether import hardware
from tether.config import ConfigError, SFTConfig, load_config
from tether.errors import TetherError
from tether.runs.rundir import read_metrics
from tether.runs.state import restore_rng, rng_state
from tether.runs.training import OutOfMemoryStop
from tether.stages.sft import run_sft

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_auto_is_the_cpu_without_cuda_and_cuda_without_one_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert hardware.resolve_device("auto") == torch.device("cpu")
    assert hardware.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(TetherError, match=r"no usable CUDA device.*train.device: cpu"):
        hardware.resolve_device("cuda:1")
    with pytest.raises(TetherError, match="tether runs on cpu or cuda"):
        hardware.resolve_device("meta")


def test_cuda_means_the_local_ranks_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert hardware.resolve_device("auto") == torch.device("cuda", 2)
    assert hardware.resolve_device("cuda") == torch.device("cuda", 2)
    assert hardware.resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(TetherError, match="asks for GPU 5; this machine has 4"):
        hardware.resolve_device("cuda:5")


def test_precision_follows_the_device_the_models_are_on_not_the_machine(monkeypatch):
    """A machine with a GPU whose models sit on the CPU decides by the CPU's flags."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    for flags, native in (("flags : fpu avx2 fma", False), ("flags : avx512f avx512_bf16", True)):
        monkeypatch.setattr(hardware, "cpu_flags", lambda flags=flags: flags)
        assert hardware.use_bf16("auto", "cpu") is native
        assert hardware.use_bf16("auto", "cuda:0") is True
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert hardware.use_bf16("auto", "cuda:0") is False  # Turing: bf16 emulated
    assert hardware.use_bf16("bf16", "cuda:0") is True  # asked for: given
    assert hardware.use_bf16("fp32", "cpu") is False


def test_autocast_covers_the_cpu_and_leaves_cuda_alone_until_it_is_used():
    with hardware.autocast(True):
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert torch.is_autocast_enabled("cuda") == torch.cuda.is_initialized()
    with hardware.autocast(False):
        assert not torch.is_autocast_enabled("cpu")


def test_device_keys_are_validated_and_the_cli_shortcut_sets_it(memorisable_sft, tmp_path):
    data = f"data.train={memorisable_sft}"
    with pytest.raises(ConfigError, match=r"train.device.*'gpu'.*auto, cpu, cuda or cuda:N"):
        load_config(SFTConfig, None, [data, "train.device=gpu"])
    assert load_config(SFTConfig, None, [data, "train.device=cuda:3"]).train.device == "cuda:3"
    args = ["sft", "--data", str(memorisable_sft), "--device", "gpu", "--out", str(tmp_path)]
    proc = run_cli(args, check=False)
    assert proc.returncode == 2 and "train.device" in proc.stderr


def test_no_gpu_state_is_saved_by_a_cpu_run_and_old_gpu_state_is_ignored_on_the_cpu():
    state = rng_state()
    if not torch.cuda.is_initialized():
        assert "cuda" not in state
    expected = torch.rand(3)
    # A checkpoint written on a GPU machine (every GPU's generator) resumes on a CPU one.
    restore_rng({**state, "cuda": [torch.zeros(16, dtype=torch.uint8)]})
    if not torch.cuda.is_available():
        torch.testing.assert_close(torch.rand(3), expected)


def test_a_cpu_run_says_where_it_runs_and_logs_no_gpu_memory(
    tiny_model_dir, memorisable_sft, tmp_path, capsys
):
    cfg = sft_config(tiny_model_dir, memorisable_sft, "train.max_steps=2", "train.device=cpu")
    run_sft(cfg, tmp_path / "run")
    captured = capsys.readouterr()
    lines = (captured.out + captured.err).splitlines()
    assert any(line.startswith("tether: running on cpu, ") for line in lines)
    metrics = read_metrics(tmp_path / "run/metrics.jsonl")
    assert metrics and not any(k.startswith("memory/cuda") for m in metrics for k in m)


def test_out_of_memory_stops_naming_the_keys_keeps_the_checkpoint_and_resumes(
    tiny_model_dir, memorisable_sft, tmp_path, monkeypatch
):
    import tether.stages.sft as sft_stage

    real, calls = sft_stage.micro_batch_loss, {"n": 0}

    def runs_out_at_step_three(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(sft_stage, "micro_batch_loss", runs_out_at_step_three)
    extra = ("train.max_steps=4", "train.save_every=1", "data.eval_fraction=0")
    with pytest.raises(OutOfMemoryStop, match=r"step 3 ran out of memory.*train.batch_size") as e:
        run_sft(sft_config(tiny_model_dir, memorisable_sft, *extra), tmp_path / "run")
    assert "data.max_length" in str(e.value) and "step-2" in str(e.value)
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir()) == ["step-1", "step-2"]

    monkeypatch.setattr(sft_stage, "micro_batch_loss", real)
    run_sft(sft_config(tiny_model_dir, memorisable_sft, *extra), tmp_path / "run", resume=True)
    run_sft(sft_config(tiny_model_dir, memorisable_sft, *extra), tmp_path / "whole")
    resumed = load_file(tmp_path / "run/final/model.safetensors")
    whole = load_file(tmp_path / "whole/final/model.safetensors")
    for name, tensor in whole.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0)


@cuda
def test_sft_on_a_gpu_resumes_on_the_cpu_to_the_same_weights(
    tiny_model_dir, memorisable_sft, tmp_path
):
    extra = ("train.max_steps=4", "train.save_every=2", "train.precision=fp32")
    gpu = sft_config(tiny_model_dir, memorisable_sft, *extra, "train.device=cuda")
    run_sft(gpu, tmp_path / "gpu")
    metrics = read_metrics(tmp_path / "gpu/metrics.jsonl")
    assert all(m["memory/cuda_peak_gib"] > 0 for m in metrics)
    cpu = sft_config(tiny_model_dir, memorisable_sft, "train.max_steps=6", "train.device=cpu")
    run_sft(cpu, tmp_path / "gpu", resume=True)  # 4 steps on the GPU, 2 more on the CPU
    assert read_metrics(tmp_path / "gpu/metrics.jsonl")[-1]["step"] == 6


AVX2_ONLY = "avx512* amx* avx_ne_convert avx_vnni*"


def test_hidden_cpu_flags_take_the_paths_of_an_avx2_only_cpu(monkeypatch):
    """An AVX-512 machine runs the paths a Zen 2 takes: no bf16 by default, and no bf16
    weight packing (which PyTorch refuses there), so the suite covers both kinds of CPU."""
    from tether.fast.engine import can_pack

    monkeypatch.setenv(hardware.HIDE_CPU_FLAGS, AVX2_ONLY)
    flags = hardware.cpu_flags().partition(":")[2].split()
    assert not [f for f in flags if f.startswith(("avx512", "amx")) or f == "avx_ne_convert"]
    assert not hardware.bf16_weight_packing()
    assert not hardware.bf16_available("cpu")
    assert not can_pack(torch.bfloat16, torch.device("cpu"))
    assert can_pack(torch.float32, torch.device("cpu")) == torch.backends.mkldnn.is_available()
    proc = run_cli(["--version"], {hardware.HIDE_CPU_FLAGS: AVX2_ONLY, "CUDA_VISIBLE_DEVICES": ""})
    assert "device (auto): cpu, fp32" in proc.stdout
    assert "bf16 weight packing: no" in proc.stdout


@pytest.mark.skipif(
    "avx512f" not in hardware.cpu_flags(masked=False).split(), reason="no AVX-512 to hide"
)
def test_hidden_avx512_is_left_out_of_the_fused_kernels_build(monkeypatch, tmp_path):
    """The kernels' AVX-512 branches compile only where AVX-512 shows: under the mask the
    build is an AVX2 CPU's build."""
    from tether.fast import fused

    monkeypatch.delenv(hardware.HIDE_CPU_FLAGS, raising=False)  # the suite may run masked
    unmasked = fused.compile_command(tmp_path / "k.so")
    monkeypatch.setenv(hardware.HIDE_CPU_FLAGS, AVX2_ONLY)
    masked = fused.compile_command(tmp_path / "k.so")
    assert "-mno-avx512f" in masked and "-mno-avx512f" not in unmasked
