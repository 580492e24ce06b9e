"""Resources (a full disk mid-run, out of memory while generating) and security (no pickle
code, no YAML code, reward code imported only when named)."""

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file
from test_ppo import ppo_config
from test_sft import sft_config

from tether.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tether.config import ConfigError, PPOConfig, load_config
from tether.errors import TetherError
from tether.rollout import generate
from tether.stages.sft import run_sft

# --------------------------------------------------------------------------- full disk


def test_full_disk_mid_run_keeps_the_last_checkpoint_and_resumes(
    tiny_model_dir, memorisable_sft, tmp_path, monkeypatch
):
    """The disk fills while step 4's checkpoint is written: the run stops with an error that
    says so, step 2's checkpoint is intact, and once there is room the run resumes to the
    weights of a run that never hit the wall."""
    extra = ["train.max_steps=6", "train.save_every=2"]
    reference = run_sft(sft_config(tiny_model_dir, memorisable_sft, *extra), tmp_path / "ok")

    real_save = torch.save

    def filling_disk(obj, path, *args, **kwargs):
        if "step-4" in str(path):
            raise OSError(28, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr("tether.checkpoint.torch.save", filling_disk)
    run = tmp_path / "full"
    with pytest.raises(CheckpointError, match="No space left on device; earlier checkpoints kept"):
        run_sft(sft_config(tiny_model_dir, memorisable_sft, *extra), run)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2"]
    monkeypatch.setattr("tether.checkpoint.torch.save", real_save)

    final = run_sft(sft_config(tiny_model_dir, memorisable_sft, *extra), run, resume=True)
    a, b = load_file(reference / "model.safetensors"), load_file(final / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


# --------------------------------------------------------------------------- memory


def test_generation_that_runs_out_of_memory_goes_on_in_halves(tiny_model_dir, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM

    from tether import engine
    from tether.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompts = [f"Tell me about {w}." for w in ["cats", "dogs", "tea", "rain", "maps", "snow"]]
    expected = generate(model, tokenizer, prompts, max_new_tokens=5, temperature=0).texts

    real_decode, sizes = engine.decode, []

    def small_memory(weights, rows, *args, **kwargs):
        sizes.append(len(rows))
        if len(rows) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_decode(weights, rows, *args, **kwargs)

    monkeypatch.setattr("tether.rollout.tether_engine.decode", small_memory)
    out = generate(model, tokenizer, prompts, max_new_tokens=5, temperature=0, batch_size=6)
    assert out.texts == expected  # greedy: the same answers, however the batch was split
    assert sizes == [6, 3, 1, 2, 3, 1, 2]
    printed = capsys.readouterr()
    assert "set rollout.generation_batch_size=3" in printed.out + printed.err

    def no_memory(weights, rows, *args, **kwargs):
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"
        )

    monkeypatch.setattr("tether.rollout.tether_engine.decode", no_memory)
    with pytest.raises(TetherError, match=r"out of memory on a single prompt of \d+ tokens"):
        generate(model, tokenizer, prompts[:2], max_new_tokens=5, temperature=0)


# --------------------------------------------------------------------------- security


def test_a_checkpoint_cannot_run_code_when_loaded(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    path = save_checkpoint(tmp_path / "ckpt", 1, {"w": torch.zeros(2)}, {"x": 1}, {}, 3)
    torch.save({"evil": Payload()}, path / "state.pt")  # a tampered state file...
    manifest = json.loads((path / "manifest.json").read_text())
    manifest.pop("state.pt")  # ...and a manifest edited to let it through
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(Exception, match=r"(?i)weights_only|unpickl"):
        load_checkpoint(path)
    assert not marker.exists()


def test_a_tampered_sharded_checkpoint_runs_no_code(tmp_path):
    """A torchrun checkpoint's `.metadata` is a pickle (torch.distributed.checkpoint's format):
    tether reads it with an allow-list first, so a payload in it never runs."""
    from tether.checkpoint import load_sharded_checkpoint, save_sharded_checkpoint

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    state = {"scheduler": {}, "rng": {"torch": torch.get_rng_state()}, "extra": {}}
    path = save_sharded_checkpoint(tmp_path / "ckpt", 1, model, optimizer, state, {}, 3)
    fresh = torch.nn.Linear(3, 2)
    loaded, _ = load_sharded_checkpoint(path, fresh, torch.optim.AdamW(fresh.parameters()))
    assert torch.equal(fresh.weight, model.weight)  # the untampered checkpoint loads
    assert torch.equal(loaded["rng"]["torch"], state["rng"]["torch"])
    with open(path / ".metadata", "wb") as fh:
        pickle.dump(Payload(), fh)
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        load_sharded_checkpoint(path, model, optimizer)
    assert not marker.exists()


def test_a_config_file_cannot_construct_python_objects(tmp_path):
    marker = tmp_path / "pwned"
    config = tmp_path / "evil.yaml"
    config.write_text(f"model:\n  name: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError):
        load_config(PPOConfig, config, [])
    assert not marker.exists()


def test_reward_code_is_imported_only_when_a_run_builds_its_reward(
    tiny_model_dir, ppo_files, tmp_path
):
    from tether.stages.ppo import build_reward

    marker = tmp_path / "imported"
    reward = tmp_path / "side_effect.py"
    reward.write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "def score(prompts, responses):\n    return [0.0 for _ in responses]\n"
    )
    cfg = ppo_config(tiny_model_dir, ppo_files, f"reward.terms=[{{name: '{reward}:score'}}]")
    assert not marker.exists()  # reading and validating the config imports nothing
    build_reward(cfg)
    assert marker.exists()


def test_remote_model_code_runs_only_with_trust_remote_code(tmp_path):
    """A model dir that ships its own Python (auto_map) is refused unless the user sets
    model.trust_remote_code; its code never runs on the refused load."""
    from tether.config import ModelConfig
    from tether.models import load_causal_lm

    marker = tmp_path / "ran"
    model_dir = tmp_path / "remote-model"
    model_dir.mkdir()
    (model_dir / "configuration_evil.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import PretrainedConfig\n"
        "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n"
    )
    (model_dir / "config.json").write_text(
        json.dumps(
            {
                "model_type": "evil",
                "auto_map": {
                    "AutoConfig": "configuration_evil.EvilConfig",
                    "AutoModelForCausalLM": "configuration_evil.EvilConfig",
                },
            }
        )
    )
    with pytest.raises(Exception, match="trust_remote_code"):
        load_causal_lm(ModelConfig(name=str(model_dir)))
    assert not marker.exists()
