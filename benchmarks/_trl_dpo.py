"""TRL's DPOTrainer on tether's JSONL split; run by dpo_vs_trl.py inside benchmarks/.venv-trl.

TRL's own defaults are kept except what both sides must share (data, model, length, batch,
steps, learning rate and schedule, β, bf16): it keeps a reference model in memory and runs
it every step, with gradient checkpointing on.
"""

import argparse
import json

from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

parser = argparse.ArgumentParser()
for flag in ("--model", "--train", "--out"):
    parser.add_argument(flag, required=True)
parser.add_argument("--steps", type=int, required=True)
parser.add_argument("--batch-size", type=int, required=True)
parser.add_argument("--max-length", type=int, required=True)
parser.add_argument("--lr", type=float, required=True)
parser.add_argument("--beta", type=float, required=True)
# --no-bf16 where the CPU has no native bf16 (common.trl_precision): tether runs float32 there
parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
args = parser.parse_args()

records = [json.loads(line) for line in open(args.train)]
rows = [
    {
        "prompt": r["prompt"],
        "chosen": [{"role": "assistant", "content": r["chosen"]}],
        "rejected": [{"role": "assistant", "content": r["rejected"]}],
    }
    for r in records
]
tokenizer = AutoTokenizer.from_pretrained(args.model)
tokenizer.pad_token = "<|endoftext|>"  # as tether does: a pad distinct from EOS
model = AutoModelForCausalLM.from_pretrained(args.model)
config = DPOConfig(
    output_dir=args.out,
    per_device_train_batch_size=args.batch_size,
    max_steps=args.steps,
    learning_rate=args.lr,
    lr_scheduler_type="cosine",
    max_length=args.max_length,
    beta=args.beta,
    bf16=args.bf16,
    save_strategy="no",
    report_to="none",
    logging_steps=10,
    use_cpu=True,
)
trainer = DPOTrainer(
    model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
)
result = trainer.train()
with open(f"{args.out}/train_metrics.json", "w") as fh:
    json.dump(result.metrics, fh)
trainer.save_model(args.out)
tokenizer.save_pretrained(args.out)
