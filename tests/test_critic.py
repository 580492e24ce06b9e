"""The critic's options: a value head started from a reward model's normalised score head,
and the critic's own learning rate."""

import json

import pytest
import torch
from safetensors.torch import save_file

from tether.config import OptimConfig
from tether.models.loading import ModelLoadError
from tether.models.reward_model import NORMALIZATION_KEY
from tether.rollout.actor_critic import init_head_from_reward_model
from tether.runs.optim import make_optimizer


def reward_model_dir(tmp_path, hidden: int, mean: float, std: float):
    weight = torch.arange(hidden, dtype=torch.float32)[None] / hidden
    save_file(
        {"model.score.weight": weight, "model.norm.weight": torch.ones(hidden)},
        str(tmp_path / "model.safetensors"),
    )
    (tmp_path / "config.json").write_text(
        json.dumps({NORMALIZATION_KEY: {"mean": mean, "std": std}})
    )
    return tmp_path, weight


def test_a_value_head_starts_as_the_reward_models_normalised_score(tmp_path):
    path, weight = reward_model_dir(tmp_path, 8, mean=0.5, std=2.0)
    head = torch.nn.Linear(8, 1)
    init_head_from_reward_model(head, str(path))
    hidden = torch.randn(3, 8)
    raw = hidden @ weight.T  # the reward model's raw score of these states
    torch.testing.assert_close(head(hidden), (raw - 0.5) / 2.0)


def test_a_reward_model_of_another_base_is_refused(tmp_path):
    path, _ = reward_model_dir(tmp_path, 8, mean=0.0, std=1.0)
    with pytest.raises(ModelLoadError, match="reads 8 hidden units, the policy has 16"):
        init_head_from_reward_model(torch.nn.Linear(16, 1), str(path))
    with pytest.raises(ModelLoadError, match="holds no reward model"):
        init_head_from_reward_model(torch.nn.Linear(8, 1), str(tmp_path / "nowhere"))


def test_the_critic_gets_its_own_learning_rate():
    model = torch.nn.ModuleDict(
        {"policy": torch.nn.Linear(4, 4), "value_head": torch.nn.Linear(4, 1)}
    )
    optimizer = make_optimizer(model, OptimConfig(lr=1e-5), {"value_head.": 1e-3})
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert {lr_of[id(p)] for p in model["policy"].parameters()} == {1e-5}
    assert {lr_of[id(p)] for p in model["value_head"].parameters()} == {1e-3}
    one_group = make_optimizer(model, OptimConfig(lr=1e-5))
    assert len(one_group.param_groups) == 1


def test_a_least_squares_critic_is_refit_every_iteration_and_resumes_exactly(
    tiny_model_dir, ppo_files, tmp_path
):
    """The head after each update is the ridge fit to the returns (its in-sample R² logged);
    the fit's sums are carried in checkpoints, so a run resumed mid-way ends at the
    uninterrupted run's head."""
    from safetensors.torch import load_file
    from test_ppo import ppo_config

    from tether.runs.rundir import read_metrics
    from tether.stages.ppo import run_ppo

    def config(steps: int):
        return ppo_config(
            tiny_model_dir, ppo_files, f"train.max_steps={steps}", "train.save_every=1",
            "critic.fit=least_squares", "critic.fit_decay=0.8", "train.deterministic=true",
        )  # fmt: skip

    run_ppo(config(3), tmp_path / "whole")
    records = read_metrics(tmp_path / "whole/metrics.jsonl")
    assert all(0.0 < r["value/fit_r2"] <= 1.0 for r in records)
    assert all(r["value/fit_ridge"] > 0 for r in records)
    run_ppo(config(2), tmp_path / "cut")
    run_ppo(config(3), tmp_path / "cut", resume=True)
    heads = [
        load_file(str(tmp_path / d / "final/value_head.safetensors")) for d in ("whole", "cut")
    ]
    assert heads[0]["weight"].abs().sum() > 0
    torch.testing.assert_close(heads[0], heads[1], rtol=0, atol=1e-6)
