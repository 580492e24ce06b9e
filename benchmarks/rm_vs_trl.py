"""Reward-model training on HH-RLHF: tether vs TRL's RewardTrainer, same pairs, model, length,
batch and steps, in one run.

Both sides train on the same pairs, each seen once: the training split keeps only the pairs
whose chosen and rejected sequences both fit in `--max-length` tokens. Past that length the
two differ by design (TRL drops such a pair, tether keeps its end), so on the raw split TRL
would train on shorter sequences than tether and the pairs/s would not compare like for like.

    .venv/bin/python benchmarks/rm_vs_trl.py                 # the full benchmark (1600/200 split)
    .venv/bin/python benchmarks/rm_vs_trl.py --train-pairs 16 --val-pairs 16   # smoke run

TRL is installed into its own venv (benchmarks/.venv-trl) by this script. Each side runs in
a subprocess so its peak RSS is its own; both report validation accuracy computed by the same
tether code (`tether rm-eval`) on the same 200 held-out pairs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, ensure_trl_venv, keep_pairs_that_fit, split_hh, timed, trl_precision


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train-pairs", type=int, default=1600)
    parser.add_argument("--val-pairs", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--work", type=Path, default=ROOT / "runs/bench-rm")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    from tether.models.loading import resolve_model_source

    model_dir = resolve_model_source("smollm2-135m-instruct")
    train, val = split_hh(args.work, args.train_pairs, args.val_pairs)
    steps, train = keep_pairs_that_fit(train, model_dir, args.max_length, args.batch_size)

    results = {}
    tether_out = args.work / "tether"
    subprocess.run(["rm", "-rf", str(tether_out)], check=True)
    wall, rss = timed(
        [
            str(ROOT / ".venv/bin/tether"),
            "rm",
            "--model",
            model_dir,
            "--data",
            str(train),
            "--out",
            str(tether_out),
            "--max-steps",
            str(steps),
            "--set",
            f"data.eval={val}",
            "--set",
            f"data.max_length={args.max_length}",
            "--set",
            f"train.batch_size={args.batch_size}",
            "--set",
            f"optim.lr={args.lr}",
            "--set",
            "train.save_every=0",
        ]
    )
    results["tether"] = {"wall_s": wall, "peak_rss_gib": rss, "final": str(tether_out / "final")}

    trl_python = ensure_trl_venv()
    trl_out = args.work / "trl"
    wall, rss = timed(
        [
            str(trl_python),
            str(ROOT / "benchmarks/_trl_rm.py"),
            "--model",
            model_dir,
            "--train",
            str(train),
            "--out",
            str(trl_out),
            "--steps",
            str(steps),
            "--batch-size",
            str(args.batch_size),
            "--max-length",
            str(args.max_length),
            "--lr",
            str(args.lr),
            *trl_precision(),
        ]
    )
    results["trl"] = {"wall_s": wall, "peak_rss_gib": rss, "final": str(trl_out)}

    for side in results.values():
        proc = subprocess.run(
            [
                str(ROOT / ".venv/bin/tether"),
                "rm-eval",
                "--model",
                side["final"],
                "--data",
                str(val),
                "--json",
                "--max-length",
                str(args.max_length),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        side["val"] = json.loads(proc.stdout.strip().splitlines()[-1])
    # Training time only (no model load, evals or saves), the same span for both sides.
    tether_metrics = [json.loads(line) for line in (tether_out / "metrics.jsonl").open()]
    results["tether"]["train_s"] = sum(m.get("time/step_s", 0.0) for m in tether_metrics)
    trl_metrics = json.loads((trl_out / "train_metrics.json").read_text())
    results["trl"]["train_s"] = float(trl_metrics["train_runtime"])
    results["trl"]["epochs"] = trl_metrics.get("epoch")  # 1.0: TRL dropped none of the pairs
    results["pairs"] = pairs = steps * args.batch_size
    for side in ("tether", "trl"):
        results[side]["pairs_per_s"] = pairs / results[side]["train_s"]
    results["ratio_pairs_per_s"] = results["tether"]["pairs_per_s"] / results["trl"]["pairs_per_s"]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
