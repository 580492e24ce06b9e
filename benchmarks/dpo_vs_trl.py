"""DPO on HH-RLHF: tether vs TRL's DPOTrainer, same data, model, length, batch, steps, β and
learning rate, in one run.

Both sides train on the same pairs, each seen once: the pairs whose chosen and rejected
sequences both fit in `--max-length` tokens (TRL's DPOTrainer drops the others and cycles
over the rest; tether would keep them, cut).

    .venv/bin/python benchmarks/dpo_vs_trl.py                 # the full benchmark (1600/200)
    .venv/bin/python benchmarks/dpo_vs_trl.py --train-pairs 16 --val-pairs 16   # smoke run

Each side trains in its own subprocess (so its peak RSS is its own); pairs/s counts training
time only (tether: the sum of `time/step_s`, after its one-off reference pass; TRL:
`train_runtime`). Both trained policies are then judged by the same tether code on the same
held-out pairs: the implicit-reward accuracy β·(log π − log ref) of chosen over rejected,
with the initial model as reference.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, ensure_trl_venv, keep_pairs_that_fit, split_hh, timed, trl_precision


def held_out_dpo_metrics(
    policy_dir: str, reference_dir: str, val: Path, max_length: int, beta: float
) -> dict[str, float]:
    """`eval/...` DPO metrics of a trained policy on the held-out pairs, tether's definitions."""
    import torch

    from tether.config import DataConfig, ModelConfig
    from tether.core.losses import dpo_loss
    from tether.data import load_preference_splits
    from tether.hardware import use_bf16
    from tether.models.loading import load_causal_lm, load_tokenizer
    from tether.stages.dpo import all_pair_logps, dpo_metrics, tokenize_preferences

    tokenizer = load_tokenizer(reference_dir)
    splits = load_preference_splits(DataConfig(train=str(val), eval_fraction=0.0), seed=0)
    pairs = tokenize_preferences(splits.pairs()[0], tokenizer, max_length, splits.report)
    bf16, pad = use_bf16("auto"), tokenizer.pad_token_id
    logps = {}
    for name, path in (("policy", policy_dir), ("reference", reference_dir)):
        model = load_causal_lm(ModelConfig(name=path), tokenizer)
        logps[name] = all_pair_logps(model, pairs, 16, pad, bf16, desc=name)
    pol, ref = logps["policy"], logps["reference"]
    losses, chosen, rejected = dpo_loss(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], beta)
    metrics = dpo_metrics(losses, chosen, rejected, pol, torch.ones(len(pairs)))
    return {"n": len(pairs), **metrics}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train-pairs", type=int, default=1600)
    parser.add_argument("--val-pairs", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--lr", type=float, default=5e-6)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--work", type=Path, default=ROOT / "runs/bench-dpo")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    train, val = split_hh(args.work, args.train_pairs, args.val_pairs)
    from tether.models.loading import resolve_model_source

    model_dir = resolve_model_source("smollm2-135m-instruct")
    steps, train = keep_pairs_that_fit(train, model_dir, args.max_length, args.batch_size)
    results = {}
    tether_out = args.work / "tether"
    subprocess.run(["rm", "-rf", str(tether_out)], check=True)
    sets = {
        "data.eval": val,
        "data.max_length": args.max_length,
        "train.batch_size": args.batch_size,
        "optim.lr": args.lr,
        "optim.schedule": "cosine",
        "dpo.beta": args.beta,
        "train.save_every": 0,
    }
    command = [str(ROOT / ".venv/bin/tether"), "dpo", "--model", model_dir, "--data", str(train)]
    command += ["--out", str(tether_out), "--max-steps", str(steps)]
    command += [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    wall, rss = timed(command)
    metrics = [json.loads(line) for line in (tether_out / "metrics.jsonl").open()]
    results["tether"] = {
        "wall_s": wall,
        "peak_rss_gib": rss,
        "train_s": sum(m.get("time/step_s", 0.0) for m in metrics),
        "final": str(tether_out / "final"),
    }

    trl_out = args.work / "trl"
    command = [str(ensure_trl_venv()), str(ROOT / "benchmarks/_trl_dpo.py"), "--model", model_dir]
    command += ["--train", str(train), "--out", str(trl_out), "--steps", str(steps)]
    command += ["--batch-size", str(args.batch_size), "--max-length", str(args.max_length)]
    command += ["--lr", str(args.lr), "--beta", str(args.beta), *trl_precision()]
    wall, rss = timed(command)
    trl_metrics = json.loads((trl_out / "train_metrics.json").read_text())
    results["trl"] = {
        "wall_s": wall,
        "peak_rss_gib": rss,
        "train_s": float(trl_metrics["train_runtime"]),
        "epochs": trl_metrics.get("epoch"),  # 1.0: TRL dropped none of the pairs
        "final": str(trl_out),
    }
    results["pairs"] = steps * args.batch_size
    for side in (results["tether"], results["trl"]):
        side["pairs_per_s"] = results["pairs"] / side["train_s"]
        side["val"] = held_out_dpo_metrics(
            side["final"], model_dir, val, args.max_length, args.beta
        )
    results["ratio_pairs_per_s"] = results["tether"]["pairs_per_s"] / results["trl"]["pairs_per_s"]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
