"""End-to-end SFT on a tiny real Llama: learning, accumulation, resume after SIGKILL, LoRA."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tether.config import SFTConfig, load_config
from tether.runs.rundir import read_metrics
from tether.stages.sft import run_sft

TIMING_KEYS = {"throughput/tokens_per_s", "time/step_s"}


def sft_overrides(model_dir, data, *extra) -> list[str]:
    return [
        f"model.name={model_dir}",
        f"data.train={data}",
        "data.eval_fraction=0.25",
        "data.max_length=64",
        "optim.lr=0.01",
        "optim.warmup_steps=0",
        "train.batch_size=4",
        "train.threads=1",
        *extra,
    ]


def sft_config(model_dir, data, *extra):
    return load_config(SFTConfig, None, sft_overrides(model_dir, data, *extra))


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "model.safetensors")


def test_tiny_sft_reduces_held_out_loss_and_final_loads(tiny_model_dir, memorisable_sft, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = sft_config(tiny_model_dir, memorisable_sft, "train.max_steps=25", "train.eval_every=25")
    final = run_sft(cfg, tmp_path / "run")
    evals = [
        r["eval/loss"] for r in read_metrics(tmp_path / "run/metrics.jsonl") if "eval/loss" in r
    ]
    assert evals[-1] < 0.6 * evals[0], evals  # ~10.8 nats at init on a 49k vocabulary
    model = AutoModelForCausalLM.from_pretrained(final)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(model.state_dict()[name], base.state_dict()[name])
    assert (tmp_path / "run/config.yaml").is_file()


def test_accumulation_equals_one_big_batch(tiny_model_dir, memorisable_sft, tmp_path):
    one = sft_config(
        tiny_model_dir,
        memorisable_sft,
        "train.max_steps=1",
        "train.batch_size=8",
        "train.precision=fp32",
    )
    split = sft_config(
        tiny_model_dir,
        memorisable_sft,
        "train.max_steps=1",
        "train.batch_size=1",
        "train.grad_accum=8",
        "train.precision=fp32",
    )
    a, b = (
        final_weights(run_sft(one, tmp_path / "a").parent),
        final_weights(run_sft(split, tmp_path / "b").parent),
    )
    # Adam's first step moves every weight by ~lr = 1e-2; fp32 summation order leaves ~1e-6.
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def _default_sigint() -> None:
    """A shell's background job starts with SIGINT ignored, and Python then installs no
    KeyboardInterrupt handler: the CLI runs with a terminal's Ctrl-C, as a user's would."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_cli(args, env_extra=None, check=True):
    env = dict(os.environ, **(env_extra or {}))
    proc = subprocess.run(
        [sys.executable, "-m", "tether", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_default_sigint,
    )
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr[-3000:])
    return proc


def test_lora_sft_saves_a_merged_model(tiny_model_dir, memorisable_sft, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = sft_config(
        tiny_model_dir,
        memorisable_sft,
        "train.max_steps=3",
        "model.lora.enabled=true",
        "model.lora.r=4",
    )
    final = run_sft(cfg, tmp_path / "run")
    weights = load_file(final / "model.safetensors")
    assert not any("lora" in k for k in weights)
    model = AutoModelForCausalLM.from_pretrained(final)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(model.state_dict()[name], base.state_dict()[name])
    name = "model.embed_tokens.weight"  # not a LoRA target: untouched
    assert torch.equal(model.state_dict()[name], base.state_dict()[name])
    ckpt = load_file(tmp_path / "run/checkpoints/step-3/model.safetensors")
    assert ckpt and all("lora_" in k for k in ckpt)  # checkpoints hold the adapters only


def test_bad_data_fails_before_training_with_file_and_line(tiny_model_dir, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": 3}\n')
    proc = run_cli(
        [
            "sft",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "run"),
        ],
        check=False,
    )
    assert proc.returncode == 2
    assert f"{data}:2: field 'completion': expected a string, got int" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run/checkpoints").exists()


def test_lora_top_layers_adapts_only_the_upper_layers(tiny_model_dir):
    """Adapters sit on the last N layers alone, so nothing beneath them needs a gradient."""
    from tether.config import LoraConfig, ModelConfig
    from tether.models.loading import ModelLoadError, load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    lora = LoraConfig(enabled=True, r=4, alpha=8, top_layers=1)
    model = load_causal_lm(ModelConfig(name=str(tiny_model_dir), lora=lora), tokenizer)
    adapted = {
        n.split("layers.")[1].split(".")[0] for n, _ in model.named_parameters() if "lora_" in n
    }
    assert adapted == {"1"}  # the 2-layer model's upper layer only
    lower_outputs = []
    layers = model.get_base_model().model.layers
    layers[0].register_forward_hook(lambda m, i, out: lower_outputs.append(out))
    model(input_ids=torch.tensor([[1, 2, 3, 4]]))
    lower = lower_outputs[0][0] if isinstance(lower_outputs[0], tuple) else lower_outputs[0]
    assert not lower.requires_grad  # autograd records nothing beneath the adapters

    too_deep = LoraConfig(enabled=True, r=4, alpha=8, top_layers=3)
    with pytest.raises(ModelLoadError, match="top_layers: 3, but the model has 2 layers"):
        load_causal_lm(ModelConfig(name=str(tiny_model_dir), lora=too_deep), tokenizer)
