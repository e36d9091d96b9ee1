"""The layout of a training run's folder (`output_dir`), in one place:

    <root>/config.yaml                   the run's config, as loaded
    <root>/metrics.json                  the run summary (every head, n-grams, timings)
    <root>/results.md, results.png       the results table and its figure
    <root>/<head>/metrics.json           one head's metrics (its presence: the head finished)
    <root>/<head>/history.jsonl          one JSON row per logged step (training and validation)
    <root>/<head>/model/                 the `save_pretrained` folder, tokenizer and card
    <root>/<head>/checkpoints/step_N/    training checkpoints (see `hybridlm.checkpoints`)
    <root>/wandb/                        the offline W&B runs, when enabled
    <root>/.lock                         locked (flock) by the run using the folder

A folder that holds only what a run writes before its first checkpoint (config.yaml, the
lock, W&B files and history.jsonl) holds no results: a new run may take it over.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from hybridlm.config import ConfigError
from hybridlm.io import write_text_atomic

# what a run leaves before its first checkpoint (with the .tmp files of atomic writes)
_NO_RESULTS_ROOT = {"config.yaml", ".lock", "wandb"}
_NO_RESULTS_HEAD = {"history.jsonl"}


@dataclass(frozen=True)
class RunDir:
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def summary(self) -> Path:
        return self.root / "metrics.json"

    @property
    def results_md(self) -> Path:
        return self.root / "results.md"

    @property
    def results_png(self) -> Path:
        return self.root / "results.png"

    def metrics(self, head: str) -> Path:
        return self.root / head / "metrics.json"

    def history(self, head: str) -> Path:
        return self.root / head / "history.jsonl"

    def model(self, head: str) -> Path:
        return self.root / head / "model"

    def checkpoints(self, head: str) -> Path:
        return self.root / head / "checkpoints"

    def checkpoint(self, head: str, step: int) -> Path:
        return self.checkpoints(head) / f"step_{step:07d}"

    def finished_heads(self) -> list[str]:
        """Heads with a metrics.json, in name order."""
        return sorted(p.parent.name for p in self.root.glob("*/metrics.json"))

    @property
    def lock_file(self) -> Path:
        return self.root / ".lock"

    def holds_results(self) -> bool:
        """True unless the folder is absent, empty, or holds only what a run that stopped
        before its first checkpoint wrote (see the module docstring)."""
        if not self.root.is_dir():
            return False
        for entry in self.root.iterdir():
            name = entry.name.removeprefix(".").removesuffix(".tmp")
            if entry.name in _NO_RESULTS_ROOT or name == "config.yaml":
                continue
            if entry.is_dir() and not entry.is_symlink() and all(
                    p.name.removeprefix(".").removesuffix(".tmp") in _NO_RESULTS_HEAD
                    for p in entry.iterdir()):
                continue
            return True
        return False

    def check_place(self) -> None:
        """Refuse a root that cannot become a folder: a dangling link, a file."""
        if self.root.is_symlink() and not self.root.exists():
            raise ConfigError(f"output_dir '{self.root}' is a link to "
                              f"'{os.readlink(self.root)}', which does not exist: create the "
                              "target or choose another output_dir")
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(f"output_dir '{self.root}' is a file, not a folder: choose "
                              "another output_dir")

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Create the folder and hold its exclusive lock until the block ends; a ConfigError
        names the holder when another run holds it. flock: the OS releases the lock when its
        process ends, so the lock file of a killed run blocks nothing."""
        self.check_place()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError(f"output_dir '{self.root}' cannot be written "
                              f"({e.strerror or e}): choose another output_dir") from e
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
                raise ConfigError(
                    f"output_dir '{self.root}' is in use by another run ({holder}): wait for "
                    "it to end, or choose another output_dir (nothing was changed)") from None
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
            yield
        finally:
            os.close(fd)  # releases the lock


def _flat(value, key: str = "") -> dict[str, object]:
    """A nested config as {dotted key: value}, e.g. `data.domains[0].source`."""
    if isinstance(value, dict):
        return {k: v for name, item in value.items()
                for k, v in _flat(item, f"{key}.{name}" if key else str(name)).items()}
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        return {k: v for i, item in enumerate(value) for k, v in _flat(item, f"{key}[{i}]").items()}
    return {key: value}


def _resolved(key: str, value):
    """A path-valued key's value as an absolute, normalised path (trunk names, Hub ids and
    other sources as they are)."""
    if not isinstance(value, str):
        return value
    if key == "model.encoder" and (value.endswith(".gguf") or value.startswith((".", "/", "~"))
                                   or Path(value).exists()):
        return str(Path(value).expanduser().resolve())
    if key.endswith(".source") and value.startswith("files:"):
        globs = value.removeprefix("files:").split(",")
        return "files:" + ",".join(str(Path(g.strip()).expanduser().resolve()) for g in globs)
    return value


# where a run's files go, not what it computes: a moved run folder or cache is the same run
_PLACE_KEYS = ("output_dir", "data.cache_dir")


def config_differences(saved: dict, current: dict, limit: int = 5) -> list[str]:
    """The keys in which two run configs (`RunConfig.to_dict()`) differ, at most `limit`, each
    as `key: saved -> current` with shortened values. Paths compare resolved, so a folder
    spelled relative or with `..` is the same folder; `_PLACE_KEYS` do not count."""
    a, b = _flat(saved), _flat(current)
    differ = [k for k in sorted(a.keys() | b.keys()) if k not in _PLACE_KEYS
              and _resolved(k, a.get(k)) != _resolved(k, b.get(k))]

    def show(v) -> str:
        text = repr(v)
        return text if len(text) <= 60 else text[:57] + "..."

    lines = [f"{k}: {show(a.get(k))} -> {show(b.get(k))}" for k in differ[:limit]]
    if len(differ) > limit:
        lines.append(f"and {len(differ) - limit} more")
    return lines


class History:
    """A head's `history.jsonl`: one JSON object per logged row, each with its `step`.

    Opened for a resumed run at checkpoint step `resume_step`, the rows of later steps (logged
    by the interrupted process after its last checkpoint) are dropped, so the file of a
    resumed run equals that of an uninterrupted one. A row equal to the last one written is
    not written again (a run resumed from its final checkpoint re-validates that step)."""

    def __init__(self, path: Path, resume_step: int | None = None, enabled: bool = True):
        self.path, self.enabled = path, enabled
        self.seen: deque[str] = deque(maxlen=8)  # the last rows written, to skip a repeat
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step is not None and path.is_file():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut off by the kill
                    continue
                if isinstance(row, dict) and row.get("step", resume_step + 1) <= resume_step:
                    kept.append(row)
        # atomic: a kill while it is rewritten must not lose the rows before the checkpoint
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
        self.seen.extend(json.dumps(r, sort_keys=True) for r in kept)

    def append(self, row: dict) -> None:
        if not self.enabled:
            return
        key = json.dumps(row, sort_keys=True)
        if key in self.seen:  # already written (a re-validated step)
            return
        self.seen.append(key)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
