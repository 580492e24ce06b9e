"""The model card of a run's `final/` (its README.md, as the Hugging Face Hub shows it): the
base model, the data, the stage, the settings that differ from the stage's defaults, the
final metrics and, for a reward model, the score normalisation a plain transformers user
has to apply."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tether.config import (
    DPOConfig,
    GRPOConfig,
    PPOConfig,
    RMConfig,
    SFTConfig,
    config_differences,
    config_to_dict,
)
from tether.models.reward_model import NORMALIZATION_KEY
from tether.runs.rundir import RunDir, last_values, write_text_atomic

STAGE_OF = {
    SFTConfig: "sft",
    RMConfig: "rm",
    GRPOConfig: "grpo",
    PPOConfig: "ppo",
    DPOConfig: "dpo",
}
WHAT = {
    "sft": "supervised fine-tuning",
    "rm": "a reward model trained on preferences (Bradley-Terry)",
    "ppo": "online policy optimisation",
    "grpo": "GRPO",
    "dpo": "direct preference optimisation",
}


LORA_NOTE = " with LoRA adapters (merged here; the peft adapter alone is in `adapter/`)."


def last_metrics(run: RunDir) -> dict[str, float]:
    """The last logged value of every numeric metric."""
    return {
        k: v
        for k, v in last_values(run.metrics_path).items()
        if isinstance(v, int | float) and k != "step"
    }


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return f"`{v}`"


def model_card(run: RunDir, cfg: Any) -> str:
    """The card of `run.final`, written there (a reward model's normalisation is read from
    its config.json)."""
    stage = STAGE_OF[type(cfg)]
    saved = json.loads((run.final / "config.json").read_text())
    normalization = saved.get(NORMALIZATION_KEY)
    algo = getattr(cfg, "algo", stage)
    base = cfg.model.name
    values = config_to_dict(cfg)
    settings = {
        key: _at(values, key) for key in config_differences(config_to_dict(type(cfg)()), values)
    }
    lines = [
        "---",
        "library_name: transformers",
        f"base_model: {base}",
        f"tags: [tether, rlhf, {stage}]",
        "---",
        "",
        f"# {run.path.resolve().name}",
        "",
        f"Trained with tether `{stage}`: {WHAT[stage]}"
        + (f" (`{algo}`)" if algo != stage else "")
        + f", from `{base}`"
        + (LORA_NOTE if cfg.model.lora.enabled else "."),
        "",
        "## Data",
        "",
        f"- train: `{cfg.data.train}`",
        f"- held out: `{cfg.data.eval or f'{cfg.data.eval_fraction:.0%} of train'}`",
    ]
    if stage in ("ppo", "grpo"):
        terms = ", ".join(f"`{t['name']}` × {t.get('weight', 1.0)}" for t in cfg.reward.terms)
        lines.append(f"- reward: {terms}")
    lines += ["", "## Settings (where they differ from the defaults)", ""]
    lines += ["| key | value |", "|---|---|"]
    lines += [f"| `{k}` | {_value(v)} |" for k, v in settings.items()] or ["| (none) | |"]
    metrics = last_metrics(run)
    if metrics:
        lines += ["", "## Final metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| `{k}` | {_value(float(v))} |" for k, v in sorted(metrics.items())]
    if normalization is not None:
        lines += [
            "",
            "## Score normalisation",
            "",
            f"tether scores are `(raw - {normalization['mean']:.6g}) / "
            f"{normalization['std']:.6g}`: mean 0, std 1 over held-out responses. The raw score "
            "is the single logit of `AutoModelForSequenceClassification`; the two numbers are "
            "in `config.json` as `tether_reward_normalization`.",
        ]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoTokenizer, "
        + ("AutoModelForSequenceClassification" if stage == "rm" else "AutoModelForCausalLM"),
        "",
        'tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO")',
        "model = "
        + ("AutoModelForSequenceClassification" if stage == "rm" else "AutoModelForCausalLM")
        + '.from_pretrained("PATH_OR_REPO")',
        "```",
        "",
    ]
    return "\n".join(lines)


def write_model_card(run: RunDir, cfg: Any) -> Path:
    path = run.final / "README.md"
    write_text_atomic(path, model_card(run, cfg))
    return path


def _at(tree: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree[part]
    return tree
