"""Gold against KL for PPO at several KL budgets and for best-of-n (Gao et al. 2022).

Reuses a finished demo's prompts, preferences and reward model (`--demo DIR`) and reruns
its PPO and held-out evaluation once per budget, each in DIR/frontier/budget-B (a `tether
demo --resume` of a copy with `kl_budget` set; a finished budget is read, not rerun). The
demo's own PPO run (a fixed β) is one more point. Best-of-n from π_ref with the same reward
model, n = 1 ... 16, gives the other curve, at the analytic KL log n − (n−1)/n.

Writes DIR/frontier/frontier.json, frontier.md (one table) and frontier.png (one plot), with
every budget run found in DIR/frontier so far.

    .venv/bin/python benchmarks/kl_frontier.py --demo runs/demo-X --budgets 1 2 4
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

from tether.tools.demo import DemoSettings, best_of_n_at_kl, budget_settings, saved_settings

# What a copy drops so that `--resume` reruns PPO and the evaluation on the same reward model.
RERUN = ("ppo", "eval", "report.html", "summary.json")


def budget_run(demo: Path, budget: float, kl_coef: float | None) -> dict:
    """The summary of the demo rerun with PPO stopped and landed at `budget` nats (at β =
    `kl_coef`, else the demo's), on `tether demo --kl-budget`'s PPO settings."""
    beta = "" if kl_coef is None else f"-beta-{kl_coef:g}"
    out = demo / "frontier" / f"budget-{budget:g}{beta}"
    if not (out / "summary.json").is_file():
        if not (out / "settings.json").is_file():  # a fresh copy (else: resume the copy)
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(demo, out, ignore=shutil.ignore_patterns("frontier", *RERUN))
            base = saved_settings(json.loads((out / "settings.json").read_text()))
            ran = replace(
                base,
                kl_budget=budget,
                kl_budget_control=DemoSettings.kl_budget_control,  # a new run: today's
                kl_coef=base.kl_coef if kl_coef is None else kl_coef,
            )
            (out / "settings.json").write_text(json.dumps(asdict(budget_settings(ran))))
            stages = json.loads((out / "stages.json").read_text())
            for stage in ("ppo", "evaluation", "report"):
                stages.pop(stage, None)
            (out / "stages.json").write_text(json.dumps(stages, indent=2))
        command = [sys.executable, "-m", "tether", "demo", "--out", str(out), "--resume"]
        subprocess.run(command, check=True, env=os.environ)
    return json.loads((out / "summary.json").read_text())


def point(name: str, summary: dict) -> dict:
    return {
        "run": name,
        "kl": summary["kl"],
        "gold": summary["gold_policy"],
        "win_rate": summary["win_rate"],
        "rm_score": summary["rm_score_policy"],
    }


def write_table(points: list[dict], best_of_n: list[dict], path: Path, gold_ref: float) -> None:
    lines = [
        f"Held-out gold of π_ref: {gold_ref:.3f}.",
        "",
        "| PPO run | KL (nats) | gold | win-rate | RM score | best-of-n at that KL: gold, RM |",
        "|---|---|---|---|---|---|",
    ]
    for p in points:
        gold, rm = p["best_of_n_gold_at_kl"], p["best_of_n_rm_at_kl"]
        lines.append(
            f"| {p['run']} | {p['kl']:.2f} | {p['gold']:.3f} | {p['win_rate']:.0%} | "
            f"{p['rm_score']:+.2f} | "
            + ("past n = 16" if gold is None else f"{gold:.3f}, {rm:+.2f}")
            + " |"
        )
    lines += ["", "| best-of-n | KL (nats) | gold | RM score |", "|---|---|---|---|"]
    lines += [
        f"| n = {b['n']} | {b['kl']:.2f} | {b['gold']:.3f} | {b['rm_score']:+.2f} |"
        for b in best_of_n
    ]
    path.write_text("\n".join(lines) + "\n")


def plot(points: list[dict], best_of_n: list[dict], path: Path, gold_ref: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(
        [b["kl"] ** 0.5 for b in best_of_n], [b["gold"] for b in best_of_n], "o-",
        label="best-of-n from π_ref (n = 1 … 16)",
    )  # fmt: skip
    for p in points:
        ax.plot([p["kl"] ** 0.5], [p["gold"]], "s", label=f"PPO, {p['run']}")
    ax.axhline(gold_ref, color="grey", lw=0.8, ls=":", label="π_ref")
    ax.set_xlabel("√KL(π ‖ π_ref)  (√nats)")
    ax.set_ylabel("held-out gold score")
    ax.set_title("Gold against KL: PPO at KL budgets and best-of-n")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", type=Path, required=True, help="a finished `tether demo` dir")
    parser.add_argument("--budgets", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    parser.add_argument("--kl-coef", type=float, help="β of the budget runs (default: the demo's)")
    args = parser.parse_args()
    base = json.loads((args.demo / "summary.json").read_text())
    settings = json.loads((args.demo / "settings.json").read_text())
    for budget in args.budgets:
        budget_run(args.demo, budget, args.kl_coef)
    points = [point(f"β = {settings['kl_coef']:g} fixed (the demo)", base)]
    for run in sorted((args.demo / "frontier").glob("budget-*/summary.json")):  # all so far
        ran = json.loads((run.parent / "settings.json").read_text())
        name = f"budget {ran['kl_budget']:g} nats, β {ran['kl_coef']:g}"
        points.append(point(name, json.loads(run.read_text())))
    best_of_n = base["best_of_n"]
    for p in points:  # every run on the base demo's best-of-n curve (same RM, same prompts)
        p["best_of_n_gold_at_kl"], p["best_of_n_rm_at_kl"] = best_of_n_at_kl(best_of_n, p["kl"])
    out = args.demo / "frontier"
    out.mkdir(exist_ok=True)
    (out / "frontier.json").write_text(
        json.dumps({"ppo": points, "best_of_n": best_of_n}, indent=2) + "\n"
    )
    write_table(points, best_of_n, out / "frontier.md", base["gold_ref"])
    plot(points, best_of_n, out / "frontier.png", base["gold_ref"])
    print((out / "frontier.md").read_text())


if __name__ == "__main__":
    main()
