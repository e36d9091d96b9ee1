"""What a run was made with: git commit, package versions, seeds, machine. Logged into the
W&B run config (key `manifest`) and written next to the results."""

from __future__ import annotations

import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = ("hybridlm", "torch", "transformers", "accelerate", "datasets", "huggingface_hub",
            "safetensors", "tokenizers", "wandb", "numpy")


def git_state(root: str | Path | None = None) -> dict:
    """{"commit": sha or None, "dirty": bool or None} of the repository holding `root`."""
    root = Path(root or Path(__file__).resolve().parent.parent)

    def git(*args):
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                              timeout=10)
    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {"commit": None, "dirty": None}
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip() != ""
        return {"commit": head.stdout.strip(), "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def package_versions(names=PACKAGES) -> dict:
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def run_manifest(seed: int | None = None, **extra) -> dict:
    """The manifest dict: git, package versions, python, platform, torch threads, seeds."""
    import torch

    return {
        "git": git_state(),
        "packages": package_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "seeds": {"seed": seed},
        "command": " ".join(sys.argv),
    } | extra
