import re
from pathlib import Path

import pytest
import yaml

from tether.config import ConfigError, DPOConfig, PPOConfig, SFTConfig, config_yaml, load_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides_resolve_with_types(tmp_path):
    path = write(tmp_path, "data:\n  train: a.jsonl\noptim:\n  lr: 1e-5\n")
    cfg = load_config(
        SFTConfig,
        path,
        [
            "train.max_steps=7",
            "model.lora.enabled=true",
            "model.lora.target_modules=[q_proj, v_proj]",
        ],
    )
    assert cfg.optim.lr == 1e-5 and isinstance(cfg.optim.lr, float)  # YAML reads 1e-5 as str
    assert cfg.train.max_steps == 7
    assert cfg.model.lora.enabled is True
    assert cfg.model.lora.target_modules == ["q_proj", "v_proj"]


def test_unknown_key_is_named_with_suggestion(tmp_path):
    path = write(tmp_path, "data:\n  train: a.jsonl\noptim:\n  learning_rat: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.learning_rat'"):
        load_config(SFTConfig, path)
    with pytest.raises(ConfigError, match=r"did you mean 'train.max_steps'"):
        load_config(SFTConfig, None, ["data.train=a", "train.max_step=3"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.batch_size=eight", r"'train.batch_size' must be an integer"),
        ("train.batch_size=2.5", r"'train.batch_size' must be an integer"),
        ("model.lora.enabled=yes please", r"'model.lora.enabled' must be true or false"),
        ("train.precision=fp8", r"'train.precision' must be one of"),
        ("model=3", r"'model' must be a section"),
        ("train.batch_size=0", r"'train.batch_size' must be >= 1"),
    ],
)
def test_wrong_type_or_range_names_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(SFTConfig, None, ["data.train=a.jsonl", override])


def test_a_budget_needs_a_positive_beta_only_where_a_controller_scales_it():
    """β = 0 cannot be scaled up by the budget controller; a run that stops at its budget
    spends it at any β, 0 included."""
    base = [
        "data.train=a.jsonl",
        "reward.terms=[{name: length}]",
        "ppo.kl.budget=2",
        "ppo.kl.coef=0",
    ]
    with pytest.raises(ConfigError, match=r"ppo\.kl\.coef.*budget_control: beta"):
        load_config(PPOConfig, None, [*base, "ppo.kl.budget_control=beta"])
    assert load_config(PPOConfig, None, base).ppo.kl.stops_at_budget


def test_missing_required_data_is_an_error():
    with pytest.raises(ConfigError, match=r"data\.train"):
        load_config(SFTConfig)


def test_python_tags_cannot_execute(tmp_path):
    path = write(tmp_path, "data:\n  train: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(SFTConfig, path)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(SFTConfig, None, ["data.train=x.jsonl", "optim.lr=0.003"])
    (tmp_path / "config.yaml").write_text(config_yaml(cfg))
    again = load_config(SFTConfig, tmp_path / "config.yaml")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["optim"]["lr"] == 0.003


def test_malformed_override():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(SFTConfig, None, ["data.train"])


def test_stage_defaults_of_a_section_survive_a_partial_override():
    from tether.config import RMConfig

    cfg = load_config(RMConfig, None, ["data.train=p.jsonl"])
    assert cfg.data.max_length == 256 and cfg.optim.lr == 5e-5  # RM defaults, not SFT's


@pytest.mark.parametrize(
    ("cls", "override", "hint"),
    [
        (PPOConfig, "learning_rate=1e-5", "TRL's `learning_rate` is tether's 'optim.lr'"),
        (PPOConfig, "num_generations=8", "'rollout.samples_per_prompt'"),
        (PPOConfig, "beta=0.1", "'ppo.kl.coef'"),
        (DPOConfig, "beta=0.1", "'dpo.beta'"),  # the same TRL name, another stage's key
        (SFTConfig, "output_dir=runs/x", "'--out'"),
        (SFTConfig, "optim.batch_size=4", "did you mean 'train.batch_size'"),  # other section
    ],
)
def test_unknown_keys_are_answered_with_tethers_name_for_them(cls, override, hint):
    with pytest.raises(ConfigError, match=re.escape(hint)):
        load_config(cls, None, ["data.train=x.jsonl", override])
