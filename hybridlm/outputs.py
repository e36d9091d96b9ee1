"""What a head and the model return: the values a forward computed, handed to the caller
instead of left on a module for another one to read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from transformers.modeling_outputs import CausalLMOutput


class HeadOutput(NamedTuple):
    """A head's forward: `delta` (B, L, D), the correction added to the trunk's state z;
    `stats`, the head's diagnostics over real tokens (name -> tensor; the energy-based layers'
    `pc_energy_loss` is differentiable, the rest detached; empty for heads without any);
    `local_statistic`, the local learning rule's statistic when it was asked for, else None."""

    delta: torch.Tensor
    stats: dict[str, torch.Tensor]
    local_statistic: dict[str, torch.Tensor] | None = None


@dataclass
class HybridLMOutput(CausalLMOutput):
    """`CausalLMOutput` plus the head's detached diagnostics (`head_stats`, see `HeadOutput`)
    and, in training with local learning, the local rule's statistic (`local_statistic`),
    which the caller hands to `LocalLearning.collect`."""

    head_stats: dict[str, torch.Tensor] | None = None
    local_statistic: dict[str, torch.Tensor] | None = None
