"""Atomic checkpoints that a killed run resumes from.

Layout of `checkpoints/step-N/`:
  model.safetensors   trainable tensors (LoRA adapters, or all weights for full fine-tuning)
  state.pt            optimizer, scheduler, RNG and other training state (tensors and plain
                      Python values only, loaded with `weights_only=True`: no pickle code)
  meta.json           step and data position, human-readable
  manifest.json       size and sha256 of every file above; written last

A checkpoint is built in a temp dir, every file fsynced, then renamed into place: a crash
leaves either the old set or the new one, never half a checkpoint under a real name. A
checkpoint whose files do not match its manifest (a torn copy, a bad disk) is skipped with a
warning and the previous one is used.

Inside a torchrun job the trainable tensors and the optimizer go through
torch.distributed.checkpoint instead (`.metadata` + one `__R_0.distcp` per rank, in place of
model.safetensors and the optimizer part of state.pt): each rank writes its own shard, and a
later run of any number of ranks, or a plain process, reads back the tensors it owns.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tether.errors import TetherError
from tether.runs import faults

STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(TetherError, RuntimeError):
    """A checkpoint could not be written or read."""


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _publish(
    tmp: Path, final: Path, checkpoints_dir: Path, files: list[str], keep_last: int
) -> None:
    """fsync `files`, write the manifest last, rename `tmp` to `final`, and keep only the
    newest `keep_last` checkpoints."""
    for name in files:
        _fsync_path(tmp / name)
    manifest = {
        name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
        for name in files
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    _fsync_path(tmp / "manifest.json")
    _fsync_path(tmp)
    if final.exists():  # a re-run of the same step after resume
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_path(checkpoints_dir)
    for old in list_checkpoints(checkpoints_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(
    checkpoints_dir: Path,
    step: int,
    tensors: dict[str, torch.Tensor],
    state: dict[str, Any],
    meta: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write `step-N` atomically and keep only the newest `keep_last` checkpoints."""
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoints_dir / f"step-{step}"
    tmp = checkpoints_dir / f".tmp-step-{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / "model.safetensors")
        torch.save(state, tmp / "state.pt")
        faults.maybe_kill("during_save", step)
        (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=2))
        files = ["model.safetensors", "state.pt", "meta.json"]
        _publish(tmp, final, checkpoints_dir, files, keep_last)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"could not write checkpoint {final}: {e.strerror or e}; earlier checkpoints kept"
        ) from e
    return final


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Step dirs, oldest first (unverified)."""
    if not checkpoints_dir.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in checkpoints_dir.iterdir()
        if (m := STEP_DIR.match(p.name)) and p.is_dir()
    ]
    return [p for _, p in sorted(found)]


def verify_checkpoint(path: Path) -> str | None:
    """None when every file matches the manifest, else what is wrong."""
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        return "no manifest.json (write did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "manifest.json is corrupt"
    for name, expected in manifest.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != expected["bytes"]:
            return f"{name} has {f.stat().st_size} bytes, manifest says {expected['bytes']}"
        if _sha256(f) != expected["sha256"]:
            return f"{name} does not match its checksum"
    return None


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The newest checkpoint that verifies; torn ones are skipped with a warning."""
    for path in reversed(list_checkpoints(checkpoints_dir)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        warnings.warn(f"skipping damaged checkpoint {path}: {problem}", stacklevel=2)
    return None


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(trainable tensors, training state, meta) of a verified checkpoint."""
    tensors = load_file(path / "model.safetensors")
    # On the CPU whatever wrote it: the optimizer moves its state to its parameters' device,
    # so a run written on a GPU resumes on the CPU (or another GPU).
    state = torch.load(path / "state.pt", weights_only=True, map_location="cpu")
    meta = json.loads((path / "meta.json").read_text())
    return tensors, state, meta


# ----------------------------------------------------------------- torchrun jobs (DCP)

DCP_METADATA = ".metadata"


def is_sharded(path: Path) -> bool:
    """Written by a torchrun job (torch.distributed.checkpoint) rather than one process."""
    return (path / DCP_METADATA).is_file()


def save_sharded_checkpoint(
    checkpoints_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    meta: dict[str, Any],
    keep_last: int,
) -> Path:
    """`save_checkpoint` for a torchrun job; every rank calls it, rank 0 publishes.

    Every rank writes its shard of the trainable tensors and optimizer state into one temp
    dir (shared by the ranks: on several nodes, a shared file system); rank 0 then adds
    `state` (the same on every rank, plus each rank's RNG), meta and the manifest, and renames.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    from tether.runs import distributed

    final = checkpoints_dir / f"step-{step}"
    tmp = checkpoints_dir / f".tmp-step-{step}"
    main = distributed.world().is_main
    try:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        distributed.barrier()
        options = StateDictOptions(ignore_frozen_params=True)
        model_state, optim_state = get_state_dict(model, optimizer, options=options)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp))
        rngs = distributed.gather(state["rng"])
        if main:
            shared = {k: v for k, v in state.items() if k != "rng"}
            torch.save({**shared, "rng_per_rank": rngs}, tmp / "state.pt")
            faults.maybe_kill("during_save", step)
            (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=2))
            files = sorted(p.name for p in tmp.iterdir())
            _publish(tmp, final, checkpoints_dir, files, keep_last)
    except (OSError, CheckpointException) as e:  # DCP wraps a rank's OSError in the latter
        shutil.rmtree(tmp, ignore_errors=True)
        reason = getattr(e, "strerror", None) or e
        raise CheckpointError(
            f"could not write checkpoint {final}: {reason}; earlier checkpoints kept"
        ) from e
    distributed.barrier()
    return final


# Everything DCP's `.metadata` pickle names: its record classes, torch sizes, dtypes and
# layouts, and the checkpoint's path. Checked by exact (module, name) before anything is
# imported or looked up.
_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "TensorProperties",
        "ChunkStorageMetadata",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Reads DCP's `.metadata` (a pickle) with only the names above (and torch dtypes)
    allowed, so a tampered checkpoint cannot reach any other callable."""

    def find_class(self, module: str, name: str) -> Any:
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if "." in name or not ((module, name) in _METADATA_CLASSES or dtype):
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint")
        return super().find_class(module, name)


def _safe_dcp_load(state: dict[str, Any], path: Path) -> None:
    """`dcp.load` that unpickles nothing beyond tensors and plain values: `.metadata` through
    the allow-list above, and the non-tensor entries (optimizer hyper-parameters) with
    `torch.load(weights_only=True)` where DCP's default planner uses weights_only=False."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.api import CheckpointException

    class SafeReader(dcp.FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            metadata = _MetadataUnpickler(io.BytesIO((path / DCP_METADATA).read_bytes())).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = dcp.metadata.StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class SafePlanner(dcp.DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            obj = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=".*assuming the intent is to load in a single"
            )
            dcp.load(state, storage_reader=SafeReader(str(path)), planner=SafePlanner())
    except (pickle.UnpicklingError, CheckpointException) as e:
        raise CheckpointError(f"{path} cannot be loaded safely: {e}") from e


def load_sharded_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load a DCP checkpoint's tensors into `model` and `optimizer`, whatever the number of
    ranks that wrote it and that read it (a plain process too); returns (state, meta)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_state_dict,
        set_state_dict,
    )

    from tether.runs import distributed

    options = StateDictOptions(ignore_frozen_params=True)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    _safe_dcp_load({"model": model_state, "optim": optim_state}, path)
    set_state_dict(
        model,
        optimizer,
        model_state_dict=model_state,
        optim_state_dict=optim_state,
        options=options,
    )
    state = torch.load(path / "state.pt", weights_only=True, map_location="cpu")
    rngs = state.pop("rng_per_rank")
    w = distributed.world()
    # On another number of ranks rank 0 continues rank 0's stream; the others keep the
    # fresh per-rank seeds they started with (None: nothing to restore).
    same_ranks = len(rngs) == w.size
    state["rng"] = rngs[w.rank] if same_ranks else (rngs[0] if w.rank == 0 else None)
    meta = json.loads((path / "meta.json").read_text())
    return state, meta
