"""The GPU check: every stage on one device, with the guarantees tether gives on the CPU.

One command runs it all and exits non-zero if any part fails:
  1. stages: SFT, RM, DPO, PPO (value head), GRPO and LoRA-PPO for a few steps each, on
     models built from configs with seeded random weights (SmolLM2-135M's shape, and an SFT
     run at Qwen2.5-0.5B's); every logged loss finite, `final/` saved and loaded back;
  2. parity: the CPU and the device on one tiny model in fp32 (TF32 off): token log-probs,
     reward-model scores and DPO log-ratios within 1e-4, greedy generation identical;
  3. resume: an SFT and a PPO run killed after step 2 (SIGKILL) and resumed end at the
     uninterrupted run's weights (train.deterministic: true), within 1e-5;
  4. torchrun: an SFT job under `torchrun --nproc-per-node 1` (NCCL on a GPU, gloo on the
     CPU) writes DCP checkpoints, and a plain process resumes one;
  5. results: RESULTS_DIR/gpu_check.json and a table on stdout.

Nothing is fetched: the tokenizer comes from `--tokenizer DIR`, written beforehand on a
machine that has the embedded model (`--export-tokenizer DIR`, about 3.5 MB), or from the
embedded model itself where it is installed. On the CPU at `--scale tiny` it runs in CI
(tests/test_gpu_check.py), so it cannot rot while no GPU is at hand.

  python benchmarks/gpu_check.py --export-tokenizer /tmp/smol-tokenizer      # once, on CPU
  python benchmarks/gpu_check.py --tokenizer /tmp/smol-tokenizer --out /tmp/gpu-check
  python benchmarks/gpu_check.py --device cpu --scale tiny --out /tmp/gpu-check-cpu
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2_135M = dict(  # SmolLM2-135M's shape
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    tie_word_embeddings=True,
)
QWEN25_05B = dict(  # Qwen2.5-0.5B's shape (its vocabulary: 151,936)
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    tie_word_embeddings=True,
    vocab_size=151_936,
)
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=True,
)
FRUITS = ["apple", "plum", "pear", "lime", "fig", "kiwi", "date", "melon"]
COLOURS = ["red", "blue", "green", "black", "white", "pink"]


# --------------------------------------------------------------------------- set-up


def export_tokenizer(out: Path) -> Path:
    """The embedded SmolLM2 tokenizer as plain files, to carry to a machine without it."""
    from transformers import AutoTokenizer

    from tether.models.loading import embedded_gguf_path

    gguf = embedded_gguf_path("smollm2-135m-instruct")
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(out)
    return out


def build_model(out: Path, tokenizer_dir: Path, family: str, shape: dict, seed: int) -> Path:
    """A causal LM of `shape` with seeded random weights, saved with the tokenizer."""
    from transformers import (
        AutoTokenizer,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    shape = {"vocab_size": len(tokenizer), **shape}
    config_cls, model_cls = (
        (LlamaConfig, LlamaForCausalLM) if family == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    )
    config = config_cls(
        **shape,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model_cls(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def write_data(root: Path) -> dict[str, Path]:
    """Small SFT, preference and prompt files in tether's formats."""
    root.mkdir(parents=True, exist_ok=True)

    def jsonl(name: str, records: list[dict]) -> Path:
        path = root / name
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        return path

    sft, pairs, prompts = [], [], []
    for i, fruit in enumerate(FRUITS * 3):
        colour = COLOURS[i % len(COLOURS)]
        question = f"What colour is the {fruit}?"
        sft.append(
            {
                "messages": [
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": f"The {fruit} is {colour}."},
                ]
            }
        )
        pairs.append(
            {"prompt": question, "chosen": f"It is {colour}.", "rejected": "I do not know."}
        )
        prompts.append({"prompt": f"Describe a {colour} {fruit}."})
    return {
        "sft": jsonl("sft.jsonl", sft),
        "pairs": jsonl("pairs.jsonl", pairs),
        "prompts": jsonl("prompts.jsonl", prompts),
    }


# --------------------------------------------------------------------------- running stages


class Check:
    """Named checks, each timed and recorded; a failure is recorded, not raised."""

    def __init__(self) -> None:
        self.results: list[dict] = []

    def run(self, name: str, fn: Callable[[], str]) -> None:
        started = time.perf_counter()
        try:
            detail, ok = fn(), True
        except Exception as e:  # a failed check is a row of the table, not the end of it
            detail, ok = f"{type(e).__name__}: {str(e)[-600:]}", False
        seconds = time.perf_counter() - started
        self.results.append({"name": name, "ok": ok, "detail": detail, "seconds": seconds})
        print(f"{'ok  ' if ok else 'FAIL'} {name} ({seconds:.0f}s): {detail}", flush=True)


def tether(args: list[str], env: dict | None = None, check: bool = True, torchrun: bool = False):
    """`python -m tether ARGS` (or under torchrun), its output kept for the error message."""
    command = [sys.executable, "-m", "tether", *args]
    if torchrun:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", "1", "-m", "tether", *args,
        ]  # fmt: skip
    env = {**os.environ, "TETHER_MALLOC": "system", **(env or {})}
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:1])} exited {proc.returncode}: {proc.stderr[-1500:]}")
    return proc


def finite_losses(run_dir: Path) -> str:
    """Every loss logged is finite; returns the first and last train/loss."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    bad = [r["step"] for r in records for k, v in r.items() if "loss" in k and not math.isfinite(v)]
    if not losses or bad:
        raise RuntimeError(f"losses {losses}, non-finite at steps {bad}")
    memory = [r["memory/cuda_peak_gib"] for r in records if "memory/cuda_peak_gib" in r]
    peak = f", peak {max(memory):.2f} GiB" if memory else ""
    return f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {records[-1]['step']} steps{peak}"


def reloads(final: Path, reward_model: bool = False) -> None:
    """`final/` loads with transformers and gives finite outputs."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForSequenceClassification if reward_model else AutoModelForCausalLM
    model = cls.from_pretrained(final)
    out = model(input_ids=torch.tensor([[1, 2, 3, 4]]))
    if not torch.isfinite(out.logits).all():
        raise RuntimeError(f"{final} gives non-finite outputs")


def max_weight_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    left, right = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    if left.keys() != right.keys():
        raise RuntimeError(f"{a} and {b} hold different tensors")
    return max(float((left[k].float() - right[k].float()).abs().max()) for k in left)


# --------------------------------------------------------------------------- the checks


def stage_args(kind: str, model: Path, data: dict[str, Path], device: str, steps: int) -> list:
    """The CLI of one stage run: a few steps on `device`, deterministic, a checkpoint a step."""
    common = [
        "--model", str(model), "--device", device, "--max-steps", str(steps),
        "--set", "train.deterministic=true", "--set", "train.save_every=1",
        "--set", "train.batch_size=4", "--set", "optim.lr=1e-4",
    ]  # fmt: skip
    ppo = [
        "--data", str(data["prompts"]),
        "--set", "reward.terms=[{name: length, args: {unit: chars}}]",
        "--set", "rollout.max_new_tokens=12", "--set", "rollout.missing_eos=none",
        "--set", "rollout.samples_per_prompt=2",
    ]  # fmt: skip
    lora = ["--set", "model.lora.enabled=true", "--set", "model.lora.r=8"]
    return {
        "sft": ["sft", "--data", str(data["sft"]), *common],
        "rm": ["rm", "--data", str(data["pairs"]), *common],
        "dpo": ["dpo", "--data", str(data["pairs"]), *common],
        "ppo": ["ppo", *ppo, *common],
        "grpo": ["grpo", *ppo, *common],
        "ppo-lora": ["ppo", *ppo, *common, *lora, "--set", "optim.lr=1e-3"],
    }[kind]


def check_stages(check: Check, models: dict[str, Path], data, device: str, out: Path) -> None:
    for kind in ("sft", "rm", "dpo", "ppo", "grpo", "ppo-lora"):

        def run(kind: str = kind) -> str:
            run_dir = out / kind
            tether([*stage_args(kind, models["llama"], data, device, 4), "--out", str(run_dir)])
            reloads(run_dir / "final", reward_model=kind == "rm")
            return finite_losses(run_dir)

        check.run(f"stage {kind}", run)

    def qwen() -> str:
        run_dir = out / "sft-qwen-shape"
        tether([*stage_args("sft", models["qwen2"], data, device, 3), "--out", str(run_dir)])
        reloads(run_dir / "final")
        return finite_losses(run_dir)

    check.run("stage sft, Qwen2.5-0.5B's shape", qwen)


def check_resume(check: Check, models: dict[str, Path], data, device: str, out: Path) -> None:
    """Killed after step 2, resumed: the final weights are the uninterrupted run's."""
    for kind in ("sft", "ppo"):

        def run(kind: str = kind) -> str:
            run_dir = out / f"{kind}-killed"
            args = [*stage_args(kind, models["llama"], data, device, 4), "--out", str(run_dir)]
            killed = tether(args, {"TETHER_KILL_AT": "after_step:2"}, check=False)
            if killed.returncode != -9:
                raise RuntimeError(f"expected SIGKILL at step 2, got exit {killed.returncode}")
            tether([*args, "--resume"])
            diff = max_weight_difference(run_dir / "final", out / kind / "final")
            if diff > 1e-5:
                raise RuntimeError(f"resumed weights differ by {diff:.2e} (> 1e-5)")
            return f"weights within {diff:.1e} of the uninterrupted run's"

        check.run(f"resume {kind} after SIGKILL at step 2", run)


def check_torchrun(check: Check, models: dict[str, Path], data, device: str, out: Path) -> None:
    def run() -> str:
        run_dir = out / "sft-torchrun"
        args = [*stage_args("sft", models["llama"], data, device, 2), "--out", str(run_dir)]
        tether(args, torchrun=True)
        if not (run_dir / "checkpoints/step-2/.metadata").is_file():
            raise RuntimeError("the torchrun job wrote no DCP checkpoint")
        resumed = [a if a != "2" else "3" for a in args]  # --max-steps 3, in one process
        tether([*resumed, "--resume"])
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        steps = [json.loads(line)["step"] for line in lines]
        if steps[-1] != 3:
            raise RuntimeError(f"the plain process logged steps {steps}")
        backend = "nccl for GPU tensors" if device != "cpu" else "gloo"
        return f"DCP checkpoint of a 1-rank job ({backend}) resumed in one process to step 3"

    check.run("torchrun job, resumed in a plain process", run)


def parity_models(models: dict[str, Path]):
    """A tiny policy, a second tiny model as the reference, and a reward model on the first."""
    from transformers import AutoModelForCausalLM

    from tether.config import ModelConfig
    from tether.models.loading import load_tokenizer
    from tether.models.reward_model import load_reward_backbone

    tokenizer = load_tokenizer(str(models["tiny"]))
    policy = AutoModelForCausalLM.from_pretrained(models["tiny"], dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(models["tiny-ref"], dtype=torch.float32)
    rm = load_reward_backbone(ModelConfig(name=str(models["tiny"])), tokenizer, seed=0).eval()
    return tokenizer, policy, reference.eval(), rm


@torch.no_grad()
def parity_outputs(models: dict[str, Path], device: str) -> dict[str, torch.Tensor]:
    """Log-probs, RM scores, DPO log-ratios and greedy tokens of fixed inputs on `device`."""
    from tether.core.ops import sequence_logprobs
    from tether.models.reward_model import grouped_sequence_scores
    from tether.rollout.generation import encode_prompt, generate
    from tether.rollout.passes import build_batch, sequence_logprobs_of

    tokenizer, policy, reference, rm = parity_models(models)
    policy, reference, rm = policy.to(device), reference.to(device), rm.to(device)
    prompts = [encode_prompt(tokenizer, f"What colour is the {f}?") for f in FRUITS[:4]]
    answers = [tokenizer(f"It is {c}.")["input_ids"] for c in COLOURS[:4]]
    batch = build_batch(prompts, answers, tokenizer.pad_token_id)
    logprobs = sequence_logprobs_of(policy, batch, temperature=1.0)
    ref = sequence_logprobs_of(reference, batch, temperature=1.0)
    mask = batch.response_mask.to(logprobs.device)
    log_ratio = sequence_logprobs(logprobs, mask) - sequence_logprobs(ref, mask)
    groups = [[p + a] for p, a in zip(prompts, answers, strict=True)]
    scores = grouped_sequence_scores(rm, groups, tokenizer.pad_token_id)
    greedy = generate(
        policy, tokenizer, prompts, max_new_tokens=16, temperature=0.0, dtype=torch.float32
    )
    return {
        "logprobs": (logprobs * mask).cpu(),
        "rm_scores": scores.cpu(),
        "dpo_log_ratios": log_ratio.cpu(),
        "greedy": torch.tensor([r + [-1] * (17 - len(r)) for r in greedy.response_ids]),
    }


def check_parity(check: Check, models: dict[str, Path], device: str) -> None:
    def run() -> str:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        cpu, there = parity_outputs(models, "cpu"), parity_outputs(models, device)
        worst = {k: float((cpu[k] - there[k]).abs().max()) for k in cpu if k != "greedy"}
        far = {k: v for k, v in worst.items() if v > 1e-4}
        if far or not torch.equal(cpu["greedy"], there["greedy"]):
            raise RuntimeError(f"differences {worst}; greedy equal: {far == {}}")
        return (
            "max abs diff " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()) + "; greedy same"
        )

    check.run(f"parity cpu vs {device} (fp32, TF32 off)", run)


# --------------------------------------------------------------------------- driver


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--scale", choices=["full", "tiny"], default="full")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer files (--export-tokenizer)")
    parser.add_argument("--export-tokenizer", type=Path, metavar="DIR")
    parser.add_argument("--out", type=Path, default=Path("/tmp/tether-gpu-check"))
    args = parser.parse_args()
    if args.export_tokenizer:
        print(f"tokenizer written to {export_tokenizer(args.export_tokenizer)}")
        return 0
    if args.out.exists():
        shutil.rmtree(args.out)
    tokenizer = args.tokenizer or export_tokenizer(args.out / "tokenizer")
    big = args.scale == "full"
    models = {
        "llama": build_model(
            args.out / "llama", tokenizer, "llama", SMOLLM2_135M if big else TINY, 0
        ),
        "qwen2": build_model(
            args.out / "qwen2", tokenizer, "qwen2", QWEN25_05B if big else TINY, 0
        ),
        "tiny": build_model(args.out / "tiny", tokenizer, "llama", TINY, 1),
        "tiny-ref": build_model(args.out / "tiny-ref", tokenizer, "llama", TINY, 2),
    }
    data = write_data(args.out / "data")
    runs = args.out / "runs"
    check = Check()
    started = time.perf_counter()
    check_stages(check, models, data, args.device, runs)
    check_parity(check, models, args.device)
    check_resume(check, models, data, args.device, runs)
    check_torchrun(check, models, data, args.device, runs)
    device_name = torch.cuda.get_device_name(args.device) if args.device != "cpu" else "cpu"
    report = {
        "device": args.device,
        "device_name": device_name,
        "scale": args.scale,
        "torch": torch.__version__,
        "seconds": time.perf_counter() - started,
        "checks": check.results,
    }
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    print("\n| check | result | seconds | detail |\n|---|---|---|---|")
    for r in check.results:
        result = "ok" if r["ok"] else "FAIL"
        print(f"| {r['name']} | {result} | {r['seconds']:.0f} | {r['detail']} |")
    failed = [r["name"] for r in check.results if not r["ok"]]
    print(
        f"\n{len(check.results) - len(failed)} passed, {len(failed)} failed "
        f"on {device_name} in {report['seconds'] / 60:.1f} min; {args.out / 'gpu_check.json'}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
