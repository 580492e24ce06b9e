import functools
import importlib

import pytest
from test_sft import run_cli

from tether import cli

TOOLS = ("rm-eval", "score", "doctor", "inspect", "demo", "report")
# What a stage's config needs, beyond the shortcuts, before it validates.
REQUIRED_YAML = {
    "ppo": "reward:\n  terms: [{name: length}]\n",
    "grpo": "reward:\n  terms: [{name: length}]\n",
}


def config_value(config, key: str):
    return functools.reduce(getattr, key.split("."), config)


def test_help_lists_every_stage():
    proc = run_cli(["--help"])
    for stage in (*cli.STAGES, *TOOLS):
        assert f"    {stage} " in proc.stdout


@pytest.mark.parametrize("name", list(cli.STAGES))
def test_every_stage_has_its_own_help(name, capsys):
    stage = cli.STAGES[name]
    with pytest.raises(SystemExit) as stopped:
        cli.main([name, "--help"])
    assert stopped.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps its lines
    assert text.startswith(f"usage: tether {name} ")
    assert stage.help in text
    for key in (stage.model_key, stage.data_key, stage.steps_key):
        assert f"--set {key}=..." in text


@pytest.mark.parametrize("name", list(cli.STAGES))
def test_every_stage_runs_its_runner_on_the_configured_run(name, tmp_path, monkeypatch, capsys):
    """`tether STAGE`: the YAML, then --set, then the shortcuts make a config of the stage's
    class, handed to the stage's runner with the run dir. The runner is stubbed: training
    itself is each stage's own tests'."""
    monkeypatch.delenv("TETHER_KILL_AFTER_S", raising=False)
    stage = cli.STAGES[name]
    module, function = stage.runner.split(":")
    calls = []

    def runner(config, out, resume):
        calls.append((config, out, resume))
        return out / "final"

    monkeypatch.setattr(importlib.import_module(module), function, runner)
    config_file = tmp_path / "config.yaml"
    config_file.write_text("train:\n  seed: 7\n  keep_last: 4\n" + REQUIRED_YAML.get(name, ""))
    out = tmp_path / "run"
    args = ["--config", str(config_file), "--set", "train.seed=11", "--out", str(out)]
    shortcuts = ["--model", "some-model", "--data", "some-data.jsonl", "--max-steps", "3"]
    code = cli.main([name, *args, *shortcuts])
    assert code == 0
    [(config, given_out, resume)] = calls
    assert type(config) is cli.load_target(stage.config)
    assert (given_out, resume) == (out, False)
    assert config_value(config, stage.model_key) == "some-model"
    assert config_value(config, stage.data_key) == "some-data.jsonl"
    assert config_value(config, stage.steps_key) == 3
    assert config.train.keep_last == 4  # from the file
    assert config.train.seed == 11  # --set wins over the file
    assert f"{name}: done in" in capsys.readouterr().out


def test_config_errors_stop_before_any_work(tmp_path):
    proc = run_cli(
        ["sft", "--data", "x.jsonl", "--set", "train.max_step=3", "--out", str(tmp_path / "run")],
        check=False,
    )
    assert proc.returncode == 2
    assert "unknown config key 'train.max_step'; did you mean 'train.max_steps'?" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_resume_needs_a_run_dir():
    proc = run_cli(["sft", "--resume"], check=False)
    assert proc.returncode == 2 and "--resume needs --out" in proc.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], (16, 16, 3e-4)),
        (["--kl-budget", "2"], (30, 64, 7.5e-5)),
        (["--kl-budget", "2", "--steps", "5"], (5, 64, 7.5e-5)),
        (["--kl-budget", "2", "--quick"], (8, 8, 3e-4)),
    ],
)
def test_a_demo_with_a_kl_budget_takes_the_budget_ppo_settings_unless_told(
    args, expected, tmp_path, monkeypatch
):
    """A budget run stops where it spends its budget, so its step count is a cap, and it
    takes four times the prompts a step at a quarter of the learning rate; --steps and --quick
    still win."""
    from tether.tools import demo

    seen = []

    def run_demo(out, settings, resume):
        seen.append(settings)
        return {"rm_accuracy": 0.7, "gold_ref": 0.2, "gold_policy": 0.8, "kl": 2.0,
                "win_rate": 0.9, "wall_s": 60.0}  # fmt: skip

    monkeypatch.setattr(demo, "run_demo", run_demo)
    assert cli.main(["demo", "--out", str(tmp_path / "d"), *args]) == 0
    assert (seen[0].ppo_steps, seen[0].ppo_batch, seen[0].ppo_lr) == expected
