"""The demo's PPO stage, one critic change at a time: does the value function learn?

Reuses a finished demo run's prompts and reward model (`--demo DIR`, from `tether demo`) and
reruns only its PPO stage under each variant's overrides, in DIR/ablation/VARIANT. Reports
per variant the critic's explained variance (mean over the second half of the steps), the
final KL, the gold and reward-model scores of the last steps' rollouts, and the wall time.

    .venv/bin/python benchmarks/critic_ablation.py --demo runs/demo-X [--variants a b ...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tether.config import config_yaml, load_config
from tether.tools.demo import DemoSettings, load_settings, ppo_config
from tether.tools.tasks import get_task


def variants(demo: Path) -> dict[str, list[str]]:
    """One change at a time against the zero-initialised head learning from its loss alone
    at the policy's learning rate (`head-zero`)."""
    rm = f"critic.init={demo / 'rm/final'}"
    gradient = "critic.fit=gradient"
    return {
        "as-configured": [],
        "head-zero": [gradient, "critic.init=", "critic.lr=0"],
        "init-from-rm": [gradient, rm, "critic.lr=0"],
        "critic-lr-10x": [gradient, "critic.init=", "critic.lr=3e-3"],
        "critic-lr-30x": [gradient, "critic.init=", "critic.lr=1e-2"],
        "critic-lr-10x+reward-normalize": [
            gradient,
            "critic.init=",
            "critic.lr=3e-3",
            "reward.normalize=true",
        ],
        "separate-from-rm": [gradient, "critic.kind=separate", rm, "critic.lr=0"],
        "least-squares-decay-0.5-ridge-1e-3": [
            "critic.fit=least_squares", "critic.fit_decay=0.5", "critic.fit_ridge=1e-3",
        ],
        "least-squares-decay-0.8": ["critic.fit=least_squares", "critic.fit_decay=0.8"],
        "least-squares-decay-0.95": ["critic.fit=least_squares", "critic.fit_decay=0.95"],
        "separate-from-rm+least-squares": [
            "critic.fit=least_squares", "critic.fit_decay=0.8", "critic.kind=separate", rm,
        ],
    }  # fmt: skip


def summarise(run_dir: Path, seconds: float) -> dict[str, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    half = records[len(records) // 2 :]
    last = records[-3:]

    def avg(rows: list[dict], key: str) -> float | None:
        values = [r[key] for r in rows if key in r]
        return sum(values) / len(values) if values else None

    return {
        "explained_var_2nd_half": avg(half, "value/explained_var"),
        "kl_last3": avg(last, "kl/mean"),
        "gold_first": records[0].get("gold/mean"),
        "gold_last3": avg(last, "gold/mean"),
        "score_last3": avg(last, "reward/score_mean"),
        "minutes": seconds / 60,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", type=Path, required=True, help="a finished `tether demo` dir")
    parser.add_argument("--variants", nargs="*", help="names from the table (default: all)")
    args = parser.parse_args()
    from tether.stages.ppo import run_ppo

    settings = load_settings(args.demo, DemoSettings(), resume=True)
    task = get_task(settings.task)
    table = variants(args.demo)
    results = {}
    for name in args.variants or list(table):
        base = ppo_config(task, settings, args.demo)
        config_file = args.demo / "ablation" / f"{name}.yaml"
        config_file.parent.mkdir(parents=True, exist_ok=True)
        config_file.write_text(config_yaml(base))
        cfg = load_config(type(base), config_file, table[name])
        out = args.demo / "ablation" / name
        started = time.perf_counter()
        run_ppo(cfg, out, resume=(out / "checkpoints").is_dir())
        results[name] = summarise(out, time.perf_counter() - started)
        print(name, json.dumps(results[name]), flush=True)
    (args.demo / "ablation" / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print("\n| variant | explained var, 2nd half | KL, last 3 | gold first -> last 3 ", end="")
    print("| RM score, last 3 | min |\n|---|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['explained_var_2nd_half']:.3f} | {r['kl_last3']:.2f} | "
            f"{r['gold_first']:.3f} -> {r['gold_last3']:.3f} | {r['score_last3']:.3f} | "
            f"{r['minutes']:.1f} |"
        )


if __name__ == "__main__":
    main()
