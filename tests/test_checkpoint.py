import pytest
import torch

from tether.config import SFTConfig, load_config
from tether.runs.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from tether.runs.rundir import MetricsLogger, RunDir, RunDirError, read_metrics


def save(dir_, step, value=1.0, keep_last=3):
    tensors = {"w": torch.full((4, 4), value)}
    state = {"optimizer": {"state": {0: {"exp_avg": torch.ones(3)}}}, "rng": torch.get_rng_state()}
    return save_checkpoint(dir_, step, tensors, state, {"cursor": step * 8}, keep_last)


def test_round_trip_without_pickle(tmp_path):
    path = save(tmp_path, 5, value=2.5)
    tensors, state, meta = load_checkpoint(path)
    assert torch.equal(tensors["w"], torch.full((4, 4), 2.5))
    assert torch.equal(state["optimizer"]["state"][0]["exp_avg"], torch.ones(3))
    assert meta == {"step": 5, "cursor": 40}


def test_keeps_only_the_last_k(tmp_path):
    for step in (1, 2, 3, 4, 5):
        save(tmp_path, step, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-4", "step-5"]


def test_second_run_in_same_dir_is_refused(tmp_path):
    first, second = RunDir(tmp_path / "run"), RunDir(tmp_path / "run")
    first.lock()
    with pytest.raises(RunDirError, match=r"in use by pid \d+"):
        second.lock()
    first.unlock()
    second.lock()  # free again once the first run ends
    second.unlock()


def test_fresh_start_never_overwrites_progress(tmp_path):
    cfg = load_config(SFTConfig, None, ["data.train=x.jsonl"])
    run = RunDir(tmp_path)
    assert run.prepare(cfg, resume=False) is None
    run.unlock()
    save(run.checkpoints, 3)
    with pytest.raises(RunDirError, match="pass --resume"):
        RunDir(tmp_path).prepare(cfg, resume=False)


def test_resume_with_a_different_config_is_refused(tmp_path):
    cfg = load_config(SFTConfig, None, ["data.train=x.jsonl"])
    RunDir(tmp_path).prepare(cfg, resume=False)
    changed = load_config(SFTConfig, None, ["data.train=x.jsonl", "optim.lr=0.1"])
    with pytest.raises(RunDirError, match=r"optim\.lr"):
        RunDir(tmp_path).prepare(changed, resume=True)
    longer = load_config(SFTConfig, None, ["data.train=x.jsonl", "train.max_steps=99"])
    RunDir(tmp_path).prepare(longer, resume=True)  # extending a run is allowed


def test_a_run_dir_from_before_a_key_existed_resumes_with_its_default(tmp_path):
    import yaml

    cfg = load_config(SFTConfig, None, ["data.train=x.jsonl"])
    RunDir(tmp_path).prepare(cfg, resume=False)
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    del saved["train"]["deterministic"]  # written by a tether without the key
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    RunDir(tmp_path).prepare(cfg, resume=True)  # the default: no difference
    del saved["train"]["seed"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    seeded = load_config(SFTConfig, None, ["data.train=x.jsonl", "train.seed=7"])
    with pytest.raises(RunDirError, match=r"train\.seed"):  # not the default: refused
        RunDir(tmp_path).prepare(seeded, resume=True)


def test_a_budget_run_from_before_its_control_was_chosen_resumes_steered_by_beta(tmp_path):
    """ppo.kl.budget_control came in with `stop` beside the β controller, and `stop` is the
    default now: a budget run saved without the key was steered by β, and is resumed so (its
    own config.yaml read as it ran); resuming it with `stop` is refused, not done."""
    import yaml

    from tether.config import PPOConfig

    base = ["data.train=x.jsonl", "reward.terms=[{name: length}]"]
    cfg = load_config(PPOConfig, None, [*base, "ppo.kl.budget=2"])
    RunDir(tmp_path).prepare(cfg, resume=False)
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    del saved["ppo"]["kl"]["budget_control"]  # written by a tether without the key
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    as_saved = load_config(PPOConfig, tmp_path / "config.yaml", saved_run=True)
    assert as_saved.ppo.kl.budget_control == "beta" and cfg.ppo.kl.budget_control == "stop"
    with pytest.raises(RunDirError, match=r"ppo\.kl\.budget_control"):
        RunDir(tmp_path).prepare(cfg, resume=True)
    RunDir(tmp_path).prepare(as_saved, resume=True)
    # without a budget the key does nothing, and a run that lacks it reads as the default
    unbudgeted = load_config(PPOConfig, None, base)
    RunDir(tmp_path / "plain").prepare(unbudgeted, resume=False)
    plain = yaml.safe_load((tmp_path / "plain/config.yaml").read_text())
    del plain["ppo"]["kl"]["budget_control"]
    (tmp_path / "plain/config.yaml").write_text(yaml.safe_dump(plain))
    RunDir(tmp_path / "plain").prepare(unbudgeted, resume=True)


def test_a_resume_cut_off_while_writing_config_keeps_the_old_one(tmp_path, monkeypatch):
    """A kill can land while a resume rewrites config.yaml; the next resume reads that file
    to learn where the data is, so it must hold the old text or the new, never a torn one."""
    import builtins
    import io

    cfg = load_config(SFTConfig, None, ["data.train=x.jsonl"])
    RunDir(tmp_path).prepare(cfg, resume=False)
    before = (tmp_path / "config.yaml").read_text()
    real_open = io.open

    class DiesHalfway:  # writes half the text, then the process "dies"
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def write(self, text):
            self.fh.write(text[: len(text) // 2])
            self.fh.flush()
            raise KeyboardInterrupt

    def open_dying(file, mode="r", *args, **kwargs):
        fh = real_open(file, mode, *args, **kwargs)
        return DiesHalfway(fh) if "w" in mode and "config.yaml" in str(file) else fh

    monkeypatch.setattr(builtins, "open", open_dying)
    monkeypatch.setattr(io, "open", open_dying)
    longer = load_config(SFTConfig, None, ["data.train=x.jsonl", "train.max_steps=99"])
    with pytest.raises(KeyboardInterrupt):
        RunDir(tmp_path).prepare(longer, resume=True)
    monkeypatch.undo()
    assert (tmp_path / "config.yaml").read_text() == before
    assert load_config(SFTConfig, tmp_path / "config.yaml") == cfg


def test_metrics_are_cut_back_to_the_resumed_step(tmp_path):
    run = RunDir(tmp_path)
    logger = MetricsLogger(run)
    for step in range(1, 6):
        logger.log(step, {"train/loss": 1.0 / step})
    logger.close()
    with open(run.metrics_path, "a") as fh:
        fh.write('{"step": 6, "train/lo')  # torn by a crash mid-write
    MetricsLogger(run, resume_step=3).close()
    assert [r["step"] for r in read_metrics(run.metrics_path)] == [1, 2, 3]
