"""The layout of a training run's folder (`output_dir`), in one place:

    <root>/config.yaml                   the run's config, as loaded
    <root>/metrics.json                  the run summary (every head, n-grams, timings)
    <root>/results.md, results.png       the results table and its figure
    <root>/<head>/metrics.json           one head's metrics (its presence: the head finished)
    <root>/<head>/history.jsonl          one JSON row per logged step (training and validation)
    <root>/<head>/model/                 the `save_pretrained` folder, tokenizer and card
    <root>/<head>/checkpoints/step_N/    training checkpoints (see `hybridlm.checkpoints`)
    <root>/<head>/wandb/                 the offline W&B run, when enabled
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from hybridlm.io import write_text_atomic


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

    def has_files(self) -> bool:
        return self.root.exists() and any(self.root.iterdir())


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
