"""Weights & Biases logging: offline by default, main process only, always flushed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from hybridlm.manifest import run_manifest

if TYPE_CHECKING:  # hybridlm.config imports WANDB_MODES from here
    from hybridlm.config import RunConfig

# wandb.init's modes (`wandb.mode`); "disabled" logs nothing, and WANDB_MODE overrides
WANDB_MODES = ("offline", "online", "disabled")


class Tracker:
    """One W&B run (or nothing, when disabled). `log` and `finish` are no-ops when off."""

    def __init__(self, cfg: RunConfig, name: str, folder: Path, enabled: bool):
        self.run = None
        mode = os.environ.get("WANDB_MODE", cfg.wandb.mode)
        if not (enabled and cfg.wandb.enabled) or mode == "disabled":
            return
        import wandb

        folder.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=cfg.wandb.project,
            name=name,
            group=Path(cfg.output_dir).name,
            mode=mode,
            dir=str(folder),
            config=cfg.to_dict() | {"manifest": run_manifest(cfg.seed)},
            reinit="create_new",
        )

    def log(self, metrics: dict, step: int) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def summary(self, metrics: dict) -> None:
        if self.run is not None:
            self.run.summary.update(metrics)

    def finish(self) -> None:
        if self.run is not None:
            import wandb

            self.run.finish()
            wandb.teardown()  # finish() can return before the offline file is complete
            self.run = None
