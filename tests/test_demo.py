"""The demo pipeline end to end on a tiny real model, its artefacts, resume and the report."""

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from tether.errors import TetherError
from tether.tools.demo import DemoSettings, run_demo
from tether.tools.report import build_report

SUMMARY_KEYS = {
    "rm_accuracy",
    "gold_ref",
    "gold_policy",
    "rm_score_ref",
    "rm_score_policy",
    "kl",
    "win_rate",
    "best_of_n",
    "best_of_n_gold_at_policy_kl",
    "best_of_n_rm_at_policy_kl",
    "wall_s",
}


def tiny_settings(model_dir) -> DemoSettings:
    return DemoSettings(
        model=str(model_dir),
        train_prompts=10,
        eval_prompts=3,
        responses_per_prompt=3,
        max_new_tokens=6,
        rm_epochs=1,
        ppo_steps=2,
        ppo_batch=4,
        best_of=4,
        policy_samples=2,
    )


@pytest.fixture(scope="module")
def demo_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    summary = run_demo(out, tiny_settings(tiny_model_dir))
    return out, summary


def test_demo_writes_every_artefact(demo_run):
    out, summary = demo_run
    assert summary.keys() >= SUMMARY_KEYS
    assert json.loads((out / "summary.json").read_text()) == summary
    assert [b["n"] for b in summary["best_of_n"]] == [1, 2, 4]
    assert summary["best_of_n"][0]["kl"] == 0.0
    assert summary["best_of_n"][2]["kl"] == pytest.approx(1.3863 - 0.75, abs=1e-4)
    # best-of-n by the RM can only raise the RM's own mean score
    rm_scores = [b["rm_score"] for b in summary["best_of_n"]]
    assert rm_scores == sorted(rm_scores)
    assert rm_scores[0] == pytest.approx(summary["rm_score_ref"], abs=1e-5)
    assert 0.0 <= summary["win_rate"] <= 1.0 and 0.0 <= summary["rm_accuracy"] <= 1.0
    # best-of-n at the policy's KL: read off its curve between the two n that bracket it
    kls = [b["kl"] for b in summary["best_of_n"]]
    if 0.0 <= summary["kl"] <= kls[-1]:
        upper = next(i for i, k in enumerate(kls) if k >= summary["kl"])
        low, high = summary["best_of_n"][max(upper - 1, 0)], summary["best_of_n"][upper]
        share = (summary["kl"] - low["kl"]) / ((high["kl"] - low["kl"]) or 1.0)
        for key, field in (("gold", "gold"), ("rm", "rm_score")):
            expected = low[field] + share * (high[field] - low[field])
            assert summary[f"best_of_n_{key}_at_policy_kl"] == pytest.approx(expected)
    else:  # a k1 mean can fall under 0, and a policy can pass the largest n: no comparison
        assert summary["best_of_n_gold_at_policy_kl"] is None
        assert summary["best_of_n_rm_at_policy_kl"] is None

    preferences = [json.loads(x) for x in (out / "preferences.jsonl").read_text().splitlines()]
    assert len(preferences) == 10
    assert all(sorted(p["ranking"]) == [0, 1, 2] for p in preferences)
    assert (out / "rm/final/config.json").is_file() and (out / "ppo/final/config.json").is_file()
    ppo_metrics = [json.loads(x) for x in (out / "ppo/metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in ppo_metrics] == [1, 2]
    assert all("gold/mean" in m and "kl/mean" in m for m in ppo_metrics)  # gold is logged
    assert (out / "ppo/samples.jsonl").read_text().strip()

    evaluated = [json.loads(x) for x in (out / "eval/samples.jsonl").read_text().splitlines()]
    assert len(evaluated) == 3
    assert all(len(e["reference"]) == 4 and len(e["policy"]) == 2 for e in evaluated)
    assert all(isinstance(a["ended"], bool) for e in evaluated for a in e["policy"])
    gold_policy = [a["gold"] for e in evaluated for a in e["policy"]]
    assert sum(gold_policy) / len(gold_policy) == pytest.approx(summary["gold_policy"])

    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 5  # scores, KL, gold-vs-√KL, length, RM
    assert "http://" not in page and "https://" not in page  # self-contained
    assert evaluated[0]["prompt"].replace('"', "&quot;") in page  # the before/after table
    assert "Best-of-n" in page and "<h2>Doctor</h2>" in page


def test_resume_skips_finished_stages_and_fresh_start_is_refused(demo_run, capsys):
    out, summary = demo_run
    again = run_demo(out, DemoSettings(train_prompts=999), resume=True, report=False)
    printed = capsys.readouterr().out
    assert printed.count("done earlier") == 5
    assert again["settings"] == summary["settings"]  # the saved settings, not the new ones
    assert again["gold_policy"] == summary["gold_policy"]
    with pytest.raises(TetherError, match="already holds a demo run"):
        run_demo(out, DemoSettings())


def test_report_rebuilds_for_a_stage_run_dir(demo_run):
    out, _ = demo_run
    path = build_report(out / "ppo")
    page = path.read_text()
    assert path == out / "ppo/report.html"
    assert page.count("data:image/png;base64,") >= 4  # train, reward, kl, policy... groups
    assert "Samples at step 2" in page
    with pytest.raises(TetherError, match="not a run dir"):
        build_report(out / "eval")


def test_demo_killed_mid_stage_resumes_to_the_same_artefacts(tiny_model_dir, tmp_path):
    """SIGKILL at the reward model's first step; --resume finishes every stage."""
    out = tmp_path / "demo"
    settings = json.dumps(asdict(tiny_settings(tiny_model_dir)))
    script = (
        "import json, sys; from pathlib import Path\n"
        "from tether.tools.demo import DemoSettings, run_demo\n"
        "run_demo(Path(sys.argv[1]), DemoSettings(**json.loads(sys.argv[2])), "
        "resume=sys.argv[3] == 'resume', report=False)\n"
    )
    killed = subprocess.run(
        [sys.executable, "-c", script, str(out), settings, "fresh"],
        env={**os.environ, "TETHER_KILL_AT": "after_step:1"},
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    stages = json.loads((out / "stages.json").read_text())
    assert set(stages) == {"prompts", "preferences"}
    resumed = subprocess.run(
        [sys.executable, "-c", script, str(out), settings, "resume"],
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert resumed.stdout.count("done earlier") == 2
    assert json.loads((out / "summary.json").read_text()).keys() >= SUMMARY_KEYS


def test_ctrl_c_stops_cleanly_and_resume_continues(tiny_model_dir, tmp_path):
    from test_sft import run_cli

    out = tmp_path / "demo"
    args = ["demo", "--quick", "--model", str(tiny_model_dir), "--prompts", "8", "--out", str(out)]
    stopped = run_cli([*args, "--steps", "2"], {"TETHER_INTERRUPT_AT": "after_step:1"}, False)
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    assert f"tether demo --out {out} --resume" in stopped.stdout
    assert "Traceback" not in stopped.stderr
    resumed = run_cli(["demo", "--out", str(out), "--resume"])
    assert resumed.stdout.count("done earlier") == 2  # prompts and preferences
    assert (out / "report.html").is_file()


def test_a_run_saved_before_a_setting_existed_resumes_as_it_ran(tmp_path):
    """A demo saved before the adapters' shares existed trained adapters on every layer (the
    reward model at lr 2e-3); its resumed stages must too, or a checkpoint's lower adapters
    would be dropped on loading."""
    from tether.tools.demo import kl_budget_overrides, load_settings

    old = asdict(DemoSettings(kl_budget=2.0))
    for name in ("policy_lora_share", "rm_lora_share", "rm_lr", "kl_budget_control", "ppo_lr"):
        del old[name]
    (tmp_path / "settings.json").write_text(json.dumps(old))
    resumed = load_settings(tmp_path, DemoSettings(), resume=True)
    assert (resumed.policy_lora_share, resumed.rm_lora_share, resumed.rm_lr) == (1.0, 1.0, 2e-3)
    # a budget run from before the demo stopped at its budget was steered by β, at lr 3e-4
    assert "ppo.kl.budget_control=beta" in kl_budget_overrides(resumed)
    assert resumed.ppo_lr == 3e-4
    now = DemoSettings()
    assert now.policy_lora_share < 1.0 and now.rm_lora_share < 1.0 and now.rm_lr != 2e-3
    assert now.kl_budget_control == "stop"


def test_a_kl_budget_stops_ppo_at_the_demos_beta(tmp_path):
    from tether.tools.demo import budget_settings, ppo_config
    from tether.tools.tasks import get_task

    task = get_task("sentiment")
    fixed = ppo_config(task, DemoSettings(), tmp_path)
    assert not fixed.ppo.kl.adaptive and fixed.ppo.kl.budget == 0
    budget = ppo_config(task, budget_settings(DemoSettings(kl_budget=2.0)), tmp_path)
    assert budget.ppo.kl.budget == 2.0 and budget.ppo.kl.coef == 0.05
    assert budget.ppo.kl.stops_at_budget
    assert (budget.train.batch_size, budget.optim.lr) == (64, 7.5e-5)
    # a learning rate of one's own keeps its batch: the pair is the budget run's recipe
    own = budget_settings(DemoSettings(kl_budget=2.0, ppo_lr=1e-4))
    assert (own.ppo_steps, own.ppo_batch, own.ppo_lr) == (30, 16, 1e-4)


def test_the_kl_frontier_reruns_ppo_at_a_budget_and_the_report_shows_it(demo_run, tmp_path):
    """benchmarks/kl_frontier.py on a copy of the tiny demo: one budget run, the table and
    plot beside the demo's own run, and the report's section from them."""
    import shutil

    demo = tmp_path / "demo"
    shutil.copytree(demo_run[0], demo)
    script = Path(__file__).resolve().parents[1] / "benchmarks/kl_frontier.py"
    command = [sys.executable, str(script), "--demo", str(demo), "--budgets", "0.5"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    frontier = json.loads((demo / "frontier/frontier.json").read_text())
    assert [p["run"] for p in frontier["ppo"]][1] == "budget 0.5 nats, β 0.05"
    ran = json.loads((demo / "frontier/budget-0.5/settings.json").read_text())
    assert ran["kl_budget"] == 0.5
    assert (demo / "frontier/frontier.png").stat().st_size > 1000
    assert "| budget 0.5 nats, β 0.05 |" in (demo / "frontier/frontier.md").read_text()
    page = build_report(demo).read_text()
    assert "PPO at KL budgets against best-of-n" in page and "budget 0.5 nats" in page
    # the budget run landed its policy (or kept it, within the budget), and its report says so
    landing = json.loads((demo / "frontier/budget-0.5/ppo/landing.json").read_text())
    assert landing["budget"] == 0.5 and 0 < landing["scale"] <= 1
    budget_page = build_report(demo / "frontier/budget-0.5").read_text()
    assert f"{landing['kl_trained']:.2f} nats" in budget_page and "budget of 0.5" in budget_page


@pytest.mark.parametrize(
    ("gold", "rm", "verdict"),
    [
        (0.52, 0.95, "falls short in optimisation"),  # less RM score than best-of-n there
        (0.52, 1.90, "being gamed"),  # as much RM score, less gold
        (0.65, 0.95, None),  # PPO ahead on gold: nothing to explain
    ],
)
def test_the_report_says_why_ppo_trails_best_of_n_at_equal_kl(gold, rm, verdict):
    from tether.tools.report import _equal_kl_html

    summary = {
        "gold_policy": gold,
        "rm_score_policy": rm,
        "best_of_n_gold_at_policy_kl": 0.594,
        "best_of_n_rm_at_policy_kl": 1.70,
    }
    html = _equal_kl_html(summary)
    assert "gold <b>0.594</b>" in html and "RM score <b>+1.70</b>" in html
    for phrase in ("falls short in optimisation", "being gamed"):
        assert (phrase in html) == (phrase == verdict)
    # a summary from before the RM comparison, and a policy past the largest n
    assert "RM score" not in _equal_kl_html(summary | {"best_of_n_rm_at_policy_kl": None})
    assert "no comparison" in _equal_kl_html({"best_of_n_gold_at_policy_kl": None})
