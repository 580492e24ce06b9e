"""Torn checkpoints: a truncated, corrupted or half-written checkpoint is detected by its
manifest's checksums and the previous complete one is used, with a warning; a write that
fails leaves the earlier ones as they were."""

import shutil

import pytest
from safetensors.torch import load_file
from test_checkpoint import save
from test_sft import sft_config

from tether.runs.checkpoint import CheckpointError, latest_checkpoint
from tether.stages.sft import run_sft


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_manifest"])
def test_torn_checkpoint_falls_back_to_previous(tmp_path, damage):
    save(tmp_path, 1, value=1.0)
    newest = save(tmp_path, 2, value=2.0)
    target = newest / "model.safetensors"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:-10])
    elif damage == "flip":
        data = bytearray(target.read_bytes())
        data[-1] ^= 0xFF
        target.write_bytes(bytes(data))
    else:
        (newest / "manifest.json").unlink()
    with pytest.warns(UserWarning, match="skipping damaged checkpoint"):
        assert latest_checkpoint(tmp_path).name == "step-1"


def test_failed_write_keeps_earlier_checkpoints(tmp_path, monkeypatch):
    save(tmp_path, 1)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("tether.runs.checkpoint.save_file", full_disk)
    with pytest.raises(CheckpointError, match="No space left on device; earlier checkpoints kept"):
        save(tmp_path, 2)
    assert [p.name for p in tmp_path.iterdir()] == ["step-1"]  # no temp dir left behind


def test_a_run_whose_newest_checkpoint_is_torn_resumes_from_the_one_before(
    tiny_model_dir, memorisable_sft, tmp_path
):
    extra = ["train.max_steps=6", "train.save_every=2"]
    reference = run_sft(sft_config(tiny_model_dir, memorisable_sft, *extra), tmp_path / "ok")
    run = tmp_path / "torn"
    run_sft(sft_config(tiny_model_dir, memorisable_sft, *extra), run)
    shutil.rmtree(run / "final")  # as if the crash came before the final save...
    state = run / "checkpoints/step-6/state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # ...mid-checkpoint
    with pytest.warns(UserWarning, match="skipping damaged checkpoint"):
        final = run_sft(sft_config(tiny_model_dir, memorisable_sft, *extra), run, resume=True)
    a, b = load_file(reference / "model.safetensors"), load_file(final / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
