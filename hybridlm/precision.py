"""Mixed precision (`train.mixed_precision`): what each mode computes in, stores and keeps.

| mode   | GEMMs under autocast | weights, AdamW state | loss scaling        | feature cache |
|--------|----------------------|----------------------|---------------------|---------------|
| `no`   | float32              | float32              | -                   | float32       |
| `bf16` | bfloat16             | float32              | - (float32's range) | bfloat16      |
| `fp16` | float16              | float32              | dynamic (GradScaler)| float16       |

Accelerate runs the forward under `torch.autocast` and, for fp16, scales the loss with a
`GradScaler`. On a CPU, accelerate 1.15 leaves fp16 off without a word (no autocast, no
scaler: the run would compute in float32 while its config says fp16); `make_accelerator`
turns both on there, with torch's CPU autocast and `torch.amp.GradScaler("cpu")`.

What stays float32 in every mode (the master weights aside): the loss (cross-entropy on float32
logits), the residual stream y = z + delta (cached features are read back as float32), the
spiking layer's membrane, code and surrogate derivatives (`SpikingPCLayer.infer`: the
kernel ops accumulate in float32), the ISTA iterate, and the local rule's statistic
(`SpikingPCLayer.local_statistic`), which sums thousands of tokens: in bf16 a token count
of 2,047 already reads 2,048.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from hybridlm.config import MIXED_PRECISION, ConfigError
from hybridlm.launch import new_accelerator

# The dtype of each mode (config.MIXED_PRECISION): autocast's, and the feature cache's.
DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_works(device_type: str, dtype: torch.dtype) -> bool:
    """True when torch's autocast on `device_type` really computes a matmul in `dtype` (a
    torch without that autocast warns, turns it off and computes in float32)."""
    if not torch.amp.autocast_mode.is_autocast_available(device_type):
        return False
    a = torch.ones(2, 2, device=device_type)
    with torch.autocast(device_type, dtype=dtype):
        return (a @ a).dtype == dtype


def check_supported(mode: str, device: torch.device) -> None:
    """Raise ConfigError when `device` cannot compute in `mode` (before any work): bf16 on a
    GPU without bfloat16 (before Ampere), or a half precision this torch's autocast does not
    do on the device."""
    if mode == "no":
        return
    key = "train.mixed_precision"
    dtype = DTYPES[mode]
    if device.type == "cuda":
        # before Ampere torch only emulates bfloat16 (it runs, slower than float32)
        if mode == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
            name = torch.cuda.get_device_name(device)
            raise ConfigError(
                f"{key}: 'bf16' is not supported by this GPU ({name}: bfloat16 needs compute "
                "capability 8.0 or newer); use 'fp16' (with loss scaling) or 'no'")
        return
    if not autocast_works(device.type, dtype):
        raise ConfigError(
            f"{key}: '{mode}' is not supported on this {device.type} by torch "
            f"{torch.__version__} (its autocast does not compute in {dtype}); use "
            f"{' or '.join(repr(m) for m in MIXED_PRECISION if m not in ('no', mode))} or 'no'")


def make_accelerator(mode: str, **kwargs) -> Accelerator:
    """`hybridlm.launch.new_accelerator(mixed_precision=mode, **kwargs)` (the launch checked),
    refused (ConfigError) when its
    device cannot compute in `mode`; on a CPU in fp16, with the autocast and the loss scaler
    that accelerate leaves off there (set before `prepare`, which hands the scaler to the
    optimizer and wraps the model's forward in the autocast). The device is known once the
    Accelerator exists (a PartialState made first would lose a CPU launch's processes)."""
    accelerator = new_accelerator(mixed_precision=mode, **kwargs)
    if mode == "no":
        return accelerator
    check_supported(mode, accelerator.device)
    if mode == "fp16" and accelerator.device.type == "cpu" and accelerator.scaler is None:
        if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
            raise ConfigError(
                "train.mixed_precision: 'fp16' on CPUs under FSDP version 1 is not supported "
                "(its sharded gradient scaler is untested here); use 'bf16', or DDP or FSDP2")
        accelerator.native_amp = True  # accelerate's autocast() and prepare() read it
        accelerator.scaler = torch.amp.GradScaler("cpu")
    return accelerator
