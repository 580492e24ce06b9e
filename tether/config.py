"""Typed, validated configs: one dataclass per stage, loaded from YAML plus `key=value` overrides.

Why typed dataclasses and not a dict: an RLHF run that silently ignores a misspelt key
(`kl_coeff` for `kl_coef`) trains the wrong thing for hours. Every key is checked against the
dataclass, every value against its annotation, before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from tether.core.algorithms import ALGORITHMS
from tether.errors import TetherError


class ConfigError(TetherError, ValueError):
    """A config file or override that cannot be used; the message names the key."""


# --------------------------------------------------------------------------- pieces


@dataclass
class LoraConfig:
    """LoRA adapters through peft; `enabled: false` means full fine-tuning."""

    # Train LoRA adapters (peft) instead of every weight; the run also saves the adapter.
    enabled: bool = False
    # The adapters' rank.
    r: int = 16
    # Scale of the adapters' update: alpha / r.
    alpha: int = 32
    # Dropout on the adapters' input.
    dropout: float = 0.0
    # The linear layers that get adapters (their names in the model).
    target_modules: list[str] = field(
        default_factory=lambda: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
    )
    # Adapters on the last N decoder layers only (0: every layer). Backward then stops at the
    # lowest adapted layer: faster updates, though a reward model learns less this way:
    # docs/performance.md#training-passes
    top_layers: int = 0

    def validate(self) -> None:
        _check(self.r > 0, "model.lora.r", "must be > 0")
        _check(self.top_layers >= 0, "model.lora.top_layers", "must be >= 0 (0: every layer)")
        _check(0.0 <= self.dropout < 1.0, "model.lora.dropout", "must be in [0, 1)")
        _check(bool(self.target_modules), "model.lora.target_modules", "must not be empty")


@dataclass
class ModelConfig:
    """Which weights to start from and how to hold them."""

    # A local Hugging Face dir, a .gguf file, a hub id, or an embedded name (smollm2-135m-instruct).
    name: str = "smollm2-135m-instruct"
    # Storage dtype of the weights. Training keeps float32 master weights and uses bf16
    # autocast (train.precision) instead; bfloat16 here is for inference-only models.
    dtype: Literal["float32", "bfloat16"] = "float32"
    # Off unless asked for: remote code runs arbitrary Python from the model repo.
    trust_remote_code: bool = False
    # Recompute activations in the backward pass: less memory, ~30% more compute.
    gradient_checkpointing: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)

    def validate(self) -> None:
        _check(bool(self.name), "model.name", "must name a model")
        self.lora.validate()


@dataclass
class DataConfig:
    """Where the examples come from and how long they may be."""

    # A file (JSONL, JSON array, CSV, Parquet), a saved `datasets` dir, a dir
    # `datasets.load_dataset` reads, or a hub dataset id (where a hub or its cache is at hand).
    train: str = ""
    # A separate held-out source; when empty, `eval_fraction` of `train` is held out (seeded).
    eval: str = ""
    # The share of `train` held out when `eval` is empty.
    eval_fraction: float = 0.05
    # auto: from the name (a dir: saved dataset or load_dataset; owner/name: the hub).
    format: Literal["auto", "jsonl", "json", "csv", "parquet", "arrow", "hub"] = "auto"
    # The split of a `datasets` source read for `train`.
    split: str = "train"
    # The split read for `eval` when it is a `datasets` source.
    eval_split: str = "test"
    # A `datasets` source's configuration (load_dataset's second argument).
    config: str = ""
    # tether's field name -> the source's column, e.g. {prompt: question}.
    columns: dict[str, str] = field(default_factory=dict)
    # Longest example in tokens; longer ones are cut (SFT) or skipped and counted.
    max_length: int = 512
    # Draw each optimizer step's examples from a length-sorted neighbourhood, so little of a
    # padded batch is padding (1.4x fewer tokens on HH pairs); the order stays seeded.
    group_by_length: bool = True

    def validate(self) -> None:
        _check(bool(self.train), "data.train", "is required (a data file, dataset dir or hub id)")
        _check(
            all(isinstance(v, str) and v for v in self.columns.values()),
            "data.columns",
            "must map field names to column names (strings)",
        )
        _check(0.0 <= self.eval_fraction < 1.0, "data.eval_fraction", "must be in [0, 1)")
        _check(self.max_length >= 8, "data.max_length", "must be >= 8 tokens")


@dataclass
class OptimConfig:
    """AdamW with warm-up and a decay schedule."""

    # Peak learning rate (after warm-up).
    lr: float = 2e-5
    # AdamW's decoupled weight decay.
    weight_decay: float = 0.0
    # AdamW's (β1, β2).
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    # 1e-8 is PyTorch's default; PPO uses 1e-5 to match TF's smaller early steps
    # (docs/implementation-details.md#adam-epsilon).
    eps: float = 1e-8
    # How the learning rate decays after warm-up, to 0 at the last step.
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    # Steps of linear warm-up from 0.
    warmup_steps: int = 0
    # Clip the gradients' global norm to this (0: no clipping).
    max_grad_norm: float = 1.0

    def validate(self) -> None:
        _check(self.lr > 0, "optim.lr", "must be > 0")
        _check(len(self.betas) == 2, "optim.betas", "must be two numbers")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        _check(self.max_grad_norm >= 0, "optim.max_grad_norm", "must be >= 0 (0 disables)")


@dataclass
class TrainConfig:
    """The step budget, batch geometry and run bookkeeping shared by every stage."""

    # Optimizer steps; 0 means `epochs` full passes over the training set.
    max_steps: int = 0
    # Passes over the training set when max_steps is 0.
    epochs: int = 1
    # Examples per optimizer step (PPO: prompts per rollout).
    batch_size: int = 8
    # Micro-batches per optimizer step; the effective batch is batch_size * grad_accum.
    grad_accum: int = 1
    # Seeds data order, initialisation and sampling: a run and its resume are repeatable.
    seed: int = 0
    # Where every model of the run sits: auto = this process's GPU (cuda:LOCAL_RANK under
    # torchrun) where CUDA is available, else the CPU; or cpu, cuda, cuda:N.
    device: str = "auto"
    # bf16 = autocast with float32 master weights; auto = bf16 where the device computes it
    # natively (a GPU from Ampere on, a CPU with AVX512-BF16 or AMX), else fp32.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # PyTorch's deterministic algorithms: bit-exact reruns and resumes, at some speed on a GPU
    # (docs/robustness.md#deterministic-runs).
    deterministic: bool = False
    # Log metrics every N steps.
    log_every: int = 1
    # 0 = evaluate only at the end.
    eval_every: int = 0
    # 0 = checkpoint only at the end.
    save_every: int = 100
    # Checkpoints kept on disk (older ones are deleted after a newer one is complete).
    keep_last: int = 2
    # 0 = all available cores.
    threads: int = 0
    # A step whose gradients are NaN/inf is skipped (weights and optimizer untouched) and
    # counted as guard/skipped_steps; this many in a row stop the run with an error.
    max_bad_steps: int = 5

    def validate(self) -> None:
        _check(self.max_steps >= 0, "train.max_steps", "must be >= 0")
        _check(self.epochs >= 1, "train.epochs", "must be >= 1")
        _check(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        _check(self.grad_accum >= 1, "train.grad_accum", "must be >= 1")
        _check(self.log_every >= 1, "train.log_every", "must be >= 1")
        _check(self.keep_last >= 1, "train.keep_last", "must be >= 1")
        _check(self.save_every >= 0, "train.save_every", "must be >= 0")
        _check(self.max_bad_steps >= 1, "train.max_bad_steps", "must be >= 1")
        _check(
            re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None,
            "train.device",
            f"is {self.device!r}; must be auto, cpu, cuda or cuda:N",
        )


@dataclass
class LoggingConfig:
    """Where metrics go besides metrics.jsonl (always written), as TRL's `report_to`."""

    # Trackers: tensorboard, wandb, mlflow (each needs its package), or "none".
    report_to: list[str] = field(default_factory=list)
    # The run's name in the trackers; empty: the run dir's name.
    run_name: str = ""
    # The W&B project, or the MLflow experiment.
    wandb_project: str = "tether"
    # The same as listing tensorboard in report_to.
    tensorboard: bool = False
    # The same as listing wandb in report_to.
    wandb: bool = False

    def trackers(self) -> list[str]:
        """report_to plus the booleans, each once, in order."""
        names = [n for n in self.report_to if n != "none"]
        names += [n for n, on in (("tensorboard", self.tensorboard), ("wandb", self.wandb)) if on]
        return list(dict.fromkeys(names))

    def validate(self) -> None:
        unknown = set(self.report_to) - {*TRACKERS, "none"}
        _check(not unknown, "logging.report_to", f"has {sorted(unknown)}; use {list(TRACKERS)}")


TRACKERS = ("tensorboard", "wandb", "mlflow")


# --------------------------------------------------------------------------- stages


@dataclass
class StageConfig:
    """The sections and keys every training stage has, declared once so that the stages
    cannot drift apart: model, data, optimizer, step budget, logging and the parallel engine.

    A stage subclasses it, overriding a section's defaults where it differs (the RM's shorter
    max_length) and adding its own sections; the keys stay at the top level of its YAML.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # Under torchrun: ddp (every rank holds the whole model) or fsdp (FSDP2 fully_shard:
    # parameters, gradients and optimizer state sharded over the ranks). Ignored in a plain
    # process. train.batch_size stays the global batch; each rank runs its share.
    parallel: Literal["ddp", "fsdp"] = "ddp"
    # FSDP only: keep the sharded parameters and optimizer state in CPU memory.
    fsdp_cpu_offload: bool = False

    def validate(self) -> None:
        """The shared sections; a stage's own `validate` adds its sections after these."""
        self.model.validate()
        self.data.validate()
        self.optim.validate()
        self.train.validate()
        self.logging.validate()


@dataclass
class SFTConfig(StageConfig):
    """Supervised fine-tuning: NLL on assistant/completion tokens only."""


@dataclass
class RewardLossConfig:
    """How preferences become a loss for the reward model."""

    # Coefficient of λ·mean((r_w + r_l)²): pins the offset the ranking loss leaves free.
    center_coef: float = 0.01
    # Coefficient of λ·mean(r²) over every scored response.
    l2_coef: float = 0.0
    # Listwise records: every ordered pair (weighted to sum to 1 per prompt) or adjacent only.
    listwise_pairs: Literal["all", "adjacent"] = "all"
    # "pairs": Bradley-Terry on pairs (rankings expanded as above); "plackett_luce": the
    # likelihood of each whole ranking (a pair is a ranking of two; margins are not used).
    listwise_loss: Literal["pairs", "plackett_luce"] = "pairs"
    # Normalise scores to mean 0, std 1 over the held-out responses after training.
    normalize: bool = True

    def validate(self) -> None:
        _check(self.center_coef >= 0, "reward.center_coef", "must be >= 0")
        _check(self.l2_coef >= 0, "reward.l2_coef", "must be >= 0")


@dataclass
class RMConfig(StageConfig):
    """Reward model: Bradley-Terry ranking loss on preference pairs (and listwise rankings)."""

    data: DataConfig = field(default_factory=lambda: DataConfig(max_length=256))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-5))
    reward: RewardLossConfig = field(default_factory=RewardLossConfig)

    def validate(self) -> None:
        super().validate()
        self.reward.validate()


@dataclass
class RolloutConfig:
    """How responses are sampled from the policy during training."""

    # Longest response, in tokens.
    max_new_tokens: int = 64
    # Log-probs, ratios and KL are computed from logits / temperature, the same T as sampling.
    temperature: float = 1.0
    # Truncated sampling (top_p < 1, top_k > 0) draws from a renormalised distribution while
    # ratios and KL use the full one, so every ratio is off by the kept mass
    # (docs/implementation-details.md#sampling-temperature-and-truncated-sampling).
    # Training rollouts refuse it; evaluation sampling (demo, best-of-n) may use it.
    top_p: float = 1.0
    # Top-k truncation (0: off); refused in training rollouts, as top_p.
    top_k: int = 0
    # Responses cut at max_new_tokens without EOS: "subtract" the penalty from their score,
    # "replace" the score by -penalty (OpenAI), or "none". Without it policies learn to ramble.
    missing_eos: Literal["subtract", "replace", "none"] = "subtract"
    # The penalty of `missing_eos`.
    missing_eos_penalty: float = 1.0
    # Responses sampled per prompt (k): RLOO and GRPO compare the k answers of one prompt.
    samples_per_prompt: int = 1
    # "auto": tether's engine for Llama-family models (on a CPU the KV-cache engine, on a GPU
    # its fixed-shape loop captured as a CUDA graph), Hugging Face `generate` for others;
    # "hf": always `generate`; "static": the fixed-shape loop on any device.
    engine: Literal["auto", "hf", "static"] = "auto"
    # Rollouts per generate() call; 0 = the whole batch at once.
    generation_batch_size: int = 0
    # Write prompt, response, score, KL (and gold) of every rollout to samples.jsonl every N
    # steps (and at the first and last step); 0 = never.
    samples_every: int = 10

    def validate(self) -> None:
        _check(self.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1")
        _check(self.temperature > 0, "rollout.temperature", "must be > 0")
        _check(
            self.top_p == 1.0 and self.top_k == 0,
            "rollout.top_p/top_k",
            "must stay off (1.0 / 0) for training rollouts: truncated sampling makes ratios and "
            "KL disagree with the distribution sampled from; lower rollout.temperature instead",
        )
        _check(self.missing_eos_penalty >= 0, "rollout.missing_eos_penalty", "must be >= 0")
        _check(self.samples_per_prompt >= 1, "rollout.samples_per_prompt", "must be >= 1")
        _check(self.generation_batch_size >= 0, "rollout.generation_batch_size", "must be >= 0")
        _check(self.samples_every >= 0, "rollout.samples_every", "must be >= 0")


@dataclass
class RewardSpecConfig:
    """What the policy is optimised against, and what it is judged by."""

    # Weighted sum of terms, each {name, weight, args}: `model:DIR` (a reward model), a
    # built-in (`length`, `regex`, `exact_answer`) or `module:function` / `file.py:function`.
    terms: list[dict[str, Any]] = field(default_factory=list)
    # A judge logged as gold/mean and never trained on (the same spec as a term, or "").
    gold: str = ""
    # Keyword args of the gold judge, as a term's `args`.
    gold_args: dict[str, Any] = field(default_factory=dict)
    # Whiten scores with the running mean/std over all rollouts so far.
    normalize: bool = False
    # Clip whitened scores to ±clip (0: off).
    clip: float = 0.0
    # Seconds one call of a term (or the gold judge) may take on one batch before the run
    # stops with an error naming it; a hung reward server must not hang the run. 0: no limit.
    timeout_s: float = 600.0

    def validate(self) -> None:
        _check(bool(self.terms), "reward.terms", "needs at least one {name, weight} entry")
        _check(self.timeout_s >= 0, "reward.timeout_s", "must be >= 0 (0: no limit)")
        for i, term in enumerate(self.terms):
            key = f"reward.terms[{i}]"
            _check(isinstance(term, dict), key, "must be a mapping {name, weight, args}")
            unknown = set(term) - {"name", "weight", "args"}
            _check(not unknown, key, f"has unknown keys {sorted(unknown)}")
            _check(isinstance(term.get("name"), str) and bool(term["name"]), key, "needs a name")
            weight = term.get("weight", 1.0)
            _check(
                isinstance(weight, int | float) and not isinstance(weight, bool),
                f"{key}.weight",
                "must be a number",
            )
            _check(isinstance(term.get("args", {}), dict), f"{key}.args", "must be a mapping")
        _check(self.clip >= 0, "reward.clip", "must be >= 0 (0 disables)")


@dataclass
class KLConfig:
    """The per-token penalty β·KL_t folded into the reward."""

    # β: the weight of the KL penalty; with `adaptive`, its start; with a budget kept by
    # budget_control: beta, its floor.
    coef: float = 0.05
    # Adaptive control (Ziegler et al. 2019) steers the per-sequence KL towards `target`.
    adaptive: bool = False
    # The adaptive controller's KL target, in nats per response.
    target: float = 6.0
    # The adaptive controller's horizon: how many rollouts β takes to move e-fold.
    horizon: int = 10000
    # > 0: a KL budget in nats per response, kept as `budget_control` says; overrides
    # `adaptive`.
    budget: float = 0.0
    # How a budget is kept: "stop", β stays at `coef` and the run ends at the first iteration
    # whose rollout KL reaches the budget, without training on that rollout: the policy is
    # the fixed-β run's at the budget, which the landing then trims; "beta", `coef` is a floor
    # that β rises from while the KL is over the budget (core.kl.KLBudgetController). On the
    # demo at 2 nats, stop landed 1.76-2.44 nats held-out over six runs, beta 0.65-4.66
    # (benchmarks/RESULTS.md).
    budget_control: Literal["stop", "beta"] = "stop"
    # beta: the controller acts on the KL projected this many iterations on from its last
    # change (0: on the KL alone), so that β rises before the KL passes the budget.
    budget_lead: float = 2.0
    # beta: the share of the run's steps over which the budget rises linearly to its value
    # (0: the whole budget from the first step). Over the whole run (1), β starts to act
    # while the KL is still small.
    budget_ramp: float = 1.0
    # > 0 with a budget: after the last step, the policy's KL is measured on this many
    # training prompts and, where it is over the budget, the update is scaled down to land on
    # it (tether.rollout.landing); final/ holds the landed policy, RUN_DIR/landing.json what
    # was measured. 0: final/ is the last step's policy.
    budget_landing: int = 128
    # Where the KL enters: "reward" (−β·KL_t per token, PPO/RLOO/REINFORCE/A2C) or "loss"
    # (+β·mean KL as a loss term, GRPO); "auto" picks by algo.
    placement: Literal["auto", "reward", "loss"] = "auto"
    # k1 = log π − log π_ref (the unbiased penalty of the papers); k2, k3 are ≥ 0 per token;
    # "auto": k1 in the reward, k3 as a loss term (its gradient is that of KL(π‖π_ref)).
    estimator: Literal["auto", "k1", "k2", "k3"] = "auto"

    @property
    def stops_at_budget(self) -> bool:
        """Whether a run ends where its rollout KL reaches the budget (budget_control: stop)."""
        return bool(self.budget) and self.budget_control == "stop"

    def resolved(self, algo: str) -> tuple[str, str]:
        """(placement, estimator) with "auto" resolved by `algo`'s row of the algorithm table."""
        placement = self.placement
        if placement == "auto":
            placement = ALGORITHMS[algo].kl_placement
        estimator = self.estimator
        if estimator == "auto":
            estimator = "k3" if placement == "loss" else "k1"
        return placement, estimator

    def validate(self) -> None:
        _check(self.coef >= 0, "ppo.kl.coef", "must be >= 0")
        _check(self.target > 0, "ppo.kl.target", "must be > 0")
        _check(self.horizon > 0, "ppo.kl.horizon", "must be > 0")
        _check(self.budget >= 0, "ppo.kl.budget", "must be >= 0 (0: no budget)")
        _check(0 <= self.budget_ramp <= 1, "ppo.kl.budget_ramp", "must be in [0, 1]")
        _check(self.budget_lead >= 0, "ppo.kl.budget_lead", "must be >= 0")
        _check(self.budget_landing >= 0, "ppo.kl.budget_landing", "must be >= 0 (0: off)")
        _check(
            not self.budget or self.stops_at_budget or self.coef > 0,
            "ppo.kl.coef",
            "must be > 0 with ppo.kl.budget_control: beta (the controller scales it)",
        )


@dataclass
class PPOLossConfig:
    """The PPO update: epochs over the rollout, clipping, coefficients, GAE."""

    # Passes over each rollout batch.
    ppo_epochs: int = 4
    # Optimizer steps per epoch; the rollout batch is split into this many minibatches
    # (each of which may be further split into train.grad_accum micro-batches).
    num_minibatches: int = 1
    # PPO's ratio clip ε: the policy loss stops pulling at 1 ± ε.
    clip_eps: float = 0.2
    # The value loss's clip around the rollout's values (0: off).
    value_clip_eps: float = 0.2
    # Weight of the value loss in the shared loss.
    vf_coef: float = 0.1
    # Weight of the entropy bonus (0: none, as in RLHF practice).
    ent_coef: float = 0.0
    # Discount γ over response tokens (1: none, the reward comes once at the end).
    gamma: float = 1.0
    # GAE's λ: lower trusts the critic more (less variance, more bias).
    lam: float = 0.95
    # PPO and A2C: whiten the critic's advantages over the batch.
    whiten_advantages: bool = True
    # Rescale per-token rewards by their std (mean kept: the score's sign carries meaning).
    whiten_rewards: bool = False
    # GRPO: divide by the group's std (off: Dr. GRPO's mean-centred advantages).
    grpo_scale_by_std: bool = True
    # REINFORCE: decay of the moving-average reward baseline.
    baseline_decay: float = 0.9
    kl: KLConfig = field(default_factory=KLConfig)

    def validate(self) -> None:
        _check(self.ppo_epochs >= 1, "ppo.ppo_epochs", "must be >= 1")
        _check(self.num_minibatches >= 1, "ppo.num_minibatches", "must be >= 1")
        _check(self.clip_eps > 0, "ppo.clip_eps", "must be > 0")
        _check(self.value_clip_eps >= 0, "ppo.value_clip_eps", "must be >= 0 (0 disables)")
        _check(self.vf_coef >= 0, "ppo.vf_coef", "must be >= 0")
        _check(0.0 <= self.gamma <= 1.0, "ppo.gamma", "must be in [0, 1]")
        _check(0.0 <= self.lam <= 1.0, "ppo.lam", "must be in [0, 1]")
        _check(0.0 <= self.baseline_decay < 1.0, "ppo.baseline_decay", "must be in [0, 1)")
        self.kl.validate()


@dataclass
class CriticConfig:
    """The value function trained jointly with the policy (A2C-style)."""

    # "head": a linear value head on the policy's own backbone (one model in memory);
    # "separate": its own backbone with a head.
    kind: Literal["head", "separate"] = "head"
    # A reward model dir to start the critic from: a separate critic takes its backbone and
    # head; a value head takes its score head, rescaled by its normalisation, so the first
    # values are the reward model's normalised score of the response so far. Empty: a head
    # starting at 0 (a separate critic: the policy's backbone). What each measured:
    # docs/implementation-details.md#critic-initialisation
    init: str = ""
    # The critic's learning rate (value head or separate critic); 0: optim.lr. The head is
    # one linear layer fitting a moving target, and learns at rates that would wreck the
    # policy.
    lr: float = 0.0
    # How the value head learns: "gradient", from the value loss in the shared PPO loss
    # alone; "least_squares": after every update it is also refit in closed form (ridge) to
    # the returns of the recent rollouts, on the features the backbone gave them
    # (tether.rollout.value_fit); not with parallel: fsdp. What each measured:
    # docs/implementation-details.md#critic-initialisation
    fit: Literal["gradient", "least_squares"] = "least_squares"
    # least_squares: the weight an earlier rollout keeps at each iteration (0: the last only).
    fit_decay: float = 0.8
    # least_squares: ridge λ, relative to the features' mean square; 0: at every iteration,
    # the λ whose fit on the earlier rollouts best predicts the new one.
    fit_ridge: float = 0.0

    def validate(self) -> None:
        _check(self.lr >= 0, "critic.lr", "must be >= 0 (0: optim.lr)")
        _check(0.0 <= self.fit_decay < 1.0, "critic.fit_decay", "must be in [0, 1)")
        _check(self.fit_ridge >= 0, "critic.fit_ridge", "must be >= 0 (0: chosen per iteration)")


@dataclass
class PPOConfig(StageConfig):
    """Online PPO against a reward, with a KL penalty to a frozen reference policy."""

    # One row each of the table in tether.core.algorithms (tests/test_algorithms.py keeps
    # this list and the table alike).
    algo: Literal["ppo", "rloo", "grpo", "reinforce", "a2c"] = "ppo"
    # The frozen reference π_ref; empty = the policy's initial weights. With a LoRA policy the
    # reference is the same backbone with the adapters disabled (one copy in memory).
    reference: str = ""
    # data.train: prompts ({"prompt": text or messages}); data.max_length: longest prompt in
    # tokens (longer ones are skipped and counted).
    data: DataConfig = field(default_factory=lambda: DataConfig(max_length=256))
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-5, eps=1e-5, schedule="linear")
    )
    # train.batch_size: prompts per rollout; train.max_steps: PPO iterations (0: one per
    # `epochs` pass over the prompts); save/log every N iterations.
    train: TrainConfig = field(default_factory=lambda: TrainConfig(save_every=10))
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardSpecConfig = field(default_factory=RewardSpecConfig)
    ppo: PPOLossConfig = field(default_factory=PPOLossConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)

    def validate(self) -> None:
        super().validate()
        self.rollout.validate()
        self.reward.validate()
        self.ppo.validate()
        self.critic.validate()
        _check(
            not ALGORITHMS[self.algo].grouped or self.rollout.samples_per_prompt >= 2,
            "rollout.samples_per_prompt",
            f"must be >= 2 for algo {self.algo}: it compares the answers to one prompt",
        )
        rollouts = self.train.batch_size * self.rollout.samples_per_prompt
        minibatch = rollouts // self.ppo.num_minibatches
        _check(
            minibatch >= 1 and rollouts % self.ppo.num_minibatches == 0,
            "ppo.num_minibatches",
            f"must divide the {rollouts} rollouts of an iteration "
            "(train.batch_size x rollout.samples_per_prompt)",
        )
        _check(
            minibatch % self.train.grad_accum == 0,
            "train.grad_accum",
            f"must divide the minibatch of {minibatch} rollouts",
        )


@dataclass
class DPOLossConfig:
    """The DPO family (Rafailov et al. 2023; IPO, Azar et al. 2023; hinge, SLiC)."""

    # β: how far from the reference the implicit reward lets the policy move.
    beta: float = 0.1
    # sigmoid: DPO; ipo: IPO's squared loss; hinge: SLiC.
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    # Conservative DPO: labels assumed flipped with this probability (sigmoid only).
    label_smoothing: float = 0.0
    # Listwise records: every ordered pair (weighted to sum to 1 per prompt) or adjacent only.
    listwise_pairs: Literal["all", "adjacent"] = "all"

    def validate(self) -> None:
        _check(self.beta > 0, "dpo.beta", "must be > 0")
        _check(0.0 <= self.label_smoothing < 0.5, "dpo.label_smoothing", "must be in [0, 0.5)")
        _check(
            self.label_smoothing == 0.0 or self.loss_type == "sigmoid",
            "dpo.label_smoothing",
            "only applies to loss_type: sigmoid",
        )


@dataclass
class DPOConfig(StageConfig):
    """Offline preference optimisation against a frozen reference (no reward model)."""

    # The reference π_ref; empty = the policy's initial weights. Its log-probs are computed
    # once before training and cached in the run dir, so no second model stays in memory.
    reference: str = ""
    # data.max_length: prompt + response tokens; the prompt is cut from the left first.
    data: DataConfig = field(default_factory=lambda: DataConfig(max_length=512))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-6))
    dpo: DPOLossConfig = field(default_factory=DPOLossConfig)

    def validate(self) -> None:
        super().validate()
        self.dpo.validate()


@dataclass
class GRPOConfig(PPOConfig):
    """`tether grpo`: the PPO config with GRPO's defaults (4 samples per prompt)."""

    algo: Literal["ppo", "rloo", "grpo", "reinforce", "a2c"] = "grpo"
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(samples_per_prompt=4))


# --------------------------------------------------------------------------- loading

C = TypeVar("C")


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' {message}")


def as_it_ran(saved: dict[str, Any]) -> dict[str, Any]:
    """A run dir's saved config with the keys it predates set to what the run did then.

    A run dir's config.yaml holds every key, so a key it lacks was added to tether after the
    run started, and is otherwise read as its default. Where the default is not what the run
    did, resuming on it would change the run's method halfway: a budget run saved before
    `ppo.kl.budget_control` existed was steered by the β controller, not stopped.
    """
    ppo = saved.get("ppo")
    kl = ppo.get("kl") if isinstance(ppo, dict) else None
    if isinstance(kl, dict) and kl.get("budget") and "budget_control" not in kl:
        return {**saved, "ppo": {**ppo, "kl": {**kl, "budget_control": "beta"}}}
    return saved


def load_config(
    cls: type[C],
    path: str | Path | None = None,
    overrides: list[str] = (),
    saved_run: bool = False,
) -> C:
    """Build `cls` from a YAML file (optional) and `a.b=value` overrides, then validate it.

    Override values are parsed as YAML (`--set train.lr=1e-5`, `--set model.lora.enabled=true`,
    `--set 'lora.target_modules=[q_proj, v_proj]'`). `saved_run`: the file is a run dir's
    config.yaml, read as the run ran (`as_it_ran`).
    """
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from e
        try:
            # safe_load: a config file can never construct Python objects (no !!python tags).
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys")
        raw = as_it_ran(loaded or {}) if saved_run else loaded or {}
    for item in overrides:
        _apply_override(raw, item)
    return build_config(cls, None, raw, source)


def build_config(
    cls: type[C],
    base: C | None = None,
    values: dict[str, Any] | None = None,
    source: str = "arguments",
) -> C:
    """`base` (or the defaults) with `values` applied as a YAML mapping, then validated: what
    `load_config` does with a file and overrides, and the Python API with keyword sections.
    Errors name `source`."""
    import copy

    config = copy.deepcopy(base) if base is not None else cls()
    if not isinstance(config, cls):
        raise ConfigError(f"expected a {cls.__name__}, got a {type(config).__name__}")
    config = _update(config, values or {}, prefix="", source=source)
    config.validate()
    return config


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, value_text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{item}' must look like key=value (e.g. train.max_steps=10)")
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{item}': value is not valid YAML: {e}") from e
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{item}': '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


# TRL's (and transformers' TrainingArguments') names for tether's keys, for the error a TRL
# user's config meets; several stand for a key of one stage only (`beta`).
TRL_NAMES: dict[str, tuple[str, ...]] = {
    "learning_rate": ("optim.lr",),
    "lr_scheduler_type": ("optim.schedule",),
    "warmup_steps": ("optim.warmup_steps",),
    "weight_decay": ("optim.weight_decay",),
    "max_grad_norm": ("optim.max_grad_norm",),
    "adam_epsilon": ("optim.eps",),
    "per_device_train_batch_size": ("train.batch_size",),
    "gradient_accumulation_steps": ("train.grad_accum",),
    "num_train_epochs": ("train.epochs",),
    "max_steps": ("train.max_steps",),
    "seed": ("train.seed",),
    "logging_steps": ("train.log_every",),
    "save_steps": ("train.save_every",),
    "eval_steps": ("train.eval_every",),
    "save_total_limit": ("train.keep_last",),
    "bf16": ("train.precision",),
    "model_name_or_path": ("model.name",),
    "gradient_checkpointing": ("model.gradient_checkpointing",),
    "max_length": ("data.max_length",),
    "max_prompt_length": ("data.max_length",),
    "num_generations": ("rollout.samples_per_prompt",),
    "max_completion_length": ("rollout.max_new_tokens",),
    "temperature": ("rollout.temperature",),
    "beta": ("ppo.kl.coef", "dpo.beta"),
    "kl_coef": ("ppo.kl.coef",),
    "loss_type": ("dpo.loss_type",),
    "label_smoothing": ("dpo.label_smoothing",),
    "epsilon": ("ppo.clip_eps",),
    "cliprange": ("ppo.clip_eps",),
    "cliprange_value": ("ppo.value_clip_eps",),
    "vf_coef": ("ppo.vf_coef",),
    "num_ppo_epochs": ("ppo.ppo_epochs",),
    "num_mini_batches": ("ppo.num_minibatches",),
    "report_to": ("logging.report_to",),
    "run_name": ("logging.run_name",),
    "output_dir": ("--out",),
}


def _dotted_keys(config: Any, prefix: str = "") -> list[str]:
    out = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            out += _dotted_keys(value, f"{prefix}{f.name}.")
        else:
            out.append(f"{prefix}{f.name}")
    return out


def _suggestion(full: str, root: Any) -> str:
    """'; did you mean ...?' from TRL's names, then from the closest keys in any section of
    the config being built (`root`)."""
    keys = _dotted_keys(root)
    name = full.rsplit(".", 1)[-1]
    trl = [k for k in TRL_NAMES.get(name, ()) if k in keys or k.startswith("--")]
    if trl:
        return f"; TRL's `{name}` is tether's {' or '.join(repr(k) for k in trl)}"
    by_leaf = {k.rsplit(".", 1)[-1]: k for k in keys}
    close = difflib.get_close_matches(full, keys, n=1) or [
        by_leaf[m] for m in difflib.get_close_matches(name, list(by_leaf), n=1)
    ]
    return f"; did you mean '{close[0]}'?" if close else ""


def _update(config: C, raw: dict[str, Any], prefix: str, source: str, root: Any = None) -> C:
    """Apply `raw` onto a default-constructed config, section by section, so a stage's own
    defaults for a shared section (the RM's shorter max_length) survive a partial override."""
    hints = typing.get_type_hints(type(config))
    names = [f.name for f in dataclasses.fields(config)]
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key not in names:
            hint = _suggestion(full, root or config)
            raise ConfigError(f"{source}: unknown config key '{full}'{hint}")
        current = getattr(config, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: config key '{full}' must be a section (a mapping)")
            _update(current, value, prefix=f"{full}.", source=source, root=root or config)
        else:
            setattr(config, key, _coerce(hints[key], value, full, source))
    return config


def _coerce(tp: Any, value: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key, source)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(
                f"{source}: config key '{key}' must be one of {list(choices)}, got {value!r}"
            )
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if item_tp is str and isinstance(value, str):
            value = [value]  # `report_to: wandb`, as TRL users write it
        if not isinstance(value, list):
            raise ConfigError(f"{source}: config key '{key}' must be a list, got {value!r}")
        return [_coerce(item_tp, v, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: config key '{key}' must be a mapping, got {value!r}")
        return dict(value)
    if tp is float:
        # YAML reads `1e-5` as a string (YAML 1.1 wants a dot); accept it, and ints, as floats.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{source}: config key '{key}' must be a number, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: config key '{key}' must be an integer, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: config key '{key}' must be true or false, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{source}: config key '{key}' must be a string, got {value!r}")
    if tp is Any:
        return value
    raise ConfigError(f"{source}: config key '{key}' has an unsupported type {tp!r}")


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_yaml(config: Any) -> str:
    """The YAML text `load_config` reads back to an equal config (the run dir writes it)."""
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)


def config_differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    keys = sorted(set(a) | set(b))
    out: list[str] = []
    for k in keys:
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_differences(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}")
    return out


# --------------------------------------------------------------------------- reference


def field_docs(cls: type) -> dict[str, str]:
    """Each field's doc: the comment lines right above it in the class's source, so that
    config.py's comments are the one text that `tether config` prints and the code reads."""
    import ast
    import inspect

    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # a subclass's comment wins over its base's
        if not dataclasses.is_dataclass(klass):
            continue
        lines, _ = inspect.getsourcelines(klass)
        body = ast.parse(inspect.cleandoc("\n".join(line.rstrip("\n") for line in lines)))
        for node in body.body[0].body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                comment = []
                row = node.lineno - 2  # the line above, 0-based
                while row >= 0 and lines[row].strip().startswith("#"):
                    comment.insert(0, lines[row].strip().lstrip("#").strip())
                    row -= 1
                if comment:
                    docs[node.target.id] = " ".join(comment)
    return docs


def config_reference(cls: type) -> str:
    """Every key of a stage's config, with its default and its doc, as YAML that loads back
    to the defaults: `tether config ppo > ppo.yaml` is a commented starting point."""
    import textwrap

    out: list[str] = []

    def section(config: Any, indent: str, docs: dict[str, str]) -> None:
        for f in dataclasses.fields(config):
            value = getattr(config, f.name)
            doc = docs.get(f.name) or (
                (type(value).__doc__ or "").strip() if dataclasses.is_dataclass(value) else ""
            )
            for line in textwrap.wrap(doc, 96 - len(indent)):
                out.append(f"{indent}# {line}")
            if dataclasses.is_dataclass(value):
                out.append(f"{indent}{f.name}:")
                section(value, indent + "  ", field_docs(type(value)))
            else:
                text = yaml.safe_dump({f.name: value}, default_flow_style=True, width=1000)
                out.append(indent + text.strip().removeprefix("{").removesuffix("}"))

    section(cls(), "", field_docs(cls))
    return "\n".join(out) + "\n"
