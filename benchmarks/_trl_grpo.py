"""TRL's GRPOTrainer or RLOOTrainer on tether's prompt file; run by grpo_vs_trl.py inside
benchmarks/.venv-trl."""

import argparse
import json
import sys
from pathlib import Path

from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _exclaim_reward import exclaim_trl

parser = argparse.ArgumentParser()
for flag in ("--model", "--prompts", "--out"):
    parser.add_argument(flag, required=True)
for flag in ("--steps", "--prompts-per-step", "--group-size", "--max-new-tokens"):
    parser.add_argument(flag, type=int, required=True)
parser.add_argument("--lr", type=float, required=True)
parser.add_argument("--beta", type=float, required=True)
parser.add_argument("--algo", choices=["grpo", "rloo"], default="grpo")
# --no-bf16 where the CPU has no native bf16 (common.trl_precision): tether runs float32 there
parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
args = parser.parse_args()
Config, Trainer = (GRPOConfig, GRPOTrainer) if args.algo == "grpo" else (RLOOConfig, RLOOTrainer)

rows = []
for line in open(args.prompts):
    prompt = json.loads(line)["prompt"]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    rows.append({"prompt": prompt})
tokenizer = AutoTokenizer.from_pretrained(args.model)
tokenizer.pad_token = "<|endoftext|>"
model = AutoModelForCausalLM.from_pretrained(args.model)
config = Config(
    output_dir=args.out,
    per_device_train_batch_size=args.prompts_per_step * args.group_size,  # completions
    num_generations=args.group_size,
    max_completion_length=args.max_new_tokens,
    max_steps=args.steps,
    learning_rate=args.lr,
    beta=args.beta,
    temperature=1.0,
    top_p=1.0,
    top_k=0,
    num_iterations=1,
    bf16=args.bf16,
    save_strategy="no",
    report_to="none",
    logging_steps=1,
    use_cpu=True,
)
trainer = Trainer(
    model=model,
    reward_funcs=exclaim_trl,
    args=config,
    train_dataset=Dataset.from_list(rows),
    processing_class=tokenizer,
)
result = trainer.train()
rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
with open(f"{args.out}/train_metrics.json", "w") as fh:
    json.dump({**result.metrics, "rewards": rewards}, fh)
