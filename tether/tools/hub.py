"""`tether push RUN_DIR REPO_ID`: a run's `final/` (model, tokenizer, model card, LoRA
adapter) to the Hugging Face Hub, with `huggingface_hub` where a hub is reachable."""

from __future__ import annotations

from pathlib import Path

from tether.errors import TetherError


def final_dir(run_dir: str | Path) -> Path:
    """A run dir's `final/`, or the model dir given itself."""
    path = Path(run_dir)
    final = path / "final" if (path / "final").is_dir() else path
    if not (final / "config.json").is_file():
        raise TetherError(f"{run_dir}: no trained model to push (no final/config.json)")
    return final


def push(run_dir: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Upload `final/` to `repo_id` (created if missing); returns the commit's URL."""
    final = final_dir(run_dir)
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise TetherError("pushing needs `pip install huggingface_hub`") from None
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(
            folder_path=str(final), repo_id=repo_id, commit_message=f"tether: {final}"
        )
    except Exception as e:  # offline, no token, no such namespace: all "cannot push"
        raise TetherError(
            f"cannot push {final} to the Hugging Face Hub as {repo_id}: {type(e).__name__}: "
            f"{str(e)[:300]}. Log in (`hf auth login` or HF_TOKEN) on a machine that reaches "
            "the hub; the model stays in the run dir meanwhile"
        ) from None
    return str(getattr(commit, "commit_url", commit))
