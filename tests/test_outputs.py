"""Outputs that fit the Hub: a LoRA run's peft adapter, every final/'s model card, and
`tether push` saying clearly when there is no hub to push to."""

import json

import pytest
import torch
from conftest import marker_pairs

import tether
from tether.errors import TetherError

FAST = {"threads": 1, "precision": "fp32", "save_every": 0, "max_steps": 2, "batch_size": 4}
RECORDS = [{"prompt": f"Say {w}.", "completion": w} for w in ["sun", "moon", "star", "sky"]]


@pytest.fixture(scope="module")
def lora_sft(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    return tether.sft(
        model={"name": str(tiny_model_dir), "lora": {"enabled": True, "r": 4}},
        data=RECORDS,
        optim={"lr": 0.05},  # large enough that the adapters change the logits
        train=FAST,
        out=out,
    )


def test_a_lora_runs_adapter_loads_with_peft_and_gives_the_merged_logits(lora_sft, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = lora_sft.final / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    assert (adapter / "adapter_model.safetensors").is_file()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids = torch.tensor([[5, 17, 42, 7, 99, 3]])
    with torch.no_grad():
        before = base(ids).logits
        with_adapter = PeftModel.from_pretrained(base, adapter).eval()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(lora_sft.final, dtype=torch.float32)(ids)
    assert not torch.allclose(with_adapter, before, atol=1e-4)  # the adapter did learn
    torch.testing.assert_close(with_adapter, merged.logits, atol=1e-4, rtol=1e-4)


def test_the_model_card_names_base_data_settings_and_final_metrics(lora_sft, tiny_model_dir):
    card = (lora_sft.final / "README.md").read_text()
    assert f"base_model: {tiny_model_dir}" in card
    assert "tags: [tether, rlhf, sft]" in card
    assert "| `model.lora.enabled` | `True` |" in card and "| `optim.lr` | 0.05 |" in card
    assert f"| `train/loss` | {lora_sft.metrics['train/loss']:.4g} |" in card
    assert "adapter/" in card


def test_a_reward_models_card_and_config_carry_its_normalisation(tiny_model_dir, tmp_path):
    result = tether.reward_model(
        model=tiny_model_dir, data=marker_pairs(16, seed=0), train=FAST, out=tmp_path / "rm"
    )
    norm = json.loads((result.final / "config.json").read_text())["tether_reward_normalization"]
    card = (result.final / "README.md").read_text()
    assert f"(raw - {norm['mean']:.6g}) / {norm['std']:.6g}" in card
    assert "AutoModelForSequenceClassification" in card


def test_push_without_a_hub_says_so_and_keeps_the_model(lora_sft, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(TetherError, match=r"cannot push .*final to the Hugging Face Hub as me/m"):
        tether.push(lora_sft.run_dir, "me/m")
    assert (lora_sft.final / "config.json").is_file()


def test_push_refuses_a_dir_without_a_model(tmp_path):
    with pytest.raises(TetherError, match=r"no trained model to push"):
        tether.push(tmp_path, "me/m")
