"""`tether report RUN_DIR`: one self-contained HTML page for a run, plots embedded as PNG.

A demo run (summary.json beside rm/ and ppo/) gets the RLHF story: headline numbers, the
reward model's and the gold judge's scores per PPO step, KL with β, gold against √KL for
PPO and for best-of-n (the overoptimisation picture of Gao et al. 2022), response length,
and the same held-out prompts answered by π_ref and by the policy. Any other run dir of any
stage gets its metrics plotted by group, the doctor's findings, and its latest samples.
No network: the page embeds everything it shows.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

from tether.errors import TetherError
from tether.runs.rundir import read_jsonl, write_text_atomic

POLICY_COLOR, REFERENCE_COLOR, BEST_OF_COLOR, GOLD_COLOR = (
    "#c2410c",
    "#475569",
    "#2563eb",
    "#0f766e",
)

CSS = """
body { font: 15px/1.45 system-ui, -apple-system, Segoe UI, sans-serif; margin: 2rem auto;
       max-width: 1100px; padding: 0 1rem; color: #1e293b; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; } h2 { margin-top: 2.2rem; font-size: 1.2rem; }
.sub { color: #64748b; margin-top: 0; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(190px, 1fr));
         gap: .8rem; margin: 1.2rem 0; }
.card { border: 1px solid #e2e8f0; border-radius: 10px; padding: .7rem .9rem; background: #f8fafc; }
.card .label { color: #64748b; font-size: .85rem; }
.card .value { font-size: 1.5rem; font-weight: 600; }
.card .note { color: #64748b; font-size: .82rem; }
.verdict { background: #fff7ed; border-left: 4px solid #c2410c; padding: .6rem .9rem; }
.plots { display: grid; grid-template-columns: repeat(auto-fit, minmax(480px, 1fr)); gap: 1rem; }
.small-plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(250px, 1fr));
               gap: .6rem; }
.small-plots img { width: 100%; height: auto; }
figure { margin: 0; } figure img { width: 100%; height: auto; }
figcaption { color: #475569; font-size: .85rem; }
table { border-collapse: collapse; width: 100%; font-size: .88rem; }
th, td { border-bottom: 1px solid #e2e8f0; padding: .45rem; vertical-align: top; text-align: left; }
th { background: #f1f5f9; }
td.num { white-space: nowrap; font-variant-numeric: tabular-nums; }
.finding { border-left: 4px solid #94a3b8; padding: .3rem .8rem; margin: .6rem 0; }
.finding.warning { border-color: #d97706; } .finding.critical { border-color: #dc2626; }
.cut { color: #94a3b8; }
code { background: #f1f5f9; padding: 0 .25rem; border-radius: 4px; }
"""


def build_report(run_dir: str | Path) -> Path:
    """Write RUN_DIR/report.html for a demo run or any stage's run dir; return its path."""
    run_dir = Path(run_dir)
    if (run_dir / "summary.json").is_file() and (run_dir / "ppo").is_dir():
        page = demo_page(run_dir)
    elif (run_dir / "metrics.jsonl").is_file():
        page = stage_page(run_dir)
    else:
        raise TetherError(
            f"{run_dir}: not a run dir (no metrics.jsonl) and not a demo run (no summary.json)"
        )
    path = run_dir / "report.html"
    write_text_atomic(path, page)
    return path


# --------------------------------------------------------------------------- plotting


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "figure.dpi": 110,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.grid": True,
            "grid.alpha": 0.25,
            "font.size": 9.5,
        }
    )
    return plt


def _embed(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    _pyplot().close(fig)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="plot" src="data:image/png;base64,{data}">'


def _figure(img: str, caption: str) -> str:
    return f"<figure>{img}<figcaption>{caption}</figcaption></figure>"


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """The finite logged (step, value) pairs of `key`, read as the doctor reads them."""
    from tether.tools.doctor import Run

    return Run(records).series(key)


def _esc(text: Any) -> str:
    return html.escape(str(text))


def _page(title: str, body: str) -> str:
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_esc(title)}</title><style>{CSS}</style></head><body>{body}</body></html>\n"
    )


def _card(label: str, value: str, note: str = "") -> str:
    note_html = f'<div class="note">{note}</div>' if note else ""
    return (
        f'<div class="card"><div class="label">{label}</div>'
        f'<div class="value">{value}</div>{note_html}</div>'
    )


# --------------------------------------------------------------------------- demo


def demo_page(run_dir: Path) -> str:
    from tether.tools.tasks import TASKS

    summary = json.loads((run_dir / "summary.json").read_text())
    ppo = read_jsonl(run_dir / "ppo/metrics.jsonl")
    rm = read_jsonl(run_dir / "rm/metrics.jsonl")
    evaluated = [json.loads(x) for x in (run_dir / "eval/samples.jsonl").read_text().splitlines()]
    task = TASKS.get(summary["task"])
    description = task.description if task else summary["task"]
    settings = summary.get("settings", {})

    gain = summary["gold_policy"] - summary["gold_ref"]
    best = max(summary["best_of_n"], key=lambda b: b["n"])
    verdict = (
        f"PPO moved the held-out gold score from <b>{summary['gold_ref']:.3f}</b> (π_ref) to "
        f"<b>{summary['gold_policy']:.3f}</b> ({gain:+.3f}) at a KL of "
        f"<b>{summary['kl']:.2f} nats</b> from π_ref; its answers beat π_ref's on gold "
        f"<b>{summary['win_rate']:.0%}</b> of the time. Best-of-{best['n']} sampling from π_ref "
        f"with the same reward model reaches {best['gold']:.3f} at {best['kl']:.2f} nats."
    )
    cards = "".join(
        [
            _card(
                "Gold, held-out",
                f"{summary['gold_ref']:.3f} → {summary['gold_policy']:.3f}",
                "π_ref → policy; the judge PPO never saw",
            ),
            _card("Win-rate", f"{summary['win_rate']:.0%}", "policy over π_ref, by gold"),
            _card("KL(π ‖ π_ref)", f"{summary['kl']:.2f} nats", "per answer, held-out"),
            _card(
                "RM score",
                f"{summary['rm_score_ref']:+.2f} → {summary['rm_score_policy']:+.2f}",
                "π_ref → policy (normalised: π_ref ≈ 0)",
            ),
            _card(
                "RM accuracy",
                f"{summary['rm_accuracy']:.3f}",
                "held-out pairs vs the annotator"
                + (
                    f"; {summary['rm_gold_accuracy']:.0%} vs gold"
                    if summary.get("rm_gold_accuracy") is not None
                    else ""
                ),
            ),
            _card(
                "Answer length",
                f"{summary['length_ref']:.0f} → {summary['length_policy']:.0f} words",
                "π_ref → policy",
            ),
            _card("Wall time", f"{summary['wall_s'] / 60:.1f} min", "all stages, this machine"),
        ]
    )
    figures = [
        _figure(
            _plot_scores(ppo),
            "Per PPO step, on that step's training samples: the reward model's score (what PPO "
            "optimises) and the gold judge's (what we actually want). Gold rising with the RM "
            "score means the RM's preferences transfer; RM up while gold stalls is reward hacking.",
        ),
        _figure(
            _plot_kl(ppo),
            "KL(π ‖ π_ref) of the sampled answers in nats (sum over tokens, k1 estimate), and the "
            "penalty coefficient β that prices it in the reward.",
        ),
        _figure(
            _plot_overoptimisation(ppo, summary),
            "Gold score against √KL (Gao et al. 2022). PPO: each training step, and the final "
            "policy on held-out prompts. Best-of-n: pick the RM's favourite of n π_ref answers; "
            "its KL is the analytic log n − (n−1)/n. Higher at the same KL is better.",
        ),
        _figure(
            _plot_length(ppo),
            "Mean answer length per PPO step (tokens), and the share of answers that ended "
            "before the token limit.",
        ),
    ]
    if rm:
        figures.append(
            _figure(
                _plot_rm(rm),
                "Reward-model training: the pairwise loss −log σ(r_w − r_l) per step and its "
                "accuracy, and held-out accuracy against the annotator's choices.",
            )
        )
    rows = []
    for record in evaluated[:12]:
        ref, pol = record["reference"][0], record["policy"][0]
        rows.append(
            f"<tr><td>{_esc(record['prompt'])}</td>"
            f"<td>{_answer(ref)}</td><td class='num'>{ref['gold']:+.2f}<br>"
            f"{ref['rm_score']:+.2f}</td>"
            f"<td>{_answer(pol)}</td><td class='num'>{pol['gold']:+.2f}<br>"
            f"{pol['rm_score']:+.2f}</td></tr>"
        )
    table = (
        "<table><tr><th>Held-out prompt</th><th>π_ref (before)</th><th>gold<br>RM</th>"
        "<th>policy (after PPO)</th><th>gold<br>RM</th></tr>" + "".join(rows) + "</table>"
    )
    bon_rows = "".join(
        f"<tr><td class='num'>{b['n']}</td><td class='num'>{b['kl']:.3f}</td>"
        f"<td class='num'>{b['gold']:.3f}</td><td class='num'>{b['rm_score']:+.3f}</td></tr>"
        for b in summary["best_of_n"]
    )
    equal_kl = _equal_kl_html(summary) + _landing_html(run_dir / "ppo")
    bon_table = (
        "<table><tr><th>n</th><th>KL (nats)</th><th>gold</th><th>RM score</th></tr>"
        f"{bon_rows}<tr><td>PPO policy</td><td class='num'>{summary['kl']:.3f}</td>"
        f"<td class='num'>{summary['gold_policy']:.3f}</td>"
        f"<td class='num'>{summary['rm_score_policy']:+.3f}</td></tr></table>" + equal_kl
    )
    stage_rows = (
        "".join(
            f"<tr><td>{_esc(k)}</td><td class='num'>{v:.0f} s</td></tr>"
            for k, v in summary.get("stage_s", {}).items()
        )
        + f"<tr><th>total</th><th>{summary['wall_s']:.0f} s</th></tr>"
    )
    from tether.tools.doctor import diagnose, read_run

    findings = diagnose(read_run(run_dir / "ppo"))
    doctor = _findings_html(findings) or (
        "<p>The doctor found nothing to flag in the PPO run "
        f"(<code>tether doctor {_esc(run_dir / 'ppo')}</code>).</p>"
    )
    settings_rows = "".join(
        f"<tr><td><code>{_esc(k)}</code></td><td>{_esc(v)}</td></tr>" for k, v in settings.items()
    )
    body = (
        f"<h1>tether demo: {_esc(summary['task'])}</h1>"
        f'<p class="sub">{_esc(description)} · policy and reward model: LoRA on '
        f"{_esc(summary['model'])} · run dir <code>{_esc(run_dir)}</code></p>"
        f'<p class="verdict">{verdict}</p><div class="cards">{cards}</div>'
        f'<h2>Training</h2><div class="plots">{"".join(figures)}</div>'
        "<h2>Best-of-n against PPO (held-out prompts)</h2>"
        "<p>Best-of-n is the baseline every RLHF method must beat: no training at all, only "
        f"n samples and the reward model.</p>{bon_table}{_frontier_html(run_dir)}"
        "<h2>Same prompts, before and after</h2><p>Held-out prompts, one sampled answer each "
        "from π_ref and from the trained policy; gold and reward-model scores beside them.</p>"
        f"{table}"
        f"<h2>Doctor</h2>{doctor}"
        f"<h2>Run</h2><table>{stage_rows}</table><h2>Settings</h2><table>{settings_rows}</table>"
        "<p>Rebuild this page with <code>tether report RUN_DIR</code>; the numbers are in "
        "<code>summary.json</code>, every answer in <code>eval/samples.jsonl</code>.</p>"
    )
    return _page(f"tether demo: {summary['task']}", body)


def _equal_kl_html(summary: dict) -> str:
    """PPO against best-of-n at the policy's KL, by gold and by the reward model's score: the
    RM score tells an optimisation shortfall (PPO found less reward for its KL) from
    over-optimisation (as much reward, less gold)."""
    at_kl = summary.get("best_of_n_gold_at_policy_kl")
    if at_kl is None:
        return (
            "<p>The policy's KL is past the largest best-of-n measured: no comparison at "
            "equal KL.</p>"
        )
    text = (
        f"<p>At the policy's KL best-of-n reaches gold <b>{at_kl:.3f}</b>, against PPO's "
        f"<b>{summary['gold_policy']:.3f}</b>"
    )
    rm_at_kl = summary.get("best_of_n_rm_at_policy_kl")  # absent from older demos
    if rm_at_kl is None:
        return text + ".</p>"
    text += (
        f", and RM score <b>{rm_at_kl:+.2f}</b> against PPO's "
        f"<b>{summary['rm_score_policy']:+.2f}</b>."
    )
    if summary["gold_policy"] < at_kl:
        text += (
            " PPO found less reward-model score for its KL than best-of-n: it falls short in"
            " optimisation (more data per step, more steps), not by gaming the reward model."
            if summary["rm_score_policy"] < rm_at_kl
            else " PPO found as much reward-model score for its KL but less gold: the reward"
            " model is being gamed (over-optimisation)."
        )
    return text + "</p>"


def _landing_html(ppo_dir: Path) -> str:
    """A budget run's landing (tether.rollout.landing), where its update was scaled."""
    from tether.stages.ppo import LANDING_FILE

    path = ppo_dir / LANDING_FILE
    if not path.is_file():
        return ""
    landing = json.loads(path.read_text())
    if landing["scale"] >= 1:
        return (
            f"<p>The trained policy's KL on training prompts, {landing['kl_trained']:.2f} nats, "
            f"was within the budget of {landing['budget']:g}: kept as trained.</p>"
        )
    return (
        f"<p>The trained policy's KL on training prompts, {landing['kl_trained']:.2f} nats, "
        f"was over the budget of {landing['budget']:g}: its update was scaled by "
        f"{landing['scale']:.2f} towards π_ref, to {landing['kl_landed']:.2f} nats "
        "(<code>ppo.kl.budget_landing</code>).</p>"
    )


def _frontier_html(run_dir: Path) -> str:
    """PPO at several KL budgets against best-of-n (the Gao et al. frontier), where
    benchmarks/kl_frontier.py has run on this demo (RUN_DIR/frontier/)."""
    path = run_dir / "frontier" / "frontier.json"
    if not path.is_file():
        return ""
    runs = json.loads(path.read_text())["ppo"]
    rows = "".join(
        f"<tr><td>{_esc(r['run'])}</td><td class='num'>{r['kl']:.2f}</td>"
        f"<td class='num'>{r['gold']:.3f}</td><td class='num'>{r['win_rate']:.0%}</td>"
        "<td class='num'>"
        + (
            "past n = 16"
            if r["best_of_n_gold_at_kl"] is None
            else f"{r['best_of_n_gold_at_kl']:.3f}"
        )
        + "</td></tr>"
        for r in runs
    )
    picture = base64.b64encode((path.parent / "frontier.png").read_bytes()).decode("ascii")
    return (
        "<h3>PPO at KL budgets against best-of-n</h3><table><tr><th>PPO run</th>"
        "<th>KL (nats)</th><th>gold</th><th>win-rate</th><th>best-of-n gold at that KL</th>"
        f"</tr>{rows}</table>"
        f'<img alt="gold against KL" src="data:image/png;base64,{picture}">'
    )


def _answer(sample: dict) -> str:
    """The answer's text; one cut at the token limit ends in a marked ellipsis."""
    text = _esc(sample["response"])
    if sample.get("ended") is False:
        text += ' <span class="cut" title="cut at the token limit">[…]</span>'
    return text


def _twin(ax, color: str, label: str):
    """A right-hand y axis in `color`, with no grid of its own."""
    twin = ax.twinx()
    twin.set_ylabel(label, color=color)
    twin.grid(False)
    twin.spines["right"].set_visible(True)
    return twin


def _legend(ax, twin, loc: str, fontsize: float | None = None) -> None:
    """One legend for both axes of a twin plot."""
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc=loc, frameon=False, fontsize=fontsize)


def _plot_scores(ppo: list[dict]) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 3.3))
    steps, rm = _series(ppo, "reward/score_mean")
    ax.plot(steps, rm, color=POLICY_COLOR, marker="o", ms=3, label="reward-model score")
    ax.set_xlabel("PPO step")
    ax.set_ylabel("RM score (normalised)", color=POLICY_COLOR)
    gold_steps, gold = _series(ppo, "gold/mean")
    if gold:
        twin = _twin(ax, GOLD_COLOR, "gold score")
        twin.plot(gold_steps, gold, color=GOLD_COLOR, marker="s", ms=3, label="gold score")
        _legend(ax, twin, "lower right")
    ax.set_title("Reward-model score and gold score per step")
    return _embed(fig)


def _plot_kl(ppo: list[dict]) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 3.3))
    steps, kl = _series(ppo, "kl/mean")
    ax.plot(steps, kl, color=POLICY_COLOR, marker="o", ms=3, label="KL (nats)")
    ax.set_xlabel("PPO step")
    ax.set_ylabel("KL(π ‖ π_ref), nats", color=POLICY_COLOR)
    beta_steps, beta = _series(ppo, "kl/coef")
    if beta:
        twin = _twin(ax, REFERENCE_COLOR, "β (KL coefficient)")
        twin.plot(beta_steps, beta, color=REFERENCE_COLOR, ls="--", label="β")
        twin.set_ylim(0, max(beta) * 1.3)
        _legend(ax, twin, "upper left")
    ax.set_title("KL to the reference policy, with β")
    return _embed(fig)


def _plot_overoptimisation(ppo: list[dict], summary: dict) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 3.3))
    kl_by_step = dict(zip(*_series(ppo, "kl/mean"), strict=True))
    gold_by_step = dict(zip(*_series(ppo, "gold/mean"), strict=True))
    steps = sorted(kl_by_step.keys() & gold_by_step.keys())
    if steps:
        x = [math.sqrt(max(kl_by_step[s], 0.0)) for s in steps]
        points = ax.scatter(
            x, [gold_by_step[s] for s in steps], c=steps, cmap="Oranges", s=18, vmin=-len(steps) / 3
        )
        points.set_label("PPO, training steps (darker = later)")
    bon = summary["best_of_n"]
    ax.plot(
        [math.sqrt(b["kl"]) for b in bon],
        [b["gold"] for b in bon],
        color=BEST_OF_COLOR,
        marker="D",
        ms=4,
        label="best-of-n from π_ref (held-out)",
    )
    for b in bon:
        ax.annotate(
            f"n={b['n']}",
            (math.sqrt(b["kl"]), b["gold"]),
            textcoords="offset points",
            xytext=(3, -11),
            fontsize=8,
            color=BEST_OF_COLOR,
        )
    ax.scatter(
        [math.sqrt(max(summary["kl"], 0.0))],
        [summary["gold_policy"]],
        marker="*",
        s=170,
        color=POLICY_COLOR,
        edgecolor="black",
        zorder=5,
        label="PPO policy (held-out)",
    )
    ax.axhline(summary["gold_ref"], color=REFERENCE_COLOR, ls=":", lw=1, label="π_ref (held-out)")
    ax.set_xlabel("√KL(π ‖ π_ref)  (√nats)")
    ax.set_ylabel("gold score")
    ax.set_title("Gold score against distance from π_ref")
    ax.legend(frameon=False, fontsize=8, loc="best")
    return _embed(fig)


def _plot_length(ppo: list[dict]) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 3.3))
    steps, length = _series(ppo, "response/length_mean")
    ax.plot(steps, length, color=POLICY_COLOR, marker="o", ms=3, label="mean length (tokens)")
    ax.set_xlabel("PPO step")
    ax.set_ylabel("tokens per answer", color=POLICY_COLOR)
    ax.set_ylim(bottom=0)
    eos_steps, eos = _series(ppo, "response/eos_frac")
    if eos:
        twin = _twin(ax, REFERENCE_COLOR, "share ended")
        twin.plot(eos_steps, eos, color=REFERENCE_COLOR, ls="--", label="ended before the limit")
        twin.set_ylim(0, 1.05)
        _legend(ax, twin, "lower left")
    ax.set_title("Answer length per step")
    return _embed(fig)


def _smooth(values: list[float], window: int = 5) -> list[float]:
    """Trailing moving average: per-step RM loss on 8 rankings is too noisy to read."""
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1) : i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def _plot_rm(rm: list[dict]) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 3.3))
    steps, loss = _series(rm, "train/loss")
    ax.plot(steps, loss, color=REFERENCE_COLOR, lw=0.8, alpha=0.35)
    ax.plot(steps, _smooth(loss), color=REFERENCE_COLOR, lw=1.6, label="training loss (smoothed)")
    ax.set_xlabel("reward-model step")
    ax.set_ylabel("loss")
    twin = _twin(ax, "black", "accuracy")
    acc_steps, acc = _series(rm, "train/accuracy")
    twin.plot(
        acc_steps, _smooth(acc), color=BEST_OF_COLOR, lw=1.4, label="training accuracy (smoothed)"
    )
    eval_steps, eval_acc = _series(rm, "eval/accuracy")
    twin.plot(
        eval_steps,
        eval_acc,
        color=POLICY_COLOR,
        marker="*",
        ms=10,
        ls="none",
        label="held-out accuracy (before, after)",
    )
    twin.set_ylim(0, 1.05)
    _legend(ax, twin, "lower left", fontsize=8)
    ax.set_title("Reward-model training")
    return _embed(fig)


# --------------------------------------------------------------------------- any stage

GROUP_ORDER = ("train", "eval", "reward", "gold", "kl", "policy", "value", "response", "rewards")
SKIPPED_PREFIXES = ("time", "guard", "throughput", "tokens")


def stage_page(run_dir: Path) -> str:
    """One small plot per logged metric, the doctor's findings, the latest samples."""
    from tether.tools.doctor import diagnose, read_run

    run = read_run(run_dir)
    records = run.metrics
    keys = sorted({k for r in records for k, v in r.items() if k != "step" and _number(v)})
    shown = [k for k in keys if _worth_plotting(records, k)]
    shown.sort(key=lambda k: (_group_rank(k), k))
    figures = [_plot_metric(records, key) for key in shown]
    findings = diagnose(run) if any(k.startswith(("reward/", "kl/")) for k in keys) else []
    findings_html = _findings_html(findings) or (
        "<p>The doctor found nothing to flag.</p>" if findings == [] and run.samples else ""
    )
    last = records[-1] if records else {}
    cards = "".join(
        _card(k, f"{last[k]:.4g}")
        for k in ("train/loss", "eval/loss", "eval/accuracy", "reward/score_mean", "kl/mean")
        if _number(last.get(k))
    )
    samples_html = ""
    if run.samples:
        step = max(s["step"] for s in run.samples)
        latest = [s for s in run.samples if s["step"] == step][:10]
        columns = [c for c in ("score", "gold", "kl") if c in latest[0]]
        header = "".join(f"<th>{c}</th>" for c in columns)
        rows = "".join(
            f"<tr><td>{_esc(s.get('prompt', ''))}</td><td>{_esc(s.get('response', ''))}</td>"
            + "".join(f"<td class='num'>{s[c]:+.3f}</td>" for c in columns)
            + "</tr>"
            for s in latest
        )
        samples_html = (
            f"<h2>Samples at step {step}</h2><table><tr><th>prompt</th><th>response</th>"
            f"{header}</tr>{rows}</table>"
        )
    body = (
        f"<h1>{_esc(run_dir.name)}</h1><p class='sub'>run dir <code>{_esc(run_dir)}</code> · "
        f"{run.last_step} steps logged</p><div class='cards'>{cards}</div>"
        f"{'<h2>Doctor</h2>' + findings_html if findings_html else ''}"
        f"<h2>Metrics</h2><p>One panel per logged metric; long runs show the raw values faintly "
        f"and a 5-step moving average.</p><div class='small-plots'>{''.join(figures)}</div>"
        f"{samples_html}"
    )
    return _page(f"tether report: {run_dir.name}", body)


def _findings_html(findings: list) -> str:
    return "".join(
        f'<div class="finding {f.severity}"><b>{_esc(f.severity)}: {_esc(f.code)}</b> '
        f"(steps {f.steps[0]}-{f.steps[1]}): {_esc(f.summary)}</div>"
        for f in findings
    )


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _group_rank(key: str) -> int:
    group = key.split("/")[0] if "/" in key else "other"
    return GROUP_ORDER.index(group) if group in GROUP_ORDER else len(GROUP_ORDER)


def _worth_plotting(records: list[dict], key: str) -> bool:
    """Bookkeeping (timings, the epoch counter) is left out; guard counters only if they
    ever moved off zero."""
    if key in ("train/epoch",) or key.split("/")[0] in SKIPPED_PREFIXES:
        return key.startswith("guard/") and any(_series(records, key)[1])
    return True


def _plot_metric(records: list[dict], key: str) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(3.6, 2.3))
    steps, values = _series(records, key)
    scheduled = key.endswith(("/lr", "/coef"))  # set, not measured: nothing to smooth
    if len(steps) < 30 or scheduled:
        ax.plot(steps, values, color=POLICY_COLOR, marker="o" if len(steps) < 30 else "", ms=3)
    else:
        ax.plot(steps, values, color=POLICY_COLOR, lw=0.8, alpha=0.35)
        ax.plot(steps, _smooth(values), color=POLICY_COLOR, lw=1.5)
    ax.set_xlabel("step")
    ax.set_title(key)
    return _embed(fig)
