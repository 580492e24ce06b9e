"""The Python API: every stage from a list of dicts (and a callable reward) on the tiny model,
checked as the CLI checks; `tether config`; trackers and the `tether` logger."""

import logging
import sys
import types

import pytest
import yaml
from conftest import marker_pairs

import tether
import tether.api
from tether import config as cfgmod
from tether.config import ConfigError
from tether.rewards import REGISTERED, spec_of

FAST = {"threads": 1, "precision": "fp32", "save_every": 0, "max_steps": 2, "batch_size": 4}
WORDS = ["apple", "river", "stone", "cloud", "light", "house", "road", "bird"]
SPELL = [{"prompt": f"Spell {w} backwards.", "solution": w[::-1]} for w in WORDS]


def first_letter(completions, solution, **kwargs):
    """A TRL verifier: reads the prompt file's `solution` column."""
    return [float(s[0] in c) for c, s in zip(completions, solution, strict=True)]


def test_sft_from_records_keeps_them_in_the_run_dir(tiny_model_dir, tmp_path):
    records = [{"prompt": f"Say {w}.", "completion": w} for w in WORDS]
    result = tether.sft(model=tiny_model_dir, data=records, train=FAST, out=tmp_path / "run")
    assert result.final == tmp_path / "run" / "final"
    assert (result.final / "config.json").is_file()
    assert result.metrics["step"] == 2 and result.metrics["train/loss"] > 0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["data"]["train"] == str(tmp_path / "run" / "data" / "train.jsonl")


def test_grpo_with_a_callable_trl_reward_and_a_solution_column(tiny_model_dir, tmp_path):
    result = tether.grpo(
        model=str(tiny_model_dir),
        data=SPELL,
        reward=first_letter,
        rollout={"max_new_tokens": 6, "samples_per_prompt": 2, "missing_eos": "none"},
        train=FAST,
        out=tmp_path / "run",
    )
    assert "reward/score_mean" in result.metrics and result.metrics["step"] == 2
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["reward"]["terms"] == [{"name": "test_api:first_letter"}]  # importable


def test_ppo_with_a_lambda_and_a_weighted_list(tiny_model_dir, tmp_path):
    result = tether.ppo(
        model=str(tiny_model_dir),
        data=[{"prompt": f"Tell me about {w}."} for w in WORDS],
        reward=[(lambda prompts, responses: [len(r) / 10 for r in responses], 0.5), "length"],
        rollout={"max_new_tokens": 6, "missing_eos": "none"},
        train=FAST,
        out=tmp_path / "run",
    )
    assert result.metrics["step"] == 2
    terms = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["reward"]["terms"]
    assert terms[0]["weight"] == 0.5 and terms[0]["name"].startswith("callable:")
    assert terms[1] == {"name": "length"}


def test_reward_model_and_dpo_from_records(tiny_model_dir, tmp_path):
    pairs = marker_pairs(16, seed=0)
    rm = tether.reward_model(
        model=tiny_model_dir, data=pairs, eval_data=pairs[:4], train=FAST, out=tmp_path / "rm"
    )
    assert 0.0 <= rm.metrics["eval/accuracy"] <= 1.0
    dpo = tether.dpo(model=tiny_model_dir, data=pairs, train=FAST, out=tmp_path / "dpo")
    assert "dpo/reward_margin" in dpo.metrics or "train/loss" in dpo.metrics


def test_the_api_checks_as_the_cli_does_before_writing_anything(tmp_path):
    with pytest.raises(ConfigError, match=r"TRL's `learning_rate` is tether's 'optim.lr'"):
        tether.sft(data=[{"text": "x"}], learning_rate=1e-5, out=tmp_path / "run")
    with pytest.raises(ConfigError, match=r"'train.max_step'; did you mean 'train.max_steps'"):
        tether.sft(data=[{"text": "x"}], train={"max_step": 3}, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_config_object_is_the_base_of_keyword_values(tmp_path):
    base = cfgmod.load_config(
        cfgmod.PPOConfig, None, ["algo=reinforce", "data.train=x", "reward.terms=[{name: length}]"]
    )
    built = cfgmod.build_config(cfgmod.PPOConfig, base, {"rollout": {"samples_per_prompt": 2}})
    assert (built.algo, built.rollout.samples_per_prompt) == ("reinforce", 2)
    assert base.rollout.samples_per_prompt == 1  # the caller's object is not changed


def test_callables_that_no_import_finds_are_registered_by_name():
    def local(prompts, responses):
        return [0.0] * len(responses)

    assert spec_of(first_letter) == "test_api:first_letter"
    spec = spec_of(local)
    assert spec.startswith("callable:local") and REGISTERED[spec] is local
    assert spec_of(local) == spec  # the same function, the same spec


# ------------------------------------------------------------------ tether config


def leaf_keys(config, prefix=""):
    import dataclasses

    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            yield from leaf_keys(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", type(config)


@pytest.mark.parametrize("stage", list(tether.api.STAGES))
def test_config_reference_covers_every_key_with_a_doc_and_loads_back(stage):
    cls = tether.api.config_class(stage)
    text = tether.config_reference(stage)
    assert cfgmod._update(cls(), yaml.safe_load(text), "", "reference") == cls()
    lines = text.splitlines()
    for key, owner in leaf_keys(cls()):
        leaf, depth = key.rsplit(".", 1)[-1], key.count(".")
        at = [i for i, line in enumerate(lines) if line.startswith("  " * depth + f"{leaf}:")]
        assert at, f"{key} is not printed"
        assert any(lines[i - 1].strip().startswith("# ") for i in at), f"{key} has no doc"
        assert cfgmod.field_docs(owner).get(leaf), f"{key}: no comment in config.py"


def test_tether_config_prints_it(capsys):
    from tether import cli

    assert cli.main(["config", "grpo"]) == 0
    out = capsys.readouterr().out
    assert "samples_per_prompt: 4" in out and "# Passes over each rollout batch." in out


# ------------------------------------------------------------------ trackers and messages


def test_report_to_resumes_the_same_wandb_run(tmp_path, monkeypatch):
    """A fake `wandb` module records what tether asks of it."""
    calls = []

    class Run:
        def __init__(self, **kwargs):
            calls.append(kwargs)
            self.id = kwargs["id"] or "new-id"
            self.logged = []

        def log(self, metrics, step):
            self.logged.append((step, metrics))

        def finish(self):
            pass

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: Run(**kw)))
    from tether.runs.rundir import MetricsLogger, RunDir

    config = cfgmod.load_config(
        cfgmod.SFTConfig, None, ["data.train=x", "logging.report_to=wandb", "logging.run_name=n"]
    )
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    logger = MetricsLogger(run, 0, config)
    logger.log(1, {"train/loss": 2.0, "note": "text"})
    assert logger.trackers[0].run.logged == [(1, {"train/loss": 2.0})]
    logger.close()
    MetricsLogger(run, 1, config).close()  # resumed
    assert [c["id"] for c in calls] == [None, "new-id"]
    assert calls[0]["name"] == "n" and calls[0]["resume"] == "allow"


def test_a_tracker_without_its_package_is_an_error_naming_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import fails
    from tether.runs.rundir import MetricsLogger, RunDir
    from tether.runs.trackers import TrackerError

    config = cfgmod.load_config(
        cfgmod.SFTConfig, None, ["data.train=x", "logging.report_to=[mlflow]"]
    )
    with pytest.raises(TrackerError, match=r"pip install mlflow"):
        MetricsLogger(RunDir(tmp_path), 0, config)
    with pytest.raises(ConfigError, match=r"logging\.report_to"):
        cfgmod.load_config(cfgmod.SFTConfig, None, ["data.train=x", "logging.report_to=[comet]"])


def test_messages_go_through_the_tether_logger(capsys):
    from tether.console import say

    say("loaded 3 prompts")
    assert "loaded 3 prompts" in capsys.readouterr().out
    logger = logging.getLogger("tether")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        say("quiet please")
        assert "quiet please" not in capsys.readouterr().out
    finally:
        logger.setLevel(level)


def test_a_resume_must_name_its_run_dir(tmp_path, monkeypatch):
    from tether.errors import TetherError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(TetherError, match="--resume needs --out"):
        tether.sft(data=[{"text": "x"}], resume=True)
    assert not (tmp_path / "runs").exists()  # no fresh run dir started in its place
