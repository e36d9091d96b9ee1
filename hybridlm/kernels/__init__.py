"""Fused spiking-neuron kernels: one CUDA source, run on GPUs through CuPy and on CPUs
through a small CUDA-to-C++ shim, with a plain-torch reference as the source of truth.

Public API (time-first tensors, float32):

- :func:`lif_multistep` (x [T, *]) -> spikes [T, *]
- :func:`pc_step` (I, v, r) -> (s, v', r')
- :func:`spike_matmul` (S [M, K], W [K, N]) -> [M, N]

Large CPU outputs come from a pool that reuses their memory once no tensor refers to it
(:mod:`hybridlm.kernels.pool`). Backends and their selection: see
:mod:`hybridlm.kernels.ops`; design and measurements: docs/kernels.md.
"""

from hybridlm.kernels.ops import (
    BACKENDS,
    SPIKE_MATMUL_CROSSOVER,
    lif_multistep,
    pc_step,
    resolve_backend,
    spike_matmul,
)
from hybridlm.kernels.pool import empty_cache, output_pool_stats, reset_output_pool_peak
from hybridlm.kernels.reference import (
    lif_multistep_reference,
    pc_step_reference,
    spike_matmul_reference,
)

__all__ = [
    "BACKENDS",
    "SPIKE_MATMUL_CROSSOVER",
    "empty_cache",
    "lif_multistep",
    "lif_multistep_reference",
    "output_pool_stats",
    "pc_step",
    "pc_step_reference",
    "reset_output_pool_peak",
    "resolve_backend",
    "spike_matmul",
    "spike_matmul_reference",
]
