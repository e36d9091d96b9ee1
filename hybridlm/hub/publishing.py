"""Publishing a checked model folder to the Hugging Face Hub as one commit."""

from __future__ import annotations

import os
import re
from pathlib import Path

from hybridlm.hub.folder import check_model_folder
from hybridlm.io import CheckpointError

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
UPLOAD_IGNORE = [".*", "**/.*", "checkpoints/*", "__pycache__/*"]


class PublishError(ValueError):
    """Publishing can't start: no token, bad repo id, offline mode, or a bad folder."""


def check_repo_id(repo_id: str) -> str:
    """`user/name` with letters, digits, '-', '_', '.'; raises `PublishError` otherwise."""
    if not isinstance(repo_id, str) or not REPO_ID.match(repo_id) or ".." in repo_id \
            or "--" in repo_id or repo_id.endswith((".", "-")) or repo_id.endswith(".git"):
        raise PublishError(
            f"malformed Hub repo id {repo_id!r}: expected 'user/name' (letters, digits, "
            "'-', '_', '.'; at most 96 characters each; no '--' or '..')"
        )
    return repo_id


def publish(
    folder: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
    endpoint: str | None = None,
):
    """Upload a checked model folder (with its card) to the Hub as ONE commit.

    Creates the repo if needed. The endpoint is `endpoint`, else `HF_ENDPOINT`. Returns the
    `CommitInfo` of the commit. Raises `PublishError` / `CheckpointError` before any upload
    when the repo id, the token or the folder is wrong.
    """
    check_repo_id(repo_id)
    try:
        check_model_folder(folder, require_card=True)
    except CheckpointError as e:
        raise PublishError(f"refusing to publish: {e}") from e
    from huggingface_hub import HfApi, constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise PublishError("HF_HUB_OFFLINE=1 is set: publishing needs the network; "
                           "run with HF_HUB_OFFLINE=0")
    token = token or get_token()
    if not token:
        raise PublishError(
            "no Hugging Face token: set HF_TOKEN to a write token, or run `hf auth login` "
            "(nothing was uploaded)"
        )
    api = HfApi(endpoint=endpoint or os.environ.get("HF_ENDPOINT") or None, token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    return api.upload_folder(
        folder_path=str(folder), repo_id=repo_id, repo_type="model",
        commit_message=commit_message or f"Upload hybridlm model from {Path(folder).name}",
        ignore_patterns=UPLOAD_IGNORE,
    )
