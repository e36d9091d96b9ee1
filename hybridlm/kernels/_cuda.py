"""CUDA path: the .cu sources through ``cupy.RawModule`` (NVRTC), launched on torch's current
stream with tensors shared zero-copy over DLPack. CuPy is imported only here, lazily: it is an
optional extra (``hybridlm[cuda]``) and is absent on CPU machines.
"""

from __future__ import annotations

import os
import threading

import torch

from hybridlm.kernels._build import NVRTC_OPTIONS, combined_source, gpu_kernel_names

_lock = threading.Lock()
_modules: dict[tuple[int, tuple[str, ...]], object] = {}


def require_cupy():
    """Import CuPy or raise an ImportError that says how to get it."""
    try:
        import cupy
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise ImportError(
            "CUDA tensors need CuPy for the hybridlm kernels: pip install 'hybridlm[cuda]' "
            "(cupy-cuda13x), or pass backend='torch' / set HYBRIDLM_BACKEND=torch"
        ) from e
    return cupy


def nvrtc_options() -> tuple[str, ...]:
    """NVRTC options; HYBRIDLM_NVRTC_FMAD=false adds --fmad=false (bit-exact GPU-vs-CPU)."""
    opts = NVRTC_OPTIONS
    if os.environ.get("HYBRIDLM_NVRTC_FMAD", "").lower() in ("0", "false", "no"):
        opts = (*opts, "--fmad=false")
    return opts


def module(device_index: int):
    cupy = require_cupy()
    key = (device_index, nvrtc_options())
    with _lock:
        mod = _modules.get(key)
        if mod is None:
            with cupy.cuda.Device(device_index):
                mod = cupy.RawModule(code=combined_source(), options=key[1],
                                     name_expressions=gpu_kernel_names())
                mod.compile()
            _modules[key] = mod
        return mod


def _raw(t: torch.Tensor) -> torch.Tensor:
    """t detached (DLPack refuses tensors that require grad); bfloat16 as int16 of the same
    bits (CuPy has no bfloat16 dtype; the kernel reads the bits as hl::bf16 anyway)."""
    t = t.detach()
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def launch(name: str, grid, block, args: tuple, device: torch.device) -> None:
    """Launch kernel ``name`` like ``cupy.RawKernel``: tensors are passed as CuPy views
    (DLPack, detached), scalars must already be numpy scalars of the exact C type."""
    cupy = require_cupy()
    idx = device.index if device.index is not None else torch.cuda.current_device()
    kern = module(idx).get_function(name)
    stream = torch.cuda.current_stream(device)
    with cupy.cuda.Device(idx), cupy.cuda.ExternalStream(stream.cuda_stream):
        cargs = tuple(cupy.from_dlpack(_raw(a)) if isinstance(a, torch.Tensor) else a
                      for a in args)
        kern(tuple(grid) if not isinstance(grid, int) else (grid,),
             tuple(block) if not isinstance(block, int) else (block,), cargs)
