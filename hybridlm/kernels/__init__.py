"""Fused spiking-neuron kernels: one CUDA source, run on GPUs through CuPy and on CPUs
through a small CUDA-to-C++ shim, with a plain-torch reference as the source of truth.

Public API (time-first tensors; float32, bfloat16, float16 or float64, half precisions
computed in float32; spikes optionally one byte: see :mod:`hybridlm.kernels.ops`):

- :func:`lif_multistep` (x [T, *]) -> spikes [T, *]
- :func:`spike_matmul` (S [M, K], W [K, N]) -> [M, N]
- :func:`sc_inference` (V_1 [M, N], G [N, N]) -> (r_T, spikes, dF): spike-coding inference,
  the spiking predictive-coding layer's T steps

Large CPU outputs come from a pool that reuses their memory once no tensor refers to it
(:mod:`hybridlm.kernels.pool`). Backends and their selection: see
:mod:`hybridlm.kernels.ops`; design and measurements: docs/kernels.md.
"""

from hybridlm.kernels.ops import (
    BACKENDS,
    SPIKE_MATMUL_CROSSOVER,
    lif_multistep,
    resolve_backend,
    sc_inference,
    spike_matmul,
)
from hybridlm.kernels.pool import empty_cache, output_pool_stats, reset_output_pool_peak
from hybridlm.kernels.reference import (
    lif_multistep_reference,
    sc_inference_reference,
    spike_matmul_reference,
)

__all__ = [
    "BACKENDS",
    "SPIKE_MATMUL_CROSSOVER",
    "empty_cache",
    "lif_multistep",
    "lif_multistep_reference",
    "output_pool_stats",
    "reset_output_pool_peak",
    "resolve_backend",
    "sc_inference",
    "sc_inference_reference",
    "spike_matmul",
    "spike_matmul_reference",
]
