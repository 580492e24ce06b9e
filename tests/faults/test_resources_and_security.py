"""Resources (a full disk mid-run, out of memory while generating) and security (no pickle
code, no YAML code, reward code imported only when named)."""

import json

import pytest
import torch
from safetensors.torch import load_file
from test_ppo import ppo_config
from test_sft import sft_config

from tether.config import ConfigError, PPOConfig, load_config
from tether.errors import TetherError
from tether.rollout.generation import generate
from tether.runs.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
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

    monkeypatch.setattr("tether.runs.checkpoint.torch.save", filling_disk)
    run = tmp_path / "full"
    with pytest.raises(CheckpointError, match="No space left on device; earlier checkpoints kept"):
        run_sft(sft_config(tiny_model_dir, memorisable_sft, *extra), run)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2"]
    monkeypatch.setattr("tether.runs.checkpoint.torch.save", real_save)

    final = run_sft(sft_config(tiny_model_dir, memorisable_sft, *extra), run, resume=True)
    a, b = load_file(reference / "model.safetensors"), load_file(final / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


# --------------------------------------------------------------------------- memory


def test_generation_that_runs_out_of_memory_goes_on_in_halves(tiny_model_dir, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM

    from tether.fast import engine
    from tether.models.loading import load_tokenizer

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

    monkeypatch.setattr("tether.rollout.generation.tether_engine.decode", small_memory)
    out = generate(model, tokenizer, prompts, max_new_tokens=5, temperature=0, batch_size=6)
    assert out.texts == expected  # greedy: the same answers, however the batch was split
    assert sizes == [6, 3, 1, 2, 3, 1, 2]
    printed = capsys.readouterr()
    assert "set rollout.generation_batch_size=3" in printed.out + printed.err

    def no_memory(weights, rows, *args, **kwargs):
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"
        )

    monkeypatch.setattr("tether.rollout.generation.tether_engine.decode", no_memory)
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


def pickled_call(module: str, name: str, *args: str) -> bytes:
    """A hand-made pickle that imports module.name and calls it with string args: what a
    tampered file can hold without the attacker's classes existing anywhere."""

    def text(value: str) -> bytes:
        raw = value.encode()
        return b"\x8c" + bytes([len(raw)]) + raw  # SHORT_BINUNICODE

    tuple_op = {1: b"\x85", 2: b"\x86"}[len(args)]  # TUPLE1 / TUPLE2
    return (
        b"\x80\x04"
        + text(module)
        + text(name)
        + b"\x93"
        + b"".join(map(text, args))
        + (
            tuple_op + b"R."  # STACK_GLOBAL, args, REDUCE, STOP
        )
    )


def test_a_tampered_sharded_checkpoint_runs_no_code(tmp_path):
    """A torchrun checkpoint (torch.distributed.checkpoint) pickles its `.metadata` and its
    non-tensor entries (the optimizer's hyper-parameters). tether reads the first through an
    allow-list of exact names and the second with weights_only=True, so none of three
    tampered checkpoints runs anything: `os.system` in `.metadata`, a callable reached
    through an allowed module's namespace (`filesystem.io.FileIO` would truncate a file), and
    a payload in the optimizer's saved learning rate."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from tether.runs.checkpoint import load_sharded_checkpoint, save_sharded_checkpoint

    marker, victim = tmp_path / "pwned", tmp_path / "victim.txt"
    victim.write_text("precious")

    class Payload:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    def fresh():
        model = torch.nn.Linear(3, 2)
        return model, torch.optim.AdamW(model.parameters())

    model, optimizer = fresh()
    state = {"scheduler": {}, "rng": {"torch": torch.get_rng_state()}, "extra": {}}
    path = save_sharded_checkpoint(tmp_path / "ckpt", 1, model, optimizer, state, {}, 3)
    other, other_optimizer = fresh()
    loaded, _ = load_sharded_checkpoint(path, other, other_optimizer)  # untampered: loads
    assert torch.equal(other.weight, model.weight)
    assert torch.equal(loaded["rng"]["torch"], state["rng"]["torch"])

    good_metadata = (path / ".metadata").read_bytes()
    for payload in (
        pickled_call("os", "system", f"touch {marker}"),
        pickled_call("torch.distributed.checkpoint.filesystem", "io.FileIO", str(victim), "w"),
    ):
        (path / ".metadata").write_bytes(payload)
        with pytest.raises(CheckpointError, match="cannot be loaded safely"):
            load_sharded_checkpoint(path, *fresh())
    (path / ".metadata").write_bytes(good_metadata)

    model_state, optim_state = get_state_dict(model, optimizer)
    optim_state["param_groups"][0]["lr"] = Payload()
    evil = tmp_path / "evil-optimizer"
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(evil))
    (evil / "state.pt").write_bytes((path / "state.pt").read_bytes())
    (evil / "meta.json").write_text('{"step": 1}')
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        load_sharded_checkpoint(evil, *fresh())
    assert not marker.exists() and victim.read_text() == "precious"


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
    build_reward(cfg, bf16=False)
    assert marker.exists()


def test_remote_model_code_runs_only_with_trust_remote_code(tmp_path):
    """A model dir that ships its own Python (auto_map) is refused unless the user sets
    model.trust_remote_code; its code never runs on the refused load."""
    from tether.config import ModelConfig
    from tether.models.loading import load_causal_lm

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
