"""`tether demo`: the first thing a new user runs (`make demo`).

For now it shows the SFT stage on the embedded SmolLM2-135M-Instruct: a LoRA fine-tune that
teaches an answer format ("3 plus 4 is 7. Answer: 7"), with held-out loss and greedy answers
before and after. The full RLHF pipeline (reward model, PPO, gold judge, report) replaces it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tether.config import SFTConfig, load_config
from tether.rundir import read_metrics
from tether.stages.sft import run_sft

DEMO_MODEL = "smollm2-135m-instruct"


def arithmetic_records(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    pairs = [(a, b, op) for a in range(2, 13) for b in range(2, 13) for op in ("plus", "times")]
    rng.shuffle(pairs)
    records = []
    for a, b, op in pairs[:n]:
        result = a + b if op == "plus" else a * b
        records.append(
            {
                "prompt": f"What is {a} {op} {b}?",
                "completion": f"{a} {op} {b} is {result}. Answer: {result}",
            }
        )
    return records


def greedy_answers(model_dir: str, questions: list[str], max_new_tokens: int = 24) -> list[str]:
    from tether.config import ModelConfig
    from tether.models import load_causal_lm, load_tokenizer
    from tether.rollout import generate

    tokenizer = load_tokenizer(model_dir)
    model = load_causal_lm(ModelConfig(name=model_dir), tokenizer).eval()
    out = generate(model, tokenizer, questions, max_new_tokens=max_new_tokens, temperature=0)
    return [text.strip() for text in out.texts]


def run_demo(out: Path, steps: int = 30, resume: bool = False) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    records = arithmetic_records(200, seed=0)
    train, held_out = records[:180], records[180:]
    data = out / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in train))
    (out / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held_out))
    cfg = load_config(
        SFTConfig,
        None,
        [
            f"model.name={DEMO_MODEL}",
            f"data.train={data}",
            f"data.eval={out / 'eval.jsonl'}",
            "data.max_length=96",
            "model.lora.enabled=true",
            "optim.lr=1e-3",
            "optim.warmup_steps=3",
            f"train.max_steps={steps}",
            "train.batch_size=8",
            f"train.eval_every={max(1, steps // 3)}",
            f"train.save_every={max(1, steps // 3)}",
        ],
    )
    final = run_sft(cfg, out / "sft", resume=resume)
    evals = [r["eval/loss"] for r in read_metrics(out / "sft/metrics.jsonl") if "eval/loss" in r]
    questions = [r["prompt"] for r in held_out[:3]]
    from tether.models import resolve_model_source

    before = greedy_answers(resolve_model_source(DEMO_MODEL), questions)
    after = greedy_answers(str(final), questions)
    summary = {
        "eval_loss_before": evals[0],
        "eval_loss_after": evals[-1],
        "steps": steps,
        "examples": [
            {"question": q, "before": b, "after": a}
            for q, b, a in zip(questions, before, after, strict=True)
        ],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nheld-out loss: {evals[0]:.3f} -> {evals[-1]:.3f} nats/token after {steps} steps")
    for ex in summary["examples"]:
        print(f"  Q: {ex['question']}\n    before: {ex['before']!r}\n    after:  {ex['after']!r}")
    print(f"model: {final}\nsummary: {out / 'summary.json'}")
    return summary
