from test_sft import run_cli


def test_help_lists_every_stage():
    proc = run_cli(["--help"])
    for stage in ("sft", "rm", "rm-eval", "score", "demo"):
        assert f"    {stage} " in proc.stdout


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
