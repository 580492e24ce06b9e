"""`tether demo`: the whole RLHF pipeline on the embedded SmolLM2-135M-Instruct, judged by a
gold standard the pipeline never trains on.

    1. prompts      the task's prompts, split into training and held-out
    2. preferences  K answers per training prompt from π_ref; the simulated annotator ranks
                    them (tether.tools.tasks); rankings are written as listwise preference records
    3. reward model LoRA on the same backbone, Bradley-Terry on the rankings' pairs
                    (`tether rm`); held-out accuracy against the annotator
    4. PPO          LoRA policy against the reward model with a KL penalty (`tether ppo`);
                    the gold judge is logged every step but never trained on
    5. evaluation   held-out prompts: gold and RM score of π_ref and of the policy, the
                    policy's KL, its gold win-rate over π_ref, and best-of-n sampling from
                    π_ref with the reward model at the analytic KL log n − (n−1)/n
    6. report       report.html (tether.tools.report) and summary.json

RUN_DIR/ holds prompts/, preferences.jsonl, rm/ and ppo/ (ordinary run dirs of those
stages), eval/, summary.json and report.html. Every stage's output is written atomically
and marks it done, so `--resume` after Ctrl-C or a crash skips finished stages and resumes
the stage in progress from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from tether.config import ModelConfig, PPOConfig, RMConfig, load_config
from tether.console import say
from tether.core.kl import best_of_n_kl
from tether.core.metrics import best_of_n_mean, pairwise_agreement, value_at_kl, win_rate
from tether.core.ops import masked_sum
from tether.errors import TetherError
from tether.fast.allocator import release_freed_memory
from tether.hardware import (
    autocast,
    bf16_available,
    describe,
    keep_freed_memory,
    resolve_device,
    use_bf16,
)
from tether.models.loading import (
    ADAPTER_DIR,
    load_causal_lm,
    load_tokenizer,
    model_device,
    resolve_model_source,
)
from tether.rollout.generation import encode_prompt, generate
from tether.rollout.passes import build_batch, sequence_logprobs_of
from tether.runs.rundir import read_jsonl, write_text_atomic
from tether.tools.tasks import Task, annotator_ranking, annotator_utilities, get_task, gold_function

DEMO_MODEL = "smollm2-135m-instruct"
BEST_OF_N = (1, 2, 4, 8, 16, 32, 64)
# Rows per generate call when sampling many answers: the engine's decode step is a matrix
# product per layer, and more rows per weight read run faster (on a 2-core AVX-512 bf16 CPU,
# 32 new tokens: 1,384 tokens/s at 64 rows, 1,843 at 128, 2,331 at 256).
SAMPLE_CHUNK = 256


@dataclass
class DemoSettings:
    """The scale of a demo run; saved in RUN_DIR/settings.json so `--resume` reuses it."""

    task: str = "sentiment"
    model: str = DEMO_MODEL
    train_prompts: int = 200
    eval_prompts: int = 40
    responses_per_prompt: int = 4  # K answers the annotator ranks
    tau: float | None = None  # annotator noise; None: the task's
    length_bias: float = 0.0  # annotator utility per word: > 0 provokes length hacking
    max_new_tokens: int | None = None  # None: the task's
    # Two epochs: one (in steps of 4 rankings) reaches the same held-out accuracy in 60% of
    # the time, but such a reward model can pay for short exclamations, and PPO against it
    # then answers "Awesome." to every prompt (benchmarks/RESULTS.md). --quick takes one.
    rm_epochs: int = 2
    # The held-out gold levels off from about step 14 (benchmarks/RESULTS.md): 20 and 24 steps
    # reach what 16 do, in 15 and 30 s more.
    ppo_steps: int = 16
    ppo_batch: int = 16
    ppo_lr: float = 3e-4
    kl_coef: float = 0.05
    # The share of the policy's layers, the top ones, that carry adapters (1: every layer).
    # The layers beneath run once per rollout and take no backward (tether.models.trunk),
    # and PPO learns as much per step (benchmarks/RESULTS.md).
    policy_lora_share: float = 1 / 3
    # The same for the reward model, whose layers beneath run once per ranking over both
    # epochs (reward_model.TrunkStates). With adapters on the top half it needs twice the
    # learning rate of adapters everywhere, and then ranks as well in 60% of the time.
    rm_lora_share: float = 0.5
    rm_lr: float = 4e-3
    # > 0: PPO at β = kl_coef stops where its KL reaches this many nats per answer, and is
    # landed on it (ppo.kl.budget); the report compares the policy with best-of-n there.
    # `tether demo --kl-budget` also takes KL_BUDGET's PPO settings (budget_settings).
    kl_budget: float = 0.0
    kl_budget_control: Literal["stop", "beta"] = "stop"  # ppo.kl.budget_control
    best_of: int = 16  # π_ref samples per held-out prompt, for best-of-n up to this n
    policy_samples: int = 4  # policy samples per held-out prompt
    seed: int = 0
    # Where every model runs (train.device): auto, cpu, cuda, cuda:N. A resumed run takes the
    # one given now, so a demo started on one machine can finish on another.
    device: str = "auto"


QUICK = {
    "rm_epochs": 1,
    "train_prompts": 48,
    "eval_prompts": 16,
    "ppo_steps": 8,
    "ppo_batch": 8,
    "best_of": 8,
    "policy_samples": 2,
}
# A budget run's PPO: 64 prompts a step at a quarter of the learning rate, whose less noisy
# steps buy more gold for the KL than the default's 16 (at 2 nats, seed 0: 0.554 with 16,
# 0.632 with 32, 0.674 with 64, where best-of-n has 0.676; benchmarks/RESULTS.md), for at
# most 30 steps. At 2 nats it stops after about 18, in 6.5 min on a 2-core CPU.
KL_BUDGET = {"ppo_steps": 30, "ppo_batch": 64, "ppo_lr": 7.5e-5}


def budget_settings(s: DemoSettings) -> DemoSettings:
    """The settings of a KL-budget run: KL_BUDGET's steps where `s` has the default's, and
    its batch with its learning rate where `s` has the default's pair (--quick keeps its own)."""
    default = DemoSettings()
    if s.ppo_steps == default.ppo_steps:
        s = replace(s, ppo_steps=KL_BUDGET["ppo_steps"])
    if (s.ppo_batch, s.ppo_lr) == (default.ppo_batch, default.ppo_lr):
        s = replace(s, ppo_batch=KL_BUDGET["ppo_batch"], ppo_lr=KL_BUDGET["ppo_lr"])
    return s


STAGES = ("prompts", "preferences", "reward model", "ppo", "evaluation", "report")


# What a run saved before a setting existed ran with, where that differs from its default
# now: a checkpoint with adapters on every layer resumes with adapters on every layer, and a
# budget run steered by β goes on being steered.
ABSENT_SETTINGS = {
    "policy_lora_share": 1.0,
    "rm_lora_share": 1.0,
    "rm_lr": 2e-3,
    "kl_budget_control": "beta",
}


def saved_settings(saved: dict[str, Any]) -> DemoSettings:
    """A run's settings.json as the run ran: what it lacks from ABSENT_SETTINGS, else the
    defaults; keys this tether does not know are dropped."""
    known = {f.name for f in fields(DemoSettings)}
    return DemoSettings(**{k: v for k, v in {**ABSENT_SETTINGS, **saved}.items() if k in known})


def load_settings(out: Path, given: DemoSettings, resume: bool) -> DemoSettings:
    """The run's settings: fresh ones are saved; a resumed run keeps the saved ones."""
    path = out / "settings.json"
    if resume and path.is_file():
        return replace(saved_settings(json.loads(path.read_text())), device=given.device)
    if not resume and out.exists() and any(out.iterdir()):
        raise TetherError(f"{out} already holds a demo run; pass --resume or choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(asdict(given), indent=2) + "\n")
    return given


def write_jsonl(path: Path, records: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records))


def sample_answers(
    model, tokenizer, prompts: list[str], n: int, max_new_tokens: int, seed: int, desc: str
) -> tuple[list[str], list[bool], list[list[int]], list[list[int]]]:
    """n answers per prompt at T = 1 (a prompt's n answers are consecutive): texts, ended,
    prompt ids, response ids. On tether's engine each row draws from its own seed, so its
    answer does not depend on the chunking; chunks of up to SAMPLE_CHUNK rows, behind a
    progress bar."""
    rows = [encode_prompt(tokenizer, p) for p in prompts for _ in range(n)]
    row_seeds = [seed * 1_000_000 + i for i in range(len(rows))]
    texts, ended, response_ids, prompt_ids = [], [], [], []
    if not rows:
        return texts, ended, prompt_ids, response_ids
    chunks = math.ceil(len(rows) / SAMPLE_CHUNK)
    chunk = math.ceil(len(rows) / chunks)  # even chunks: 800 rows as 4 × 200, not 3 × 256 + 32
    bf16 = bf16_available(model_device(model))
    for start in tqdm(range(0, len(rows), chunk), desc=desc, unit="batch"):
        with autocast(bf16):
            gen = generate(
                model,
                tokenizer,
                rows[start : start + chunk],
                max_new_tokens=max_new_tokens,
                temperature=1.0,
                row_seeds=row_seeds[start : start + chunk],
                dtype=torch.bfloat16 if bf16 else torch.float32,
            )
        texts += gen.texts
        ended += gen.ended
        response_ids += gen.response_ids
        prompt_ids += gen.prompt_ids
    return texts, ended, prompt_ids, response_ids


# --------------------------------------------------------------------------- stages


def stage_prompts(task: Task, s: DemoSettings, out: Path) -> dict[str, Any]:
    prompts = task.prompts(s.seed)
    needed = s.train_prompts + s.eval_prompts
    if needed > len(prompts):
        raise TetherError(
            f"task {task.name} has {len(prompts)} prompts; {s.train_prompts} train + "
            f"{s.eval_prompts} held-out asked for"
        )
    train, held_out = prompts[: s.train_prompts], prompts[s.train_prompts : needed]
    write_jsonl(out / "prompts/held_out.jsonl", [{"prompt": p} for p in held_out])
    write_jsonl(out / "prompts/train.jsonl", [{"prompt": p} for p in train])
    return {"train": len(train), "held_out": len(held_out)}


def stage_preferences(task: Task, s: DemoSettings, out: Path) -> dict[str, Any]:
    prompts = [r["prompt"] for r in _read(out / "prompts/train.jsonl")]
    source = resolve_model_source(s.model)
    tokenizer = load_tokenizer(source)
    model = load_causal_lm(ModelConfig(name=source), tokenizer, dropout=False)
    model.to(resolve_device(s.device)).eval()
    k, tau = s.responses_per_prompt, _tau(task, s)
    texts, *_ = sample_answers(
        model, tokenizer, prompts, k, _max_new(task, s), s.seed, desc="sampling π_ref"
    )
    gold = torch.tensor(gold_function(task)([p for p in prompts for _ in range(k)], texts))
    lengths = torch.tensor([len(t.split()) for t in texts])
    generator = torch.Generator().manual_seed(s.seed)
    records, positions = [], torch.empty(len(prompts), k)
    for i, prompt in enumerate(prompts):
        sl = slice(i * k, (i + 1) * k)
        utilities = annotator_utilities(gold[sl], lengths[sl], s.length_bias)
        ranking = annotator_ranking(utilities, tau, generator)
        records.append(
            {
                "prompt": prompt,
                "responses": texts[sl],
                "ranking": ranking,
                "gold": gold[sl].tolist(),
            }
        )
        positions[i, ranking] = -torch.arange(k, dtype=torch.float)  # higher = ranked better
    write_jsonl(out / "preferences.jsonl", records)
    agreement = pairwise_agreement(positions, gold.view(-1, k))
    return {
        "answers": len(texts),
        "gold_mean": gold.mean().item(),
        # None where gold ties every pair (nothing to agree with)
        "annotator_gold_agreement": _none_if_nan(agreement),
    }


def lora_overrides(s: DemoSettings) -> list[str]:
    """RM and policy alike: LoRA r=16 on the reference model, which stays frozen beneath."""
    lora = ["model.lora.enabled=true", "model.lora.r=16", "model.lora.alpha=32"]
    return [f"model.name={s.model}", *lora, f"train.device={s.device}"]


def rm_config(task: Task, s: DemoSettings, out: Path) -> RMConfig:
    return load_config(
        RMConfig,
        None,
        [
            *lora_overrides(s),
            f"model.lora.top_layers={top_layers(s.model, s.rm_lora_share)}",
            f"data.train={out / 'preferences.jsonl'}",
            "data.eval_fraction=0.15",
            "data.max_length=160",
            f"optim.lr={s.rm_lr}",
            "optim.warmup_steps=5",
            f"train.epochs={s.rm_epochs}",
            # steps of 8 rankings in micro-batches of 4: the same step, half the activations
            "train.batch_size=4",
            "train.grad_accum=2",
            "train.eval_every=0",
            "train.save_every=10",
            f"train.seed={s.seed}",
        ],
    )


def stage_reward_model(task: Task, s: DemoSettings, out: Path) -> dict[str, Any]:
    from tether.stages.rm import run_rm

    run_rm(rm_config(task, s, out), out / "rm", resume=True)
    last_eval = [r for r in read_jsonl(out / "rm/metrics.jsonl") if "eval/accuracy" in r][-1]
    return {
        "accuracy": last_eval["eval/accuracy"],
        "held_out_pairs": last_eval.get("eval/n"),
        "length_corr": last_eval.get("eval/length_corr"),
    }


def ppo_config(task: Task, s: DemoSettings, out: Path) -> PPOConfig:
    return load_config(
        PPOConfig,
        None,
        [
            *lora_overrides(s),
            f"model.lora.top_layers={top_layers(s.model, s.policy_lora_share)}",
            f"data.train={out / 'prompts/train.jsonl'}",
            "data.max_length=96",
            f"reward.terms=[{{name: 'model:{out / 'rm/final'}', weight: 1.0}}]",
            f"reward.gold={task.gold}",
            f"optim.lr={s.ppo_lr}",
            "optim.eps=1e-5",
            "optim.schedule=constant",
            f"train.max_steps={s.ppo_steps}",
            f"train.batch_size={s.ppo_batch}",
            f"train.save_every={max(1, min(10, s.ppo_steps // 2))}",
            f"train.seed={s.seed}",
            f"rollout.max_new_tokens={_max_new(task, s)}",
            "rollout.missing_eos=none",
            "rollout.generation_batch_size=64",
            f"rollout.samples_every={max(1, s.ppo_steps // 8)}",
            "ppo.ppo_epochs=2",
            "ppo.num_minibatches=2",
            "ppo.vf_coef=0.1",
            "ppo.gamma=1.0",
            "ppo.lam=0.95",
            f"ppo.kl.coef={s.kl_coef}",
            "ppo.kl.estimator=k1",
            *kl_budget_overrides(s),
        ],
    )


def top_layers(model: str, share: float) -> int:
    """How many of `model`'s top layers carry adapters for `share` of them (0: all)."""
    if share >= 1:
        return 0
    from transformers import AutoConfig

    depth = AutoConfig.from_pretrained(resolve_model_source(model)).num_hidden_layers
    return max(1, round(depth * share))


def kl_budget_overrides(s: DemoSettings) -> list[str]:
    """A budget spent at β = kl_coef, the run stopped where it is spent and then landed."""
    if not s.kl_budget:
        return []
    return [f"ppo.kl.budget={s.kl_budget}", f"ppo.kl.budget_control={s.kl_budget_control}"]


def stage_ppo(task: Task, s: DemoSettings, out: Path) -> dict[str, Any]:
    from tether.stages.ppo import LANDING_FILE, run_ppo

    run_ppo(ppo_config(task, s, out), out / "ppo", resume=True)
    steps = read_jsonl(out / "ppo/metrics.jsonl")
    first, last = steps[0], steps[-1]
    landing = out / "ppo" / LANDING_FILE  # a budget run's (tether.rollout.landing)
    return {
        "steps": last["step"],
        "gold_first": first.get("gold/mean"),
        "gold_last": last.get("gold/mean"),
        "kl_last": last.get("kl/mean"),
        "landing": json.loads(landing.read_text()) if landing.is_file() else None,
    }


def stage_evaluation(task: Task, s: DemoSettings, out: Path) -> dict[str, Any]:
    """Held-out prompts: π_ref (best_of samples each) against the policy (policy_samples)."""
    prompts = [r["prompt"] for r in _read(out / "prompts/held_out.jsonl")]
    tokenizer, policy, reference = _load_policy_and_reference(s, out)
    max_new = _max_new(task, s)
    with reference() as ref_model:
        ref_texts, ref_ended, *_ = sample_answers(
            ref_model, tokenizer, prompts, s.best_of, max_new, s.seed + 1, "held-out π_ref"
        )
    pol_texts, pol_ended, pol_prompt_ids, pol_response_ids = sample_answers(
        policy, tokenizer, prompts, s.policy_samples, max_new, s.seed + 2, "held-out policy"
    )
    kl = policy_kl(policy, reference, tokenizer, pol_prompt_ids, pol_response_ids)

    judge = _judge(task, prompts, out, s)
    ref_gold, ref_rm = judge(ref_texts, s.best_of)
    pol_gold, pol_rm = judge(pol_texts, s.policy_samples)
    reference_answers = _scored_answers(ref_texts, ref_ended, ref_gold, ref_rm)
    policy_answers = _scored_answers(
        pol_texts, pol_ended, pol_gold, pol_rm, kl.view(-1, s.policy_samples)
    )
    records = [
        {"prompt": p, "reference": ref, "policy": pol}
        for p, ref, pol in zip(prompts, reference_answers, policy_answers, strict=True)
    ]
    write_jsonl(out / "eval/samples.jsonl", records)
    results = {
        "gold_ref": ref_gold.mean().item(),
        "gold_policy": pol_gold.mean().item(),
        "rm_score_ref": ref_rm.mean().item(),
        "rm_score_policy": pol_rm.mean().item(),
        "kl": kl.mean().item(),
        # each policy answer against every π_ref answer to the same prompt, ties count ½
        "win_rate": win_rate(pol_gold[:, :, None], ref_gold[:, None, :]),
        "rm_gold_accuracy": _none_if_nan(pairwise_agreement(ref_rm, ref_gold)),
        "length_ref": _mean_words(ref_texts),
        "length_policy": _mean_words(pol_texts),
        "best_of_n": _best_of_n_curve(ref_rm, ref_gold, s.best_of),
    }
    # Best-of-n's gold at the policy's KL: what PPO must beat to be the better use of KL. Its
    # RM score there says why PPO falls short where it does: a lower RM score is reward PPO
    # did not find for its KL (optimisation), a like RM score with lower gold is the reward
    # model being gamed (over-optimisation).
    gold, rm = best_of_n_at_kl(results["best_of_n"], results["kl"])
    results["best_of_n_gold_at_policy_kl"], results["best_of_n_rm_at_policy_kl"] = gold, rm
    write_text_atomic(out / "eval/results.json", json.dumps(results, indent=2) + "\n")
    return results


def best_of_n_at_kl(best_of_n: list[dict], kl: float) -> tuple[float | None, float | None]:
    """Best-of-n's (gold, RM score) at `kl`, read off its curve between the n that bracket
    it (None outside the curve)."""
    return (
        value_at_kl([(b["kl"], b["gold"]) for b in best_of_n], kl),
        value_at_kl([(b["kl"], b["rm_score"]) for b in best_of_n], kl),
    )


def _load_policy_and_reference(
    s: DemoSettings, out: Path
) -> tuple[Any, torch.nn.Module, Callable[[], contextlib.AbstractContextManager]]:
    """The tokenizer, the trained policy (ppo/final) in eval mode, dropout off, and
    `reference()`, a context in which π_ref is at hand. Where PPO saved its LoRA adapters
    the policy is π_ref's weights with them on top, and π_ref the same model with them off:
    one copy of the weights in memory instead of two."""
    from peft import PeftModel

    source = resolve_model_source(s.model)
    tokenizer = load_tokenizer(source)
    device = resolve_device(s.device)
    base = load_causal_lm(ModelConfig(name=source), tokenizer, dropout=False).to(device).eval()
    policy_dir = out / "ppo/final"
    if (policy_dir / ADAPTER_DIR).is_dir():
        policy = PeftModel.from_pretrained(base, str(policy_dir / ADAPTER_DIR)).eval()
        return tokenizer, policy, lambda: _adapters_off(policy)
    merged = load_causal_lm(ModelConfig(name=str(policy_dir)), tokenizer, dropout=False)
    return tokenizer, merged.to(device).eval(), lambda: contextlib.nullcontext(base)


@contextlib.contextmanager
def _adapters_off(policy) -> Iterator[torch.nn.Module]:
    with policy.disable_adapter():  # yields None, not the model
        yield policy


def _judge(
    task: Task, prompts: list[str], out: Path, s: DemoSettings
) -> Callable[[list[str], int], tuple[torch.Tensor, torch.Tensor]]:
    """judge(texts, n) -> ([P, n] gold, [P, n] RM score) of n answers per prompt, consecutive."""
    from tether.models.reward_model import RewardModel

    gold_fn = gold_function(task)
    device = resolve_device(s.device)
    rm = RewardModel.load(str(out / "rm/final"), bf16=bf16_available(device), device=device)

    def judge(texts: list[str], n: int) -> tuple[torch.Tensor, torch.Tensor]:
        repeated = [p for p in prompts for _ in range(n)]
        rm_scores = rm.score(repeated, texts, batch_size=32)
        return torch.tensor(gold_fn(repeated, texts)).view(-1, n), rm_scores.view(-1, n)

    return judge


def _scored_answers(
    texts: list[str],
    ended: list[bool],
    gold: torch.Tensor,
    rm: torch.Tensor,
    kl: torch.Tensor | None = None,
) -> list[list[dict[str, Any]]]:
    """Per prompt, its n answers (consecutive in `texts`; [P, n] scores) as samples.jsonl
    records: response, ended, gold, rm_score, and kl where given (the policy's answers)."""
    n = gold.shape[1]
    per_prompt = []
    for i in range(gold.shape[0]):
        rows = slice(i * n, (i + 1) * n)
        columns = [texts[rows], ended[rows], gold[i].tolist(), rm[i].tolist()]
        keys = ["response", "ended", "gold", "rm_score"]
        if kl is not None:
            columns.append(kl[i].tolist())
            keys.append("kl")
        per_prompt.append(
            [dict(zip(keys, values, strict=True)) for values in zip(*columns, strict=True)]
        )
    return per_prompt


def _best_of_n_curve(ref_rm: torch.Tensor, ref_gold: torch.Tensor, best_of: int) -> list[dict]:
    """Best-of-n from π_ref's samples, picked by the RM: each n's analytic KL and mean scores."""
    return [
        {
            "n": n,
            "kl": best_of_n_kl(n),
            "gold": best_of_n_mean(ref_rm, ref_gold, n),
            "rm_score": best_of_n_mean(ref_rm, ref_rm, n),
        }
        for n in BEST_OF_N
        if n <= best_of
    ]


@torch.no_grad()
def policy_kl(
    policy,
    reference: Callable[[], contextlib.AbstractContextManager],
    tokenizer,
    prompt_ids,
    response_ids,
    chunk: int = 64,
) -> torch.Tensor:
    """[N] Σ_t log π(y_t|…) − log π_ref(y_t|…) of each policy sample: a one-sample Monte
    Carlo estimate of KL(π ‖ π_ref) per prompt, unbiased, at T = 1. π_ref is the model that
    `reference()` yields."""
    out = []
    device = model_device(policy)
    for start in range(0, len(prompt_ids), chunk):
        batch = build_batch(
            prompt_ids[start : start + chunk],
            response_ids[start : start + chunk],
            tokenizer.pad_token_id,
        ).to(device)
        with autocast(bf16_available(device)):
            logprobs = sequence_logprobs_of(policy, batch, 1.0)
            with reference() as ref_model:
                ref_logprobs = sequence_logprobs_of(ref_model, batch, 1.0)
        out.append(masked_sum(logprobs - ref_logprobs, batch.response_mask, dim=1).cpu())
    return torch.cat(out).float()


# --------------------------------------------------------------------------- driver


def run_demo(
    out: Path, settings: DemoSettings | None = None, resume: bool = False, report: bool = True
) -> dict[str, Any]:
    """Run (or resume) every stage and return summary.json's contents."""
    from tether.tools.report import build_report

    keep_freed_memory()  # the preferences stage samples before any stage's begin_run
    out = Path(out)
    s = load_settings(out, settings or DemoSettings(), resume)
    task = get_task(s.task)
    gold_function(task)  # a broken gold spec fails here, before any model loads
    device = resolve_device(s.device)  # an unusable device fails here too
    say(f"tether demo: running on {describe(device, use_bf16('auto', device))}")
    state_path = out / "stages.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    steps = [
        ("prompts", stage_prompts, out / "prompts/train.jsonl"),
        ("preferences", stage_preferences, out / "preferences.jsonl"),
        ("reward model", stage_reward_model, out / "rm/final"),
        ("ppo", stage_ppo, out / "ppo/final"),
        ("evaluation", stage_evaluation, out / "eval/results.json"),
    ]
    for number, (name, fn, done_marker) in enumerate(steps, start=1):
        if name in state and done_marker.exists():
            say(f"[{number}/{len(STAGES)}] {name}: done earlier ({_line(name, state[name])})")
            continue
        started = time.perf_counter()
        result = fn(task, s, out)
        result["seconds"] = time.perf_counter() - started
        release_freed_memory()  # the next stage's peak starts from what is live
        state[name] = result
        write_text_atomic(state_path, json.dumps(state, indent=2) + "\n")
        say(f"[{number}/{len(STAGES)}] {name}: {_line(name, result)} ({result['seconds']:.0f}s)")
    results = state["evaluation"]
    summary = {
        "task": task.name,
        "model": s.model,
        "rm_accuracy": state["reward model"]["accuracy"],
        **{k: results[k] for k in results if k != "seconds"},
        "annotator_gold_agreement": state["preferences"]["annotator_gold_agreement"],
        "wall_s": sum(v["seconds"] for v in state.values()),
        "stage_s": {k: v["seconds"] for k, v in state.items()},
        "settings": asdict(s),
    }
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    if report:
        path = build_report(out)
        say(f"[{len(STAGES)}/{len(STAGES)}] report: {path}")
    return summary


def _line(name: str, r: dict[str, Any]) -> str:
    if name == "prompts":
        return f"{r['train']} training / {r['held_out']} held-out prompts"
    if name == "preferences":
        return (
            f"{r['answers']} answers from π_ref ranked by the annotator; gold mean "
            f"{r['gold_mean']:.3f}; annotator agrees with gold on "
            f"{_percent(r['annotator_gold_agreement'])} of pairs"
        )
    if name == "reward model":
        return f"held-out accuracy {r['accuracy']:.3f} against the annotator"
    if name == "ppo":
        gold = ""
        if r.get("gold_first") is not None:
            gold = f"; training gold {r['gold_first']:.3f} -> {r['gold_last']:.3f}"
        landed = ""
        if r.get("landing") and r["landing"]["scale"] < 1:
            landed = (
                f"; over the budget, the update scaled by {r['landing']['scale']:.2f} to KL "
                f"{r['landing']['kl_landed']:.2f} on training prompts"
            )
        return f"{r['steps']} steps{gold}; KL {r['kl_last']:.2f}{landed}"
    return (
        f"held-out gold π_ref {r['gold_ref']:.3f} -> policy {r['gold_policy']:.3f} "
        f"(win-rate {r['win_rate']:.0%}) at KL {r['kl']:.2f} nats; RM agrees with gold on "
        f"{_percent(r['rm_gold_accuracy'])} of pairs"
    )


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _tau(task: Task, s: DemoSettings) -> float:
    return task.tau if s.tau is None else s.tau


def _max_new(task: Task, s: DemoSettings) -> int:
    return task.max_new_tokens if s.max_new_tokens is None else s.max_new_tokens


def _mean_words(texts: list[str]) -> float:
    return sum(len(t.split()) for t in texts) / max(len(texts), 1)


def _none_if_nan(value: float) -> float | None:
    return None if math.isnan(value) else value


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"
