"""Training checkpoints: which ones are complete and intact.

A checkpoint folder holds what `Accelerator.save_state` wrote (model weights as safetensors,
optimizer and RNG states read back with `torch.load(weights_only=True)`) and `progress.yaml`,
written last: the step, the data position, the scheduler and gate states (plain numbers, so
nothing is unpickled) and a SHA-256 of every other file. A folder without `progress.yaml`
was cut off mid-save; one whose files don't match their checksums is corrupt.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import yaml

PROGRESS = "progress.yaml"


def file_checksums(folder: Path) -> dict[str, str]:
    sums = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name != PROGRESS and not path.name.startswith("."):
            h = hashlib.sha256()
            with path.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            sums[path.name] = h.hexdigest()
    return sums


def verify(folder: Path) -> str | None:
    """None if the checkpoint is complete and intact, else what is wrong with it."""
    progress_file = folder / PROGRESS
    if not progress_file.is_file():
        return "no progress.yaml (the save was cut off)"
    try:
        progress = yaml.safe_load(progress_file.read_text())
        expected = progress["files"]
    except (yaml.YAMLError, KeyError, TypeError, UnicodeDecodeError):
        return "progress.yaml is unreadable"
    actual = file_checksums(folder)
    for name, digest in expected.items():
        if name not in actual:
            return f"{name} is missing"
        if actual[name] != digest:
            return f"{name} does not match its checksum"
    return None


def latest_intact(ckpt_dir: Path) -> Path | None:
    """The newest intact checkpoint; warns about each newer one it had to pass over."""
    for folder in sorted(ckpt_dir.glob("step_*"), reverse=True):
        problem = verify(folder)
        if problem is None:
            return folder
        warnings.warn(f"checkpoint {folder} skipped: {problem}; trying the previous one",
                      stacklevel=2)
    return None
