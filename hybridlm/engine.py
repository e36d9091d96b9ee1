"""The training step, written once: used by `make train` (`hybridlm.training`), every stage of
the continual evaluation (`hybridlm.continual`), the benchmarks and the multi-process tests.

One call of `Engine.step` takes one micro-batch's loss through

    agree across ranks that the loss is finite (else every rank skips it, or the gradient
      all-reduce would hang with some ranks waiting)
    -> hand the forward's local statistic to the Hebbian learner (summed over micro-batches)
    -> backward of the (in fp16, scaled) loss (DDP all-reduces the gradients when they sync)
    -> when gradients sync: clip, optimizer step (in fp16 the loss scaler's: skipped when the
       scaled gradients overflowed), the local rule's step (its statistic and
       gate inputs averaged across ranks, since DDP does not see updates made outside
       autograd), learning-rate schedule, zero the gradients.

Local learning runs only under an engine that keeps its update exact (one process, DDP,
FSDP2, DeepSpeed ZeRO 0-3 in fp32 without NVMe offload); the others are refused when
the engine is built (`check_local_learning`). Under DeepSpeed, `accelerator.backward` also steps
the optimizer (Accelerate's DeepSpeed engine wrapper) and clips with the DeepSpeed config's
`gradient_clipping`; the local rule then writes through DeepSpeed
(`hybridlm.plasticity.zero_write`).

The caller owns the loop (what a batch is, when to validate or save) and wraps the forward
and `step` in `accelerator.accumulate(model)` when it accumulates gradients.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from hybridlm.config import ConfigError


def mean_over_processes(accelerator: Accelerator, t: torch.Tensor) -> torch.Tensor:
    """`t` averaged over processes (itself with one process)."""
    return accelerator.reduce(t, "mean") if accelerator.num_processes > 1 else t


def check_local_learning(accelerator: Accelerator) -> None:
    """Refuse an engine under which the local rule's update, made outside the optimizer,
    would be lost or wrong without an error. Exact: one process, DDP (the rule's statistic is
    averaged across ranks, every rank applies the same update), FSDP2 (each rank edits
    its own rows of the sharded dictionary, `hybridlm.plasticity.writable_part`) and DeepSpeed
    ZeRO but for `deepspeed_problem` (the update is written into ZeRO's fp32 master copy too,
    `hybridlm.plasticity.zero_write`)."""
    kind = accelerator.distributed_type
    if kind == DistributedType.NO or kind.name.startswith("MULTI_") or accelerator.is_fsdp2:
        return
    if kind == DistributedType.DEEPSPEED:
        why = deepspeed_problem(accelerator)
        if why is None:
            return
    else:
        why = {
            DistributedType.FSDP: "FSDP version 1 holds the dictionary inside a flattened, "
            "sharded parameter that the local rule cannot edit in place (FSDP version 2 is "
            "exact: set fsdp_version: 2 in the Accelerate config)",
        }.get(kind, f"the local rule's update has not been made exact under {kind.value}")
    raise ConfigError(
        f"model.learning: local learning (hebbian or hybrid) is refused under this launch: "
        f"{why}. Launch with DDP (several processes without DeepSpeed or FSDP), FSDP2 or "
        "DeepSpeed ZeRO in fp32 without NVMe offload, or set model.learning=bptt")


def deepspeed_problem(accelerator: Accelerator) -> str | None:
    """Why the local rule would not be exact under this DeepSpeed launch (its config,
    `accelerator.state.deepspeed_plugin.deepspeed_config`), or None when it is."""
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    if accelerator.mixed_precision == "fp16" or config.get("fp16", {}).get("enabled") is True:
        return ("DeepSpeed fp16 skips the optimizer step when its loss scale overflows, while "
                "the local rule would still step, and its fp16 optimizer keeps master weights "
                "the rule cannot reach; use bf16 or fp32")
    if accelerator.mixed_precision == "bf16" or config.get("bf16", {}).get("enabled") is True:
        return ("DeepSpeed bf16 casts the weights themselves to bfloat16, and the spiking "
                "layer's forward has not been made to run on them (it fails with a dtype "
                "error); use DeepSpeed in fp32, or train.mixed_precision=bf16 under DDP or "
                "FSDP2 (autocast over float32 weights)")
    zero = config.get("zero_optimization", {})
    for key in ("offload_optimizer", "offload_param"):
        if (zero.get(key) or {}).get("device") == "nvme":
            return (f"DeepSpeed zero_optimization.{key} to nvme swaps the weights the local "
                    "rule must write out to disk, where its write has not been checked; "
                    "offload to cpu instead")
    return None


def register_zero3_external_parameters(model: torch.nn.Module) -> None:
    """ZeRO-3 gathers a parameter only around its own module's forward: register the ones
    the model's forward reads from a submodule without calling it (`external_parameters`,
    e.g. the word embeddings a tied LM head multiplies by), or they would read 0 elements."""
    from deepspeed.runtime.zero import register_external_parameter

    for p in getattr(model, "external_parameters", list)():
        register_external_parameter(model, p)


class NonFiniteLoss(FloatingPointError):
    """The loss was NaN or inf on some rank for `patience` micro-batches in a row."""


def optimizer_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups of the parameters that get gradients: matrices decay, vectors (biases,
    norms) do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float
                   ) -> torch.optim.AdamW:
    return torch.optim.AdamW(optimizer_groups(model, weight_decay), lr=lr)


class Engine:
    """The step of one training run over a model already prepared by `accelerator`.

    `optimizer` (prepared) and `scheduler` belong to the current phase (a head's training, a
    continual stage); `local` is the model's `LocalLearning` or None; `patience`: skipped
    micro-batches in a row before `NonFiniteLoss` is raised.
    """

    def __init__(self, accelerator: Accelerator, model: torch.nn.Module, optimizer,
                 scheduler, max_grad_norm: float, local=None, patience: int = 10):
        self.accelerator, self.model = accelerator, model
        self.base = accelerator.unwrap_model(model)
        self.params = [p for p in self.base.parameters() if p.requires_grad]
        if local is not None:
            check_local_learning(accelerator)
        if any(hasattr(p, "ds_id") for p in self.base.parameters()):  # ZeRO-3 partitioned
            register_zero3_external_parameters(self.base)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.max_grad_norm, self.local, self.patience = max_grad_norm, local, patience
        self.skipped = 0  # micro-batches skipped for a non-finite loss
        self.bad_in_a_row = 0
        self.gate_losses: list[torch.Tensor] = []  # this step's micro-batches, for the gate

    def mean_over_processes(self, t: torch.Tensor) -> torch.Tensor:
        return mean_over_processes(self.accelerator, t)

    def all_finite(self, loss: torch.Tensor) -> bool:
        """True when `loss` is finite on every rank (one all-reduce)."""
        bad = (~torch.isfinite(loss.detach())).float().reshape(1)
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, "sum")
        return float(bad) == 0

    def step(self, loss: torch.Tensor, local_statistic: dict | None = None,
             gate_loss: torch.Tensor | None = None) -> dict | None:
        """One micro-batch: `loss` is backpropagated; `local_statistic` is the forward's
        (`HybridLMOutput.local_statistic`); `gate_loss` is what the surprise gate reads
        (default `loss`; the continual methods pass the next-token loss without their
        penalties), averaged over the step's micro-batches. Returns None when every rank
        skipped the micro-batch, {} when it only accumulated gradients, else the step's values
        to log (`train/grad_norm` and the local rule's `plasticity/...`)."""
        acc = self.accelerator
        if not self.all_finite(loss):
            self.optimizer.zero_grad()
            self.skipped += 1
            self.bad_in_a_row += 1
            if self.bad_in_a_row >= self.patience:
                raise NonFiniteLoss(f"loss was NaN/inf for {self.bad_in_a_row} steps in a row")
            return None
        self.bad_in_a_row = 0
        if self.local is not None:  # summed over micro-batches, applied when the optimizer steps
            self.local.collect(local_statistic)
            self.gate_losses.append((loss if gate_loss is None else gate_loss).detach())
        acc.backward(loss)
        if not acc.sync_gradients:  # accumulating: the prepared optimizer does not step yet
            return {}
        # (None under DeepSpeed without gradient_clipping: it did not compute the norm)
        norm = acc.clip_grad_norm_(self.params, self.max_grad_norm)
        row = {"train/grad_norm": float("nan") if norm is None else float(norm)}
        self.optimizer.step()
        if acc.scaler is not None:  # fp16: the optimizer step was skipped (and the scale
            # halved) if the scaled gradients overflowed; the local rule needs no gradient
            row["train/loss_scale"] = float(acc.scaler.get_scale())
        if self.local is not None:  # the gate reads the whole step's mean loss
            gate = torch.stack(self.gate_losses).mean()
            self.gate_losses = []
            row |= self.local.step(gate, self.mean_over_processes)
        self.scheduler.step()
        self.optimizer.zero_grad()
        return row
