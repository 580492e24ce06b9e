"""Landing a KL budget: the trained update scaled towards π_ref, in the model and in a run."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.test_ppo import blue_overrides, ppo_config
from tether.models.loading import ModelLoadError, load_tokenizer
from tether.rollout.actor_critic import load_actor_critic
from tether.rollout.landing import LANDING_TOLERANCE, update_scaler
from tether.rollout.passes import build_batch, sequence_logprobs_of
from tether.runs.rundir import read_metrics
from tether.stages.ppo import LANDING_FILE, run_ppo


@pytest.mark.parametrize("lora", [True, False])
def test_the_update_scaler_moves_the_policy_between_the_reference_and_the_trained(
    tiny_model_dir, ppo_files, lora
):
    extra = ["model.lora.enabled=true", "model.lora.r=4"] if lora else []
    cfg = ppo_config(tiny_model_dir, ppo_files, *extra)
    ac, reference = load_actor_critic(cfg, load_tokenizer(str(tiny_model_dir)))
    torch.manual_seed(0)
    with torch.no_grad():  # a trained update: moved adapters, or moved weights
        for name, p in ac.policy.named_parameters():
            if "lora_B" in name or (not lora and p.requires_grad):
                p.add_(torch.randn_like(p) * (0.5 if lora else 0.02))
    batch = build_batch([[5, 6, 7]], [[8, 9, 10, 11]], 0)

    def logprobs() -> torch.Tensor:
        with torch.no_grad():
            return sequence_logprobs_of(ac.policy, batch, 1.0)

    def reference_logprobs() -> torch.Tensor:
        with torch.no_grad():
            if reference is None:
                with ac.as_reference() as ref:
                    return sequence_logprobs_of(ref, batch, 1.0)
            return sequence_logprobs_of(reference, batch, 1.0)

    trained = logprobs()
    assert not torch.allclose(trained, reference_logprobs(), atol=1e-3)
    set_scale = update_scaler(ac, reference)
    set_scale(0.0)
    assert torch.allclose(logprobs(), reference_logprobs(), atol=1e-5)
    set_scale(0.5)
    halfway = logprobs()
    assert not torch.allclose(halfway, trained, atol=1e-3)
    if lora:  # ΔW = B·A scales with B exactly
        b = next(p for n, p in ac.policy.named_parameters() if "lora_B" in n)
        set_scale(1.0)
        whole = b.detach().clone()
        set_scale(0.5)
        assert torch.allclose(b, 0.5 * whole)
    set_scale(1.0)
    assert torch.equal(logprobs(), trained)


def landing_run(peaked_model_dir, ppo_files, out, budget: float):
    """A LoRA policy that learns fast (lr 3e-2, β floor 0.01) for all 8 steps under `budget`,
    kept by the β controller, which reacts late enough to end well past a small budget."""
    cfg = ppo_config(
        peaked_model_dir,
        ppo_files,
        *blue_overrides(ppo_files),
        "optim.lr=3e-2",
        "train.max_steps=8",
        "train.save_every=8",
        "ppo.kl.coef=0.01",
        f"ppo.kl.budget={budget}",
        "ppo.kl.budget_control=beta",
        "ppo.kl.budget_landing=10",
    )
    run_ppo(cfg, out)
    return cfg, json.loads((out / LANDING_FILE).read_text())


def lora_b(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The (only) LoRA B matrix of a checkpoint's or an adapter's tensors."""
    (name,) = [n for n in tensors if "lora_B" in n]
    return tensors[name]


def test_a_run_over_its_budget_lands_its_final_policy_on_it_and_lands_alike_on_resume(
    peaked_model_dir, ppo_files, tmp_path
):
    out = tmp_path / "run"
    cfg, landing = landing_run(peaked_model_dir, ppo_files, out, budget=0.5)
    trained = landing["measured"][0]
    assert trained["scale"] == 1.0 and trained["kl"] == landing["kl_trained"]
    # the run overshot by more than the measurement's noise: there is a landing
    assert landing["kl_trained"] > 0.5 + max(0.5 * LANDING_TOLERANCE, 2 * trained["kl_se"])
    assert 0 < landing["scale"] < 1
    # the kept scale is the measured one with the largest KL not over the budget by more
    # than its noise: how near the budget depends on the model (the demo's in RESULTS)
    within = [m for m in landing["measured"] if m["kl"] <= 0.5 + max(0.05, 2 * m["kl_se"])]
    assert landing["kl_landed"] == max(m["kl"] for m in within), landing
    # final/ holds the landed update; the last checkpoint the trained one
    trained = lora_b(load_file(out / "checkpoints/step-8/model.safetensors"))
    final = lora_b(load_file(out / "final/adapter/adapter_model.safetensors"))
    assert torch.allclose(final, landing["scale"] * trained.to(final), atol=1e-6)
    # a resumed finished run lands the same way (the measurements are seeded)
    run_ppo(cfg, out, resume=True)
    assert json.loads((out / LANDING_FILE).read_text()) == landing


def test_a_run_within_its_budget_keeps_its_trained_policy(peaked_model_dir, ppo_files, tmp_path):
    out = tmp_path / "run"
    _, landing = landing_run(peaked_model_dir, ppo_files, out, budget=50.0)
    assert landing["scale"] == 1.0 and len(landing["measured"]) == 1
    trained = lora_b(load_file(out / "checkpoints/step-8/model.safetensors"))
    final = lora_b(load_file(out / "final/adapter/adapter_model.safetensors"))
    assert torch.equal(final, trained.to(final))


def test_a_reference_the_policy_cannot_be_interpolated_to_is_refused_before_training(
    peaked_model_dir, tiny_model_dir, ppo_files, tmp_path
):
    """A fully trained policy lands by interpolating towards its reference weight by weight:
    the peaked model's untied LM head has no counterpart in the tiny model's tied one."""
    overrides = [f"reference={tiny_model_dir}", "ppo.kl.budget=1.0", "train.max_steps=1"]
    with pytest.raises(ModelLoadError, match=r"budget_landing.*lm_head"):
        run_ppo(ppo_config(peaked_model_dir, ppo_files, *overrides), tmp_path / "run")
    assert not (tmp_path / "run/metrics.jsonl").exists()
    # without the landing the same run trains
    cfg = ppo_config(peaked_model_dir, ppo_files, *overrides, "ppo.kl.budget_landing=0")
    run_ppo(cfg, tmp_path / "run2")
    assert not (tmp_path / "run2" / LANDING_FILE).exists()


def test_a_stop_budget_run_ends_untrained_on_the_rollout_that_reached_its_budget(
    peaked_model_dir, ppo_files, tmp_path
):
    """ppo.kl.budget_control: stop. β stays at its floor; the first rollout whose KL reaches
    the budget is logged and not trained on, the run ends there, and a resumed run that
    ended so takes no more steps."""
    cfg = ppo_config(
        peaked_model_dir,
        ppo_files,
        *blue_overrides(ppo_files),
        "optim.lr=3e-2",
        "train.max_steps=8",
        "train.save_every=1",
        "train.keep_last=10",
        "ppo.kl.coef=0.01",
        "ppo.kl.budget=0.5",
        "ppo.kl.budget_control=stop",
        "ppo.kl.budget_landing=0",
    )
    out = tmp_path / "run"
    run_ppo(cfg, out)
    records = read_metrics(out / "metrics.jsonl")
    *before, stop = records
    assert len(records) < 8 and stop["kl/budget_reached"] == 1.0 and stop["kl/mean"] >= 0.5
    assert all(r["kl/mean"] < 0.5 and "kl/budget_reached" not in r for r in before)
    assert {r["kl/coef"] for r in records} == {0.01}  # no controller: β is the floor
    assert "policy/loss" not in stop  # no update on the rollout over the budget
    # the weights after the stop step are those before it, and final/ holds them
    step = stop["step"]
    last, previous = (
        lora_b(load_file(out / f"checkpoints/step-{s}/model.safetensors")) for s in (step, step - 1)
    )
    assert torch.equal(last, previous)
    final = lora_b(load_file(out / "final/adapter/adapter_model.safetensors"))
    assert torch.equal(final, last.to(final))
    run_ppo(cfg, out, resume=True)
    assert read_metrics(out / "metrics.jsonl") == records
